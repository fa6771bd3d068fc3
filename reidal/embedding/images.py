"""Turn one caller-supplied image (encoded bytes or a URI) into a decoded RGB picture.

Everything a client sends is untrusted, so every limit is checked *before* the expensive or
dangerous step it protects: the encoded size before reading a file or a response body, the
pixel count from the header before decoding (a 40 KB PNG can claim 100 000 x 100 000
pixels: a "decompression bomb"), and only the three decoders reidal documents (JPEG, PNG,
WebP) are ever tried, so exotic Pillow plugins are not an attack surface.

Every failure is an :class:`ImageError` naming the caller's item id and the reason, which
the gRPC layer turns into INVALID_ARGUMENT.
"""

from __future__ import annotations

import io
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from reidal.errors import InvalidArgument

#: Pillow format names reidal accepts (what ``Image.open(..., formats=...)`` expects).
FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP")


class ImageError(InvalidArgument):
    """One image could not be used; ``item_id`` is the caller's id, ``reason`` says why."""

    def __init__(self, item_id: str, reason: str) -> None:
        self.item_id = item_id
        self.reason = reason
        super().__init__(f"image {item_id!r}: {reason}")


@dataclass(frozen=True)
class ImageLimits:
    """What an incoming image may be. The defaults are the documented server limits.

    max_bytes: largest encoded image (bytes or file or download), 20 MiB: a camera-trap
        JPEG is a few MB; larger is almost surely a mistake or an attack.
    max_pixels: largest width x height, 40 megapixels (a 7 700 x 5 200 frame). Checked from
        the header before decoding; 40 MP of RGB is 120 MB of memory per image in flight.
        It stays below Pillow's own bomb guard (``Image.MAX_IMAGE_PIXELS``, about 89 MP),
        which remains as a second line of defence.
    min_side: smallest width and height in pixels (1: only empty pictures are refused).
    allow_http: fetch ``http://`` / ``https://`` URIs (off by default: a server that
        fetches arbitrary URLs on request can be aimed at internal hosts).
    http_timeout_s: connect + read timeout of one download.
    allowed_roots: when non-empty, file paths must resolve inside one of these directories
        (symlinks resolved first); empty means any path the server process may read.
    """

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    min_side: int = 1
    allow_http: bool = False
    http_timeout_s: float = 10.0
    allowed_roots: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {self.max_bytes}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {self.max_pixels}")
        if self.min_side < 1:
            raise ValueError(f"min_side must be >= 1, got {self.min_side}")
        if self.http_timeout_s <= 0:
            raise ValueError(f"http_timeout_s must be > 0, got {self.http_timeout_s}")


DEFAULT_LIMITS = ImageLimits()


def decode_image(
    data: bytes | None,
    uri: str | None,
    *,
    item_id: str,
    limits: ImageLimits = DEFAULT_LIMITS,
) -> Image.Image:
    """Decode exactly one of ``data`` (encoded bytes) or ``uri`` into an RGB image.

    ``uri`` may be a plain filesystem path, a ``file://`` URI, or (when
    ``limits.allow_http``) an ``http(s)://`` URL. EXIF orientation is applied, so a portrait
    photo taken with a rotated camera is embedded upright, and only the first frame of an
    animated PNG/WebP is used. Raises :class:`ImageError` naming ``item_id``.
    """
    if (data is None) == (uri is None):
        raise ImageError(item_id, "give exactly one of encoded bytes or a URI")
    if uri is not None:
        data = read_uri(uri, item_id=item_id, limits=limits)
    assert data is not None
    if len(data) == 0:
        raise ImageError(item_id, "image data is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageError(
            item_id, f"encoded image is {len(data)} bytes, over the limit of {limits.max_bytes}"
        )
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageError(item_id, f"image is too large to decode safely ({exc})") from None
    except Image.UnidentifiedImageError:
        raise ImageError(
            item_id, "cannot decode as JPEG, PNG or WebP (unknown format or damaged header)"
        ) from None
    except Exception as exc:  # OSError, SyntaxError, struct.error... from a damaged header
        raise ImageError(
            item_id, f"cannot decode as JPEG, PNG or WebP ({type(exc).__name__}: {exc})"
        ) from None
    width, height = img.size
    if width < limits.min_side or height < limits.min_side:
        raise ImageError(
            item_id, f"image is {width}x{height} pixels, each side must be >= {limits.min_side}"
        )
    if width * height > limits.max_pixels:
        raise ImageError(
            item_id,
            f"image is {width}x{height} = {width * height} pixels, over the limit of "
            f"{limits.max_pixels}",
        )
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
        return img.convert("RGB")
    except Exception as exc:  # truncated or corrupt pixel data after a valid header
        raise ImageError(
            item_id, f"corrupt {img.format} image data ({type(exc).__name__}: {exc})"
        ) from None


def read_uri(uri: str, *, item_id: str, limits: ImageLimits = DEFAULT_LIMITS) -> bytes:
    """The encoded bytes an image URI names (a path, ``file://`` or, when
    ``limits.allow_http``, ``http(s)://``), within the size limits; ImageError otherwise."""
    if not uri:
        raise ImageError(item_id, "URI is empty")
    if "://" not in uri and not uri.lower().startswith("file:"):
        return _read_file(Path(uri), item_id=item_id, limits=limits)  # a plain path
    parsed = urllib.parse.urlsplit(uri)
    scheme = parsed.scheme.lower()
    if scheme in ("http", "https"):
        if not limits.allow_http:
            raise ImageError(
                item_id, "http(s) URIs are disabled on this server; send the bytes instead"
            )
        return _download(uri, item_id=item_id, limits=limits)
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ImageError(item_id, f"file URI names a remote host {parsed.netloc!r}")
        return _read_file(Path(urllib.parse.unquote(parsed.path)), item_id=item_id, limits=limits)
    raise ImageError(item_id, f"unsupported URI scheme {scheme!r} (use a path, file:// or bytes)")


def _read_file(path: Path, *, item_id: str, limits: ImageLimits) -> bytes:
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError):
        raise ImageError(item_id, f"file not found: {str(path)!r}") from None
    if limits.allowed_roots and not any(
        resolved.is_relative_to(Path(root).resolve()) for root in limits.allowed_roots
    ):
        raise ImageError(item_id, f"path {str(path)!r} is outside the allowed image directories")
    try:
        if not resolved.is_file():
            raise ImageError(item_id, f"not a regular file: {str(path)!r}")
        size = resolved.stat().st_size
        if size > limits.max_bytes:
            raise ImageError(
                item_id, f"file {str(path)!r} is {size} bytes, over the limit of {limits.max_bytes}"
            )
        with open(resolved, "rb") as fh:
            return fh.read(limits.max_bytes + 1)  # the size check above may race a writer
    except OSError as exc:
        raise ImageError(item_id, f"cannot read {str(path)!r}: {exc.strerror or exc}") from None


def _download(url: str, *, item_id: str, limits: ImageLimits) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "reidal"})
    try:
        with urllib.request.urlopen(request, timeout=limits.http_timeout_s) as resp:
            length = resp.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > limits.max_bytes:
                raise ImageError(
                    item_id, f"download is {length} bytes, over the limit of {limits.max_bytes}"
                )
            return resp.read(limits.max_bytes + 1)
    except ImageError:
        raise
    except urllib.error.HTTPError as exc:
        raise ImageError(item_id, f"download failed: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ImageError(item_id, f"download failed: {reason}") from None

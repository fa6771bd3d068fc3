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
import os
import stat
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

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
    allowed_roots: which local paths (plain or ``file://``) may be read. None: any file
        the process may read (the library default, for a local user's own paths); an empty
        tuple: none at all (a server's default: a remote caller must not read the server's
        files); directories: only regular files whose real path (every symlink resolved)
        is inside one of them. Every refused path gets the same message
        (:data:`PATH_REFUSED`, or :data:`PATHS_OFF` when none is allowed), whether it is
        outside the roots, missing, not a regular file or unreadable, so the answer tells
        a caller nothing about the server's files. The roots must be existing directories;
        they are stored resolved.
    """

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    min_side: int = 1
    allow_http: bool = False
    http_timeout_s: float = 10.0
    allowed_roots: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.allowed_roots is not None:
            roots = tuple(os.path.realpath(r) for r in self.allowed_roots)
            for given, root in zip(self.allowed_roots, roots, strict=True):
                if not os.path.isdir(root):
                    raise ValueError(f"image root {str(given)!r} is not a directory")
            object.__setattr__(self, "allowed_roots", roots)
        if self.max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {self.max_bytes}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {self.max_pixels}")
        if self.min_side < 1:
            raise ValueError(f"min_side must be >= 1, got {self.min_side}")
        if self.http_timeout_s <= 0:
            raise ValueError(f"http_timeout_s must be > 0, got {self.http_timeout_s}")


DEFAULT_LIMITS = ImageLimits()
#: What a server reads when it was given no image roots: no local path at all.
SERVER_LIMITS = ImageLimits(allowed_roots=())

#: The one reason given for every local path a server refuses (see ImageLimits).
PATH_REFUSED = ("no readable image file at this path among the directories this server "
                "reads (its --image-roots); send the image bytes instead")
#: The reason given for every local path when the server reads none.
PATHS_OFF = ("this server reads no local paths (start it with --image-roots DIR to allow "
             "files under DIR); send the image bytes instead")


def decode_image(
    data: bytes | None,
    uri: str | None,
    *,
    item_id: str,
    limits: ImageLimits = DEFAULT_LIMITS,
    draft_size: int | None = None,
) -> Image.Image:
    """Decode exactly one of ``data`` (encoded bytes) or ``uri`` into an RGB image.

    ``uri`` may be a plain filesystem path, a ``file://`` URI, or (when
    ``limits.allow_http``) an ``http(s)://`` URL. EXIF orientation is applied, so a portrait
    photo taken with a rotated camera is embedded upright, and only the first frame of an
    animated PNG/WebP is used. ``draft_size``: see :func:`open_image`. Raises
    :class:`ImageError` naming ``item_id``. (:func:`open_image` then :func:`finish_image`.)
    """
    return finish_image(open_image(data, uri, item_id=item_id, limits=limits,
                                   draft_size=draft_size))


@dataclass
class OpenedImage:
    """An image whose header was read and checked, nothing decoded yet. ``decoded_bytes``:
    the memory its decoding may take at most (:func:`decoded_bytes`), known before it is
    spent, so a server can reserve it (:class:`reidal.embedding.decode_budget.DecodeBudget`)."""

    item_id: str
    image: Image.Image
    decoded_bytes: int


def open_image(
    data: bytes | None,
    uri: str | None,
    *,
    item_id: str,
    limits: ImageLimits = DEFAULT_LIMITS,
    draft_size: int | None = None,
) -> OpenedImage:
    """Read (a URI) and check one image up to its header: format, sides, pixel count.

    ``draft_size``: the model's larger input side. A JPEG is then decoded directly at the
    smallest DCT scale (1/2, 1/4, 1/8) that keeps both sides at least this large
    (``Image.draft``), so a 24-megapixel photo for a 224-pixel model decodes as 0.4 MP
    instead of 24: the memory and most of the time of decoding go, and the resize to the
    input size that follows (:func:`reidal.embedding.preprocess.preprocess`) still
    shrinks, so it still antialiases. Both sides, because EXIF orientation may turn the
    picture. Other formats have no reduced decoding and decode whole.
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
    if draft_size is not None and img.format == "JPEG":
        try:
            img.draft(None, (draft_size, draft_size))
        except Exception as exc:  # a damaged header Pillow only notices now
            raise ImageError(
                item_id, f"corrupt JPEG image data ({type(exc).__name__}: {exc})") from None
    return OpenedImage(item_id, img, decoded_bytes(img))


#: Bytes a pixel of each Pillow mode takes in memory (Pillow keeps "1" as a byte).
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "LA": 2, "La": 2, "PA": 2, "I;16": 2, "I;16B": 2,
               "I;16L": 2, "RGB": 3, "YCbCr": 3, "LAB": 3, "HSV": 3, "RGBA": 4, "RGBa": 4,
               "RGBX": 4, "CMYK": 4, "I": 4, "F": 4}


def decoded_bytes(img: Image.Image) -> int:
    """An upper estimate of the memory decoding ``img`` takes at its peak, from the header
    (after a draft): the decoded picture in its file's mode, plus either its turned copy
    (EXIF orientation) or the RGB result with a byte a pixel for conversion intermediates:
    width x height x (m + max(m, 4)) for a mode of m bytes a pixel (a 1-bit PNG: 5 bytes
    a pixel, an RGB JPEG: 6)."""
    m = _MODE_BYTES.get(img.mode, 4)
    return img.width * img.height * (m + max(m, 4))


def finish_image(opened: OpenedImage) -> Image.Image:
    """Decode an :func:`open_image` result into an upright RGB image; the source's pixels
    are freed at once, so only the RGB result outlives the call. ImageError when the pixel
    data after a valid header is truncated or corrupt."""
    img = opened.image
    try:
        img.load()
        ImageOps.exif_transpose(img, in_place=True)
        return img.convert("RGB")
    except Exception as exc:  # truncated or corrupt pixel data after a valid header
        raise ImageError(
            opened.item_id, f"corrupt {img.format} image data ({type(exc).__name__}: {exc})"
        ) from None
    finally:
        img.close()


def read_uri(uri: str, *, item_id: str, limits: ImageLimits = DEFAULT_LIMITS) -> bytes:
    """The encoded bytes an image URI names (a path, ``file://`` or, when
    ``limits.allow_http``, ``http(s)://``), within the size limits; ImageError otherwise."""
    kind, target = _locate(uri, item_id=item_id, limits=limits)
    if kind == "http":
        return _download(target, item_id=item_id, limits=limits)
    fd = _open_file(target, item_id=item_id, limits=limits)
    with os.fdopen(fd, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > limits.max_bytes:
            raise ImageError(item_id, f"file is {size} bytes, over the limit of "
                                      f"{limits.max_bytes}")
        try:
            return fh.read(limits.max_bytes + 1)  # the size check above may race a writer
        except OSError:
            raise ImageError(item_id, _refusal(target, limits)) from None


def check_uri(uri: str, *, item_id: str, limits: ImageLimits = DEFAULT_LIMITS) -> None:
    """Refuse (ImageError) a URI :func:`read_uri` would refuse before reading a byte: a
    scheme that is off, or a local path outside the allowed roots or not a readable regular
    file. Cheap (a file is opened and closed), so a server checks URIs it stores without
    embedding them (AddImages with defer_embedding)."""
    kind, target = _locate(uri, item_id=item_id, limits=limits)
    if kind == "file":
        os.close(_open_file(target, item_id=item_id, limits=limits))


def _locate(uri: str, *, item_id: str, limits: ImageLimits) -> tuple[str, str]:
    """("file", path) or ("http", url) of a URI, or ImageError for a refused scheme."""
    if not uri:
        raise ImageError(item_id, "URI is empty")
    if "://" not in uri and not uri.lower().startswith("file:"):
        return "file", uri  # a plain path
    parsed = urllib.parse.urlsplit(uri)
    scheme = parsed.scheme.lower()
    if scheme in ("http", "https"):
        if not limits.allow_http:
            raise ImageError(
                item_id, "http(s) URIs are disabled on this server; send the bytes instead"
            )
        return "http", uri
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ImageError(item_id, f"file URI names a remote host {parsed.netloc!r}")
        return "file", urllib.parse.unquote(parsed.path)
    raise ImageError(item_id, f"unsupported URI scheme {scheme!r} (use a path, file:// or bytes)")


def _refusal(path: str, limits: ImageLimits) -> str:
    """The reason for a refused path: a server's fixed text, or (no roots: a local user's
    own paths) one naming the path."""
    if limits.allowed_roots is None:
        return f"no readable image file at {path!r}"
    return PATHS_OFF if limits.allowed_roots == () else PATH_REFUSED


def _open_file(path: str, *, item_id: str, limits: ImageLimits) -> int:
    """A read-only descriptor of the regular file ``path`` resolves to, inside the allowed
    roots; one ImageError text for every refusal (no oracle for what exists where).

    The path is resolved once (every symlink), checked against the roots, and the resolved
    path is opened without following a last symlink and checked with ``fstat`` on the open
    descriptor, so a file swapped after the check is not read (non-blocking open: a FIFO
    cannot hang the call)."""
    roots = limits.allowed_roots
    refused = _refusal(path, limits)
    if roots == ():
        raise ImageError(item_id, refused)
    try:
        resolved = os.path.realpath(path, strict=True)
    except (OSError, ValueError):
        raise ImageError(item_id, refused) from None
    if roots is not None and not any(_inside(resolved, root) for root in roots):
        raise ImageError(item_id, refused)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(resolved, flags)
    except (OSError, ValueError):
        raise ImageError(item_id, refused) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ImageError(item_id, refused)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


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

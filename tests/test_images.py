"""decode_image: the three formats, paths and URIs, and every documented refusal."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reidal.embedding.images import (
    DEFAULT_LIMITS,
    PATH_REFUSED,
    PATHS_OFF,
    SERVER_LIMITS,
    ImageError,
    ImageLimits,
    check_uri,
    decode_image,
)
from reidal.errors import InvalidArgument


def _pixels(h: int = 24, w: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _encode(arr: np.ndarray, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels but carries almost no data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_lossless_formats_round_trip_exactly(fmt: str) -> None:
    arr = _pixels()
    kw = {"lossless": True} if fmt == "WEBP" else {}
    img = decode_image(_encode(arr, fmt, **kw), None, item_id="a")
    assert img.mode == "RGB" and img.size == (32, 24)
    np.testing.assert_array_equal(np.asarray(img), arr)


def test_jpeg_decodes_close_to_the_source() -> None:
    arr = np.full((40, 50, 3), (200, 30, 90), dtype=np.uint8)
    img = decode_image(_encode(arr, "JPEG", quality=95), None, item_id="j")
    assert img.size == (50, 40)
    assert np.abs(np.asarray(img).astype(int) - arr).max() <= 6


def test_greyscale_and_rgba_become_rgb() -> None:
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8)
    buf = io.BytesIO()
    Image.fromarray(grey, mode="L").save(buf, format="PNG")
    out = np.asarray(decode_image(buf.getvalue(), None, item_id="g"))
    assert out.shape == (8, 8, 3)
    np.testing.assert_array_equal(out[..., 0], grey)
    np.testing.assert_array_equal(out[..., 2], grey)
    rgba = np.dstack([_pixels(8, 8), np.full((8, 8), 255, np.uint8)])
    buf = io.BytesIO()
    Image.fromarray(rgba, mode="RGBA").save(buf, format="PNG")
    np.testing.assert_array_equal(np.asarray(decode_image(buf.getvalue(), None, item_id="r")),
                                  rgba[..., :3])


def test_exif_orientation_is_applied() -> None:
    arr = _pixels(10, 20)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buf = io.BytesIO()
    img.save(buf, format="PNG", exif=exif)
    out = decode_image(buf.getvalue(), None, item_id="e")
    assert out.size == (10, 20)  # width and height swapped
    np.testing.assert_array_equal(np.asarray(out), np.rot90(arr, k=-1))


def test_paths_and_file_uris(tmp_path: Path) -> None:
    arr = _pixels()
    path = tmp_path / "dir with space" / "cow.png"
    path.parent.mkdir()
    path.write_bytes(_encode(arr, "PNG"))
    for uri in (str(path), path.as_uri()):
        np.testing.assert_array_equal(np.asarray(decode_image(None, uri, item_id="p")), arr)


def test_allowed_roots_confine_paths_with_one_answer_for_every_refusal(tmp_path: Path) -> None:
    inside = tmp_path / "ok"
    (inside / "sub").mkdir(parents=True)
    (inside / "a.png").write_bytes(_encode(_pixels(), "PNG"))
    (tmp_path / "b.png").write_bytes(_encode(_pixels(), "PNG"))
    (tmp_path / "b.txt").write_bytes(b"not an image")
    (inside / "escape.png").symlink_to(tmp_path / "b.png")  # a link out of the root
    (inside / "sub" / "in.png").symlink_to(inside / "a.png")  # a link within it
    os.mkfifo(inside / "fifo.png")
    limits = ImageLimits(allowed_roots=(str(inside),))
    decode_image(None, str(inside / "a.png"), item_id="a", limits=limits)
    decode_image(None, (inside / "sub" / "in.png").as_uri(), item_id="a", limits=limits)
    refused = [str(tmp_path / "b.png"), str(inside / ".." / "b.png"), str(inside / "escape.png"),
               str(tmp_path / "b.txt"), str(tmp_path / "nope.png"), str(inside / "nope.png"),
               str(inside), str(inside / "fifo.png"), "/etc/passwd", "/proc/self/environ",
               (tmp_path / "b.png").as_uri(), "a\0b"]
    reasons = {_refusal(None, uri, "x", allowed_roots=(str(inside),)) for uri in refused}
    assert reasons == {PATH_REFUSED}  # nothing tells what exists where
    (inside / "c.txt").write_bytes(b"not an image")  # inside, a decode error may say so
    assert "cannot decode" in _refusal(None, str(inside / "c.txt"), "c",
                                       allowed_roots=(str(inside),))
    with pytest.raises(ValueError, match="not a directory"):
        ImageLimits(allowed_roots=(str(tmp_path / "b.png"),))


def test_a_server_without_roots_reads_no_path(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(_encode(_pixels(), "PNG"))
    for uri in (str(path), path.as_uri(), "/etc/passwd", str(tmp_path / "nope.png")):
        assert _refusal(None, uri, "x", allowed_roots=()) == PATHS_OFF
        with pytest.raises(ImageError, match="reads no local paths"):
            check_uri(uri, item_id="x", limits=SERVER_LIMITS)
    check_uri(str(path), item_id="x", limits=ImageLimits(allowed_roots=(str(tmp_path),)))


def _refusal(data: bytes | None, uri: str | None, item_id: str, **limits: object) -> str:
    with pytest.raises(ImageError) as info:
        decode_image(data, uri, item_id=item_id, limits=ImageLimits(**limits))
    err = info.value
    assert isinstance(err, ValueError) and isinstance(err, InvalidArgument)
    assert err.item_id == item_id
    assert repr(item_id) in str(err)
    return err.reason


def test_undecodable_bytes_name_the_item() -> None:
    assert "cannot decode" in _refusal(b"definitely not an image", None, "cat-3")


def test_truncated_image_is_refused() -> None:
    data = _encode(_pixels(64, 64), "PNG")
    assert "corrupt" in _refusal(data[: len(data) // 2], None, "half")


def test_other_formats_are_refused() -> None:
    buf = io.BytesIO()
    Image.fromarray(_pixels()).save(buf, format="BMP")
    assert "cannot decode" in _refusal(buf.getvalue(), None, "bmp")


def test_empty_zero_size_and_min_side() -> None:
    assert "empty" in _refusal(b"", None, "nothing")
    assert "cannot decode" in _refusal(_png_header_only(0, 5), None, "zero")  # Pillow refuses
    reason = _refusal(_encode(_pixels(8, 12), "PNG"), None, "tiny", min_side=10)
    assert "12x8" in reason and ">= 10" in reason


def test_pixel_limit_is_checked_before_decoding() -> None:
    # 50 000 x 1 000 = 50 Mpx claimed by a file of a few dozen bytes: refused from the header
    # by our limit (Pillow's own guard starts at about 89 Mpx).
    bomb = _png_header_only(50_000, 1_000)
    assert len(bomb) < 200
    assert "50000000 pixels, over the limit of 40000000" in _refusal(bomb, None, "bomb")
    # 2.5 Gpx: Pillow's guard trips while reading the header; still an ImageError.
    assert "too large" in _refusal(_png_header_only(50_000, 50_000), None, "huge")
    data = _encode(_pixels(30, 40), "PNG")
    assert "1200 pixels" in _refusal(data, None, "big", max_pixels=1199)
    decode_image(data, None, item_id="fits", limits=ImageLimits(max_pixels=1200))


def test_byte_limit(tmp_path: Path) -> None:
    data = _encode(_pixels(), "PNG")
    assert "over the limit" in _refusal(data, None, "b", max_bytes=len(data) - 1)
    path = tmp_path / "x.png"
    path.write_bytes(data)
    assert "over the limit" in _refusal(None, str(path), "f", max_bytes=len(data) - 1)


def test_missing_file_bad_scheme_and_http_off(tmp_path: Path) -> None:
    assert "no readable image file" in _refusal(None, str(tmp_path / "nope.jpg"), "gone")
    assert "no readable image file" in _refusal(None, (tmp_path / "nope.jpg").as_uri(), "gone2")
    assert "no readable image file" in _refusal(None, str(tmp_path), "dir")
    assert "unsupported URI scheme" in _refusal(None, "s3://bucket/key.jpg", "s3")
    assert "disabled" in _refusal(None, "http://127.0.0.1:9/x.jpg", "web")
    assert "remote host" in _refusal(None, "file://otherhost/x.jpg", "remote")


def test_exactly_one_source() -> None:
    assert "exactly one" in _refusal(None, None, "none")
    assert "exactly one" in _refusal(b"x", "/tmp/x", "both")


def test_limits_are_validated_and_documented_defaults() -> None:
    assert DEFAULT_LIMITS.max_bytes == 20 * 1024 * 1024
    assert DEFAULT_LIMITS.max_pixels == 40_000_000
    assert DEFAULT_LIMITS.max_pixels < Image.MAX_IMAGE_PIXELS  # Pillow's guard stays behind ours
    with pytest.raises(ValueError, match="max_pixels"):
        ImageLimits(max_pixels=0)


def test_http_download_when_enabled(tmp_path: Path) -> None:
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    arr = _pixels()
    (tmp_path / "a.png").write_bytes(_encode(arr, "PNG"))
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a, **k: None  # type: ignore[attr-defined]
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        on = ImageLimits(allow_http=True, http_timeout_s=5)
        np.testing.assert_array_equal(
            np.asarray(decode_image(None, f"{base}/a.png", item_id="w", limits=on)), arr)
        assert "HTTP 404" in _refusal(None, f"{base}/missing.png", "w404", allow_http=True)
        size = (tmp_path / "a.png").stat().st_size
        assert "over the limit" in _refusal(None, f"{base}/a.png", "wbig", allow_http=True,
                                            max_bytes=size - 1)
    finally:
        httpd.shutdown()
        httpd.server_close()

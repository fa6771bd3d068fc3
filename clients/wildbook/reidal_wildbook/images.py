"""Cutting an annotation out of its media asset.

A Wildbook annotation is usually a box on a larger photo (several animals, scenery);
embedding the whole photo would compare backgrounds, not animals. The crop is encoded as
PNG, which is lossless, so what reidal embeds is exactly the pixels inside the box.
Rotated boxes (Wildbook's ``theta``) are cropped axis-aligned: an assumption, noted in
docs/wildbook.md.
"""

from __future__ import annotations

import io


def crop_to_box(data: bytes, bbox: tuple[int, int, int, int] | None) -> bytes:
    """The PNG bytes of ``bbox`` = (x, y, width, height) of the image in ``data``, clipped
    to the image; ``data`` unchanged when ``bbox`` is None (a whole-image annotation).
    ValueError when the box lies outside the image or the bytes are not an image."""
    if bbox is None:
        return data
    from PIL import Image, UnidentifiedImageError

    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        raise ValueError(f"bounding box {bbox} has no area")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            left, top = max(x, 0), max(y, 0)
            right, bottom = min(x + w, img.width), min(y + h, img.height)
            if right <= left or bottom <= top:
                raise ValueError(f"bounding box {bbox} lies outside the {img.width}x"
                                 f"{img.height} image")
            crop = img.crop((left, top, right, bottom))
            if crop.mode not in ("RGB", "RGBA", "L"):
                crop = crop.convert("RGB")
            out = io.BytesIO()
            crop.save(out, format="PNG")
            return out.getvalue()
    except UnidentifiedImageError:
        raise ValueError("the media asset is not an image PIL can read") from None


__all__ = ["crop_to_box"]

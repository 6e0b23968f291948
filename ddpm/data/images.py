"""Decoding one image file into a square uint8 array, RGB or grey: what the data cache stores for every image."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
from PIL import Image, ImageFile

from ddpm.errors import UserError


class BadImageError(UserError):
    """An image file that cannot be decoded, or that is refused (too large)."""


def decode_image(
    read: Callable[[], Image.Image], name: str, resolution: int, center_crop: bool, max_pixels: int, channels: int = 3
) -> tuple[np.ndarray, bool]:
    """Decode to a (resolution, resolution, channels) uint8 array, RGB or grey (ITU-R 601 luma, PIL's "L");
    returns it and whether it was upsampled."""
    try:
        im = read()
        w, h = im.size
        if w * h > max_pixels:  # checked on the header, before any pixel is decoded
            raise BadImageError(
                f"{name}: {w}x{h} pixels exceeds data.max_image_pixels={max_pixels} (decompression-bomb guard)"
            )
        if getattr(im, "is_animated", False):
            im.seek(0)  # animated GIF/WebP: the first frame
        if im.format == "JPEG":
            im.draft("RGB", (resolution, resolution))  # decode huge JPEGs at a reduced scale
        im.load()
        rgb = _to_rgb(im)
    except BadImageError:
        raise
    except Exception as e:  # PIL raises many types for corrupt, truncated or unsupported files
        raise BadImageError(f"{name}: cannot decode image ({type(e).__name__}: {e})") from None
    w, h = rgb.size
    upsampled = min(w, h) < resolution
    if center_crop:
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        rgb = rgb.crop((left, top, left + side, top + side))
    rgb = rgb.resize((resolution, resolution), Image.Resampling.BICUBIC, reducing_gap=3.0)
    if channels == 1:
        return np.asarray(rgb.convert("L"), dtype=np.uint8)[..., None], upsampled
    return np.asarray(rgb, dtype=np.uint8), upsampled


@contextmanager
def pil_limits_lifted() -> Iterator[None]:
    """While decoding with decode_image: it applies data.max_image_pixels itself, on the header, with a message naming
    the setting (PIL's own guard would fire first with its own limit); a truncated file is an error, not a grey band."""
    saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = None, False
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved


def as_rgb(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 1) grey -> (N, H, W, 3) with equal channels; RGB unchanged. For what reads RGB only: PNGs, grids,
    the metrics' feature networks."""
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):  # 16/32-bit grayscale: rescale, don't clip
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") else max(float(a.max()), 1.0)
        im = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))  # transparent areas become white, not black
        return Image.alpha_composite(background, im).convert("RGB")
    return im.convert("RGB")

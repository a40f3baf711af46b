"""Reading images and label masks robustly: every failure names the file."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class DatasetError(ValueError):
    """Bad dataset input; the message names the file and the problem."""


def read_utf8_text(path: str | Path) -> str:
    """A text file's contents as UTF-8 (a leading BOM dropped). Raises DatasetError naming the file and
    the line (and column) of the first byte that is not UTF-8."""
    path = Path(path)
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DatasetError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at column {col}); "
                           f"save the file as UTF-8") from e


EXIF_ORIENTATION = 0x0112  # the EXIF tag; values 5..8 swap width and height when displayed
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I")  # "I": 16-bit PNG / TIFF in some Pillow versions


def exif_orientation(im: Image.Image) -> int:
    """The EXIF orientation of an opened image (1 = as stored, also when the tag is missing or unreadable)."""
    try:
        value = int(im.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # a malformed EXIF block is not worth failing the image for
        return 1
    return value if 1 <= value <= 8 else 1


def read_rgb(path: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB as displayed: the EXIF orientation (JPEG, PNG, TIFF, WebP) is applied.

    Grayscale, palette and RGBA (composited on black) are converted; 16-bit images are scaled by
    their bit depth (65535 -> 255, i.e. / 257), the same for every image whatever its own range;
    float images are read as [0, 1] when their values lie in it."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: image file is missing")
    try:
        with Image.open(path) as im:
            im.load()
            if exif_orientation(im) != 1:
                im = ImageOps.exif_transpose(im)
            mode = im.mode
            if mode in _SIXTEEN_BIT or mode == "F":
                a = np.asarray(im, dtype=np.float64)
                if mode == "F":
                    hi = a.max() if a.size else 0
                    scale = 255.0 if hi <= 1.0 else 255.0 / (65535.0 if hi > 255 else 255.0)
                else:
                    scale = 255.0 / 65535.0
                a = np.clip(a * scale, 0, 255).round().astype(np.uint8)
                return np.repeat(a[..., None], 3, axis=2)
            if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                a = np.asarray(im, dtype=np.float32)
                rgb = a[..., :3] * (a[..., 3:4] / 255.0)
                return rgb.round().astype(np.uint8)
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except Image.DecompressionBombError as e:
        raise DatasetError(f"{path}: image too large to decode safely: {e}") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"{path}: cannot read image (corrupt or not an image): {e}") from e


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) as displayed (EXIF orientation applied), from the header, without decoding pixels."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: image file is missing")
    try:
        with Image.open(path) as im:
            w, h = im.size
            return (w, h) if exif_orientation(im) >= 5 else (h, w)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise DatasetError(f"{path}: cannot read image (corrupt or not an image): {e}") from e


def read_label_png(path: str | Path) -> np.ndarray:
    """(H, W) uint8 class indices from a palette or grayscale PNG (255 = ignore)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: mask file is missing")
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise DatasetError(f"{path}: mask must be a palette or grayscale PNG of class indices, got mode {im.mode}")
            return np.asarray(im, dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError) as e:
        raise DatasetError(f"{path}: cannot read mask: {e}") from e


def write_label_png(path: str | Path, mask: np.ndarray, palette: np.ndarray) -> None:
    """Palette PNG with ``palette`` (K, 3) uint8; index 255 is drawn white."""
    im = Image.fromarray(mask.astype(np.uint8), mode="P")
    pal = np.zeros((256, 3), np.uint8)
    pal[: len(palette)] = palette[:256]
    pal[255] = (224, 224, 192)
    im.putpalette(pal.ravel().tolist())
    im.save(path)


def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map (bit-interleaved), (n, 3) uint8."""
    pal = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal

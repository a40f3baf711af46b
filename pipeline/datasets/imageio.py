"""Reading images and label masks robustly: every failure names the file."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError


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


def read_rgb(path: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB. Grayscale, palette, RGBA (composited on black) and 16-bit inputs are converted."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: image file is missing")
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                a = np.asarray(im, dtype=np.float64)
                hi = a.max() if a.size else 0
                if mode == "F" and hi <= 1.0:  # float images in [0, 1]
                    scale = 255.0
                else:
                    scale = 255.0 / (65535.0 if hi > 255 else 255.0)
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
    """(height, width) from the header, without decoding pixels."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: image file is missing")
    try:
        with Image.open(path) as im:
            w, h = im.size
            return h, w
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

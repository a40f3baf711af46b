"""Pictures: colourised masks, heatmaps and image grids (galleries, contact sheets)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
from PIL import Image, ImageDraw


def colourise(mask: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) uint8; 255 (ignore) is drawn light grey."""
    pal = np.zeros((256, 3), np.uint8)
    pal[: len(palette)] = palette
    pal[255] = (224, 224, 192)
    return pal[mask]


def overlay(image: np.ndarray, mask: np.ndarray, palette: np.ndarray, alpha: float = 0.55,
            background: bool = True) -> np.ndarray:
    """The mask's colours blended over the image where it names a class (0 is left clear as the
    background, unless ``background`` is False: then every class but 255 is drawn)."""
    col = colourise(mask, palette).astype(np.float32)
    out = image.astype(np.float32)
    blend = ((mask > 0) if background else (mask != 255))[..., None]
    out = np.where(blend, (1 - alpha) * out + alpha * col, out)
    return out.round().astype(np.uint8)


def heatmap(image: np.ndarray, score: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a [0, 1] score map (any size; resized to the image) as a jet heatmap."""
    h, w = image.shape[:2]
    s = cv2.resize(np.clip(score, 0, 1).astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    jet = cv2.applyColorMap((s * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
    return ((1 - alpha) * image + alpha * jet).round().astype(np.uint8)


def grid(rows: Sequence[Sequence[np.ndarray]], titles: Sequence[str] | None = None, cell: int = 128,
         row_labels: Sequence[str] | None = None) -> np.ndarray:
    """Tile images (any sizes) into cells of ``cell`` px with optional column titles and row labels."""
    ncol = max(len(r) for r in rows)
    top = 14 if titles else 0
    left = 70 if row_labels else 0
    canvas = Image.new("RGB", (left + ncol * (cell + 2), top + len(rows) * (cell + 2)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, t in enumerate(titles or []):
        draw.text((left + j * (cell + 2) + 2, 1), str(t)[:20], fill=(0, 0, 0))
    for i, row in enumerate(rows):
        if row_labels:
            draw.text((2, top + i * (cell + 2) + cell // 2 - 6), str(row_labels[i])[:11], fill=(0, 0, 0))
        for j, im in enumerate(row):
            h, w = im.shape[:2]
            s = cell / max(h, w)
            im = cv2.resize(im, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_NEAREST)
            canvas.paste(Image.fromarray(im), (left + j * (cell + 2), top + i * (cell + 2)))
    return np.asarray(canvas)


def save_png(path: str | Path, image: np.ndarray) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def save_figure(fig, path: str | Path) -> Path:
    """Save a matplotlib figure as PNG (creating the folder) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path

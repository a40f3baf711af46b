"""The no-background demo: synthetic scenes where every pixel is a labelled class, in folder layout.

Each scene is tiled by two or three "stuff" regions (sky, grass, water, wall) split by wavy borders,
with up to two "things" (disk, square, triangle) on top; nothing is background. A stuff class is
told by its texture (a family of patterns, each class its own) and a hue range with wide jitter; a
thing by its shape only (random colour and texture, as in the object demo). Written as the folder
dataset reads it with ``data.background: false`` (``classes.txt`` without background, masks whose
value 0 is the first class), so the demo runs the same reader users point at their own scenes.
Deterministic from ``data.demo_seed``; GT masks are there for evaluation only.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from pipeline.datasets.demo import _shape_mask, _texture
from pipeline.datasets.folder import FolderDataset
from pipeline.datasets.imageio import voc_palette, write_label_png
from pipeline.registry import DATASETS

STUFF = ["sky", "grass", "water", "wall"]
THINGS = ["disk", "square", "triangle"]
STUFF_CLASSES = STUFF + THINGS
_SHAPE_OF_THING = {"disk": 1, "square": 2, "triangle": 3}  # the object demo's shape codes
_HUE = {"sky": (95, 125), "grass": (35, 75), "water": (80, 110), "wall": (0, 25)}  # OpenCV hue 0..180


def _colour(rng, hue: tuple[int, int]) -> np.ndarray:
    hsv = np.uint8([[[rng.integers(*hue), rng.integers(60, 230), rng.integers(90, 250)]]])
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32) / 255.0


def stuff_texture(rng, name: str, h: int, w: int) -> np.ndarray:
    """(H, W, 3) float in [0, 1]: the pattern family of stuff class ``name`` with random parameters."""
    c1, c2 = _colour(rng, _HUE[name]), _colour(rng, _HUE[name])
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if name == "sky":  # smooth vertical gradient, faint noise
        t = yy / max(h - 1, 1) * rng.uniform(0.5, 1.0) + rng.normal(0, 0.03, (h, w))
    elif name == "grass":  # fine vertical streaks
        f = rng.uniform(0.8, 1.6)
        t = 0.5 + 0.5 * np.sin(f * xx + rng.uniform(0, 6.3) + 0.6 * np.sin(0.3 * yy)) * rng.uniform(0.6, 1.0)
    elif name == "water":  # broad horizontal waves
        f = rng.uniform(0.25, 0.5)
        t = 0.5 + 0.5 * np.sin(f * yy + 1.5 * np.sin(0.08 * xx + rng.uniform(0, 6.3)))
    elif name == "wall":  # bricks: offset rows of blocks with mortar lines
        bh, bw = int(rng.integers(6, 10)), int(rng.integers(12, 20))
        row = (yy // bh).astype(int)
        col = ((xx + (row % 2) * bw / 2) // bw).astype(int)
        mortar = ((yy % bh) < 1.5) | (((xx + (row % 2) * bw / 2) % bw) < 1.5)
        t = np.where(mortar, 1.0, ((row * 7 + col * 3) % 5) / 10.0)
    else:
        raise ValueError(f"unknown stuff class {name!r}")
    t = np.clip(t, 0, 1)[..., None]
    return np.clip(c1 * (1 - t) + c2 * t, 0, 1)


def _wavy_bands(rng, h: int, w: int, n: int) -> np.ndarray:
    """(H, W) int band index 0..n-1, split by n-1 wavy, roughly horizontal borders."""
    xx = np.arange(w, dtype=np.float32)
    cuts = np.sort(rng.uniform(0.25, 0.75, n - 1)) if n > 2 else np.array([rng.uniform(0.35, 0.65)])
    band = np.zeros((h, w), np.int64)
    yy = np.arange(h, dtype=np.float32)[:, None]
    for c in cuts[: n - 1]:
        border = c * h + rng.uniform(0.03, 0.1) * h * np.sin(rng.uniform(0.03, 0.12) * xx + rng.uniform(0, 6.3))
        band += (yy >= border[None, :]).astype(np.int64)
    return band


def render_scene(seed: int, index: int, min_side: int, max_side: int) -> tuple[np.ndarray, np.ndarray]:
    """One scene: ((H, W, 3) uint8 RGB, (H, W) uint8 class indices into :data:`STUFF_CLASSES`; no 255)."""
    rng = np.random.default_rng([seed, index, 7])
    h, w = (int(rng.integers(min_side, max_side + 1)) for _ in range(2))
    n = int(rng.choice([2, 3], p=[0.6, 0.4]))
    stuff = [int(k) for k in rng.choice(len(STUFF), n, replace=False)]
    band = _wavy_bands(rng, h, w, n)
    img = np.zeros((h, w, 3), np.float32)
    gt = np.zeros((h, w), np.uint8)
    for b, k in enumerate(stuff):
        m = band == b
        img[m] = stuff_texture(rng, STUFF[k], h, w)[m]
        gt[m] = k
    side = min(h, w)
    for _ in range(int(rng.choice([0, 1, 2], p=[0.3, 0.45, 0.25]))):
        thing = THINGS[int(rng.integers(len(THINGS)))]
        r = rng.uniform(0.12, 0.26) * side
        cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
        m = _shape_mask(_SHAPE_OF_THING[thing], h, w, cx, cy, r, rng.uniform(0, 2 * np.pi))
        if m.sum() < 20:
            continue
        img[m] = _texture(rng, h, w)[m]
        gt[m] = STUFF_CLASSES.index(thing)
    img = img + rng.normal(0, 0.03, img.shape)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8), gt


def scene_labels(gt: np.ndarray, min_pixels: int = 20) -> list[str]:
    """The image-level labels of a scene: the classes with at least ``min_pixels`` pixels."""
    counts = np.bincount(gt.ravel(), minlength=len(STUFF_CLASSES))
    return [STUFF_CLASSES[k] for k in np.flatnonzero(counts >= min_pixels)]


def generate_stuff(root: str | Path, seed: int, num_images: int, min_side: int, max_side: int,
                   progress: bool = True) -> Path:
    """Write ``num_images`` scenes in folder layout under ``root`` (images/, masks/, labels.csv,
    classes.txt); the folder reader's hash split makes train and val. Returns ``root``."""
    from PIL import Image

    from pipeline.progress import progress_bar

    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    palette = voc_palette(256)
    rows = ["image,labels"]
    with progress_bar(total=num_images, desc="demo_stuff scenes", unit="img", disable=not progress) as bar:
        for i in range(num_images):
            image_id = f"scene_{i:05d}"
            img, gt = render_scene(seed, i, min_side, max_side)
            Image.fromarray(img).save(root / "images" / f"{image_id}.jpg", quality=92)
            write_label_png(root / "masks" / f"{image_id}.png", gt, palette)
            rows.append(f"{image_id}.jpg,{';'.join(scene_labels(gt))}")
            bar.update(1)
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    (root / "classes.txt").write_text("\n".join(STUFF_CLASSES) + "\n")
    return root


@DATASETS.register("demo_stuff")
class DemoStuffDataset(FolderDataset):
    """The generated no-background scenes, read by the folder reader without background."""

    name = "demo_stuff"

    @classmethod
    def from_params(cls, data: dict, prepared_dir: Path) -> "DemoStuffDataset":
        root = Path(prepared_dir) / "demo_stuff"  # generated inside the prepare stage's output
        return cls(root, csv=root / "labels.csv", classes=root / "classes.txt", images=root / "images",
                   val_fraction=data["folder_val_fraction"], background=False)

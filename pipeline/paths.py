"""Where the graph keeps its files, relative to the project root: one table that the stages, dvc.yaml
(checked by tests/test_config.py), the report, ``wsss quality``, ``wsss ablate`` and the CLI read.

Stages run with the project root as their working directory (``dvc repro``, ``wsss stage``); what
crosses to another process or machine is made absolute first (see :mod:`pipeline.refine.runner`).
"""
from __future__ import annotations

from pathlib import Path

# inputs and stores
DATASET_DIGEST = Path("data/dataset_digest.json")
DIGEST_CACHE = Path("data/.dataset_digest_cache.json")  # (size, mtime) -> sha256 of each dataset file
SALIENCY_DIGEST = Path("data/saliency_digest.json")
SALIENCY_CACHE = Path("data/.saliency_digest_cache.json")
PREPARED = Path("data/prepared")
SALIENCY = Path("data/saliency.zarr")
CAMS = Path("data/cams.zarr")
SEEDS = Path("data/seeds.zarr")
PSEUDO = Path("data/pseudo.zarr")
INSTANCES = Path("data/instances.zarr")
PREDICTIONS = Path("data/predictions.zarr")

# models
CAM_MODEL = Path("models/cam")
AFF_MODEL = Path("models/affinity")
SEG_MODEL = Path("models/seg")
UPPER_BOUND_MODEL = Path("models/seg_gt")  # the upper_bound stage: GT-trained segmenter and its predictions

# what a person reads
METRICS_DIR = Path("metrics")
METRICS = {  # key -> the metrics file a stage writes (the keys wsss quality and the report use)
    "data": METRICS_DIR / "data.json",  # prepare
    "saliency": METRICS_DIR / "saliency.json",  # saliency
    "train_cam": METRICS_DIR / "train_cam.json",  # train_cam
    "cam": METRICS_DIR / "cam.json",  # make_cam
    "crf": METRICS_DIR / "crf.json",  # crf
    "rw": METRICS_DIR / "rw.json",  # random_walk
    "instances": METRICS_DIR / "instances.json",  # instances
    "segmenter": METRICS_DIR / "segmenter.json",  # evaluate
    "labels": METRICS_DIR / "labels.json",  # evaluate: cam + crf + rw merged
    "upper_bound": METRICS_DIR / "segmenter_gt.json",  # upper_bound: the GT-trained segmenter (seg.upper_bound)
}
PLOTS = Path("plots")  # plots/<stage>/...
REPORTS = Path("reports")
EXPORTS = Path("exports/pseudo_masks")

# backwards-compatible names of three metrics files
CAM_METRICS = METRICS["cam"]
LABEL_METRICS = METRICS["labels"]
SEG_METRICS = METRICS["segmenter"]

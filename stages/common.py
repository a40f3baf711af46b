"""What every stage shares: where its files live (re-exported from :mod:`pipeline.paths`) and how it starts."""
from __future__ import annotations

import logging
from pathlib import Path

from pipeline.config import load_params
from pipeline.paths import (AFF_MODEL, CAM_METRICS, CAM_MODEL, CAMS, DATASET_DIGEST, DIGEST_CACHE,
                            EXPORTS, INSTANCES, LABEL_METRICS, METRICS, PLOTS, PREDICTIONS, PREPARED, PSEUDO,
                            REPORTS, SALIENCY, SALIENCY_CACHE, SALIENCY_DIGEST, SEEDS, SEG_METRICS, SEG_MODEL)
from pipeline.progress import setup_logging
from pipeline.workspace_lock import hold_workspace_lock

__all__ = ["AFF_MODEL", "CAM_METRICS", "CAM_MODEL", "CAMS", "DATASET_DIGEST", "DIGEST_CACHE", "EXPORTS", "INSTANCES",
           "LABEL_METRICS", "METRICS", "PLOTS", "PREDICTIONS", "PREPARED", "PSEUDO", "REPORTS", "SALIENCY",
           "SALIENCY_CACHE", "SALIENCY_DIGEST", "SEEDS", "SEG_METRICS", "SEG_MODEL", "cam_best_threshold", "resume_file",
           "start", "start_training", "torch_device"]


def resume_file(model_dir: Path) -> Path:
    """Where a training stage keeps its per-epoch resume checkpoint: ``models/<name>.partial/resume.pt``,
    beside the DVC output (DVC deletes outputs before a stage runs; this survives for the resume)."""
    return model_dir.with_name(model_dir.name + ".partial") / "resume.pt"


def cam_best_threshold() -> float | None:
    """The best background threshold of make_cam's train sweep (``metrics/cam.json``), or None
    when there was no sweep; the ``cam_sweep`` settings of crf and random_walk use it."""
    from pipeline.metrics import read_json

    return (read_json(CAM_METRICS) or {}).get("best_threshold")


def start(stage: str, params_file: str = "params.yaml", training: bool = False) -> dict:
    """Take the workspace lock (one stage at a time, :mod:`pipeline.workspace_lock`), set up logging
    and return the validated params. A distributed training worker runs under its launcher's lock;
    a ``training`` stage with ``compute.nodes`` > 1 is started by every node in the same workspace,
    so the cluster tool that starts them, not the lock, keeps it to one run."""
    from pipeline.distributed import is_worker

    params = load_params(params_file)
    multi_node = training and params["compute"]["nodes"] > 1
    if not is_worker() and not multi_node:
        hold_workspace_lock(stage)
    setup_logging()
    logging.getLogger("wsss").info("stage %s: starting", stage)
    return params


def start_training(stage: str, namespace: str) -> tuple[dict, object] | None:
    """A training stage's start: :func:`start`, then either launch the stage's workers under
    torch.distributed.run and return None once they finished (``compute.procs_per_node`` x
    ``compute.nodes`` > 1, :mod:`pipeline.distributed`), or return (params, device) for this process
    to train: one process, or a worker that has joined the process group. ``namespace``: the params
    namespace whose ``num_workers`` data loader workers the stage runs."""
    from pipeline.distributed import init_worker, launch, worker_device

    params = start(stage, training=True)
    if launch(stage, params["compute"]):
        return None
    device = worker_device(torch_device(params, params[namespace]["num_workers"], seed=True))
    init_worker(device)
    return params, device


def torch_device(params: dict, loader_workers: int = 0, seed: bool = False):
    """The torch device of a stage (``compute.device``), its CPU threads set, and for training stages
    every RNG seeded from ``compute.seed``."""
    from pipeline.compute import resolve_device, seed_everything, set_torch_threads

    if seed:
        seed_everything(params["compute"]["seed"])
    device = resolve_device(params["compute"]["device"])
    set_torch_threads(params["compute"], device, loader_workers)
    return device

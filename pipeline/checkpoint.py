"""Checkpoint files: written atomically, read with ``weights_only=True``.

Each model module owns its checkpoint's contents (``models.classifier.save_classifier`` /
``load_classifier``, ``models.affinity.save_affinity_net`` / ``load_affinity_net``,
``models.segmenter.save_segmenter`` / ``load_segmenter``; the training resume file in
``training.ResumePoint``); this module is the one way they reach the disk.
"""
from __future__ import annotations

from pathlib import Path

import torch

from pipeline.distributed import is_main


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """torch.save to a temp name, then rename (a killed run never leaves a truncated checkpoint).
    A failed write (full disk, read-only folder) removes the temp file and raises OSError naming the path.
    Under distributed training only rank 0 writes (:mod:`pipeline.distributed`); the others return at once."""
    path = Path(path)
    if not is_main():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(state, tmp)
        tmp.replace(path)
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        raise OSError(f"cannot write checkpoint {path}: {e}") from e
    return path


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read (the message names the file and the cause)."""


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """The dict a :func:`save_checkpoint` wrote; FileNotFoundError naming the stage to run when absent,
    CheckpointError naming the file and the cause when it cannot be read (truncated, not a checkpoint)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}; run the stage that trains it (see dvc.yaml)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except OSError as e:
        raise OSError(f"cannot read checkpoint {path}: {e.strerror or e}") from e
    except Exception as e:  # torch raises RuntimeError / UnpicklingError / EOFError for a damaged file
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'}); "
                              "it is truncated or not a checkpoint of this pipeline: re-run the stage that "
                              "writes it") from e

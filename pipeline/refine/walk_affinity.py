"""The affinity model a walk uses (``rw.affinity``: the trained AffinityNet, the training-free
features, or both), loaded once per worker process and run on one image."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

Offsets = Sequence[tuple[int, int]]


@lru_cache(maxsize=2)
def _load_cached(path: str, stamp: int, device: str, kind: str, colour_sigma: float):
    from pipeline.refine.feature_affinity import load_walk_affinity

    return load_walk_affinity(path, {"affinity": kind, "colour_sigma": colour_sigma}, device)


def cached_affinity_model(path: str | Path, device: str, rw: dict | None = None):
    """The affinity model at ``path`` for ``rw.affinity`` (default the trained AffinityNet), loaded once
    per worker process (reloaded when the file changes)."""
    rw = rw or {}
    return _load_cached(str(path), Path(path).stat().st_mtime_ns, device, rw.get("affinity", "affinitynet"),
                        float(rw.get("colour_sigma", 0.0)))


def image_affinities(model, image: np.ndarray, offsets: Offsets) -> torch.Tensor:
    """(H, W, 3) uint8 -> (P, ceil(H/s), ceil(W/s)) affinities (on the model's device)."""
    from pipeline.augment import normalise

    device = next(model.parameters()).device
    with torch.no_grad():
        x = normalise(image)[None].to(device)
        return model(x, offsets)[0].float()


def image_relations(model, image: np.ndarray, offsets: Offsets) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, W, 3) uint8 -> (affinities (P, h, w) on the model's device, displacement field (2, h, w) on
    the CPU), one backbone pass."""
    from pipeline.augment import normalise

    device = next(model.parameters()).device
    with torch.no_grad():
        aff, disp = model.relations(normalise(image)[None].to(device), offsets)
    return aff[0].float(), disp[0].float().cpu()

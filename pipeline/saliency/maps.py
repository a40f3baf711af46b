"""What every saliency source shares: the error a bad map or model raises, and min-max scaling."""
from __future__ import annotations

import numpy as np


class SaliencyError(ValueError):
    """A saliency map or model that is missing, unreadable or malformed (the message names the file)."""


def min_max(sal: np.ndarray) -> np.ndarray:
    """A map scaled to [0, 1] (all zeros when it is constant), float32."""
    lo, hi = float(sal.min()), float(sal.max())
    return ((sal - lo) / (hi - lo) if hi > lo else np.zeros_like(sal)).astype(np.float32)

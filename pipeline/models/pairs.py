"""The pixel pairs AffinityNet and the random walk work on, on a fixed stride grid.

Pairs are the half-plane ``pair_offsets(radius)`` (each unordered pair once): offset ``(dy, dx)``
pairs grid cell ``(y, x)`` with ``(y + dy, x + dx)``. :func:`shifted` moves a map by an offset,
:func:`in_bounds` marks partners inside the grid, :func:`seed_to_grid` samples a seed mask onto the
grid and :func:`pair_labels` labels each pair from it (same class, different class, unknown).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from pipeline.labels import IGNORE_INDEX


def pair_offsets(radius: int) -> list[tuple[int, int]]:
    """Half-plane offsets (dy, dx) with 0 < dy^2 + dx^2 < radius^2 (radius 5 -> 34 offsets)."""
    if radius < 1:
        raise ValueError(f"param affinity.radius: must be >= 1, got {radius}")
    out = [(0, dx) for dx in range(1, radius)]
    out += [(dy, dx) for dy in range(1, radius) for dx in range(-radius + 1, radius) if dy * dy + dx * dx < radius * radius]
    return out


def shifted(x: torch.Tensor, dy: int, dx: int, fill: float = 0.0) -> torch.Tensor:
    """``out[..., y, x] = x[..., y + dy, x + dx]`` with ``fill`` where that falls outside."""
    h, w = x.shape[-2:]
    out = torch.full_like(x, fill)
    ys, yd = (slice(dy, h), slice(0, h - dy)) if dy >= 0 else (slice(0, h + dy), slice(-dy, h))
    xs, xd = (slice(dx, w), slice(0, w - dx)) if dx >= 0 else (slice(0, w + dx), slice(-dx, w))
    if ys.stop - ys.start > 0 and xs.stop - xs.start > 0:
        out[..., yd, xd] = x[..., ys, xs]
    return out


def in_bounds(h: int, w: int, offsets: Sequence[tuple[int, int]], device=None) -> torch.Tensor:
    """(P, h, w) bool: the partner of cell (y, x) under offset p lies inside the grid."""
    ones = torch.ones(1, h, w, dtype=torch.bool, device=device)
    return torch.cat([shifted(ones, dy, dx, fill=False) for dy, dx in offsets], 0)


def grid_size(size: Sequence[int], stride: int) -> tuple[int, int]:
    return math.ceil(int(size[0]) / stride), math.ceil(int(size[1]) / stride)

def segment_points(dy: int, dx: int) -> list[tuple[int, int]]:
    """Grid cells on the straight segment from (0, 0) to (dy, dx), both ends included."""
    n = max(abs(dy), abs(dx))
    return sorted({(round(t * dy / n), round(t * dx / n)) for t in range(n + 1)}) if n else [(0, 0)]

def seed_to_grid(seed: np.ndarray, stride: int) -> np.ndarray:
    """Full-resolution (H, W) uint8 seed -> (ceil(H/s), ceil(W/s)) by sampling each cell's centre pixel."""
    h, w = seed.shape
    gh, gw = grid_size((h, w), stride)
    ys = np.minimum(np.arange(gh) * stride + stride // 2, h - 1)
    xs = np.minimum(np.arange(gw) * stride + stride // 2, w - 1)
    return seed[np.ix_(ys, xs)]


def pair_labels(seed_grid: torch.Tensor, offsets: Sequence[tuple[int, int]], background: bool = True):
    """(B, h, w) long seeds on the grid -> (bg_pos, fg_pos, neg) masks, each (B, P, h, w) bool.

    Same class -> positive (background and foreground kept apart), different classes -> negative,
    a 255 at either end or a partner outside the grid -> in none of the three. Without
    ``background`` (class 0 is a class like the others) every same-class pair is in ``fg_pos`` and
    ``bg_pos`` is empty.
    """
    a = seed_grid.unsqueeze(1)
    b = torch.stack([shifted(seed_grid, dy, dx, fill=IGNORE_INDEX) for dy, dx in offsets], 1)
    known = (a != IGNORE_INDEX) & (b != IGNORE_INDEX)
    same = known & (a == b)
    if not background:
        return torch.zeros_like(same), same, known & (a != b)
    return same & (a == 0), same & (a != 0), known & (a != b)

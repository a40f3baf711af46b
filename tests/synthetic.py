"""Synthetic inputs for the refiners' tests and benchmarks: a tiny prepared demo dataset and a CAM
store made from its ground truth (blurred, shifted, noisy class masks), written with StoreWriter
exactly as the make_cam stage writes data/cams.zarr."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from pipeline.store import ArraySpec, StoreWriter, write_store


def tiny_demo(root: str | Path, num_train: int = 6, num_val: int = 2, side: tuple[int, int] = (48, 64), seed: int = 0):
    """Generate and prepare a tiny demo dataset under ``root``. Returns (params, prepared_dir)."""
    from pipeline.presets import preset
    from pipeline.prepare import prepare_dataset

    root = Path(root)
    params = preset("tiny")
    params["data"].update({"root": str(root / "demo"), "demo_num_train": num_train, "demo_num_val": num_val,
                           "demo_min_side": side[0], "demo_max_side": side[1], "demo_seed": seed})
    prepared_dir = root / "prepared"
    prepare_dataset(params["data"], prepared_dir, shard_images=params["compute"]["shard_images"])
    return params, prepared_dir


def fake_cam(gt: np.ndarray, classes, num_fg: int, stride: int, rng: np.random.Generator, blur: float = 0.15,
             shift: int = 2, noise: float = 0.1) -> np.ndarray:
    """(C-1, ceil(H/s), ceil(W/s)) float16 CAM-like maps in [0, 1] from a GT mask."""
    h, w = gt.shape
    gh, gw = -(-h // stride), -(-w // stride)
    cam = np.zeros((num_fg, gh, gw), np.float32)
    sigma = max(1.0, blur * min(h, w))
    for c in classes:
        m = (gt == c).astype(np.float32)
        m = np.roll(m, tuple(rng.integers(-shift, shift + 1, 2)), axis=(0, 1))
        m = cv2.GaussianBlur(m, (0, 0), sigma) + noise * rng.random((h, w)).astype(np.float32)
        canvas = np.zeros((gh * stride, gw * stride), np.float32)
        canvas[:h, :w] = m
        g = cv2.resize(canvas, (gw, gh), interpolation=cv2.INTER_AREA)
        cam[c - 1] = g / max(float(g.max()), 1e-6)
    return cam.astype(np.float16)


def write_fake_cams(prepared, ids, path: str | Path, stride: int = 4, seed: int = 0, shard_images: int = 8, **kw) -> Path:
    """A CAM store (array "cam") for ``ids`` of a PreparedData, from its GT."""
    rng = np.random.default_rng(seed)
    num_fg = prepared.num_classes - 1
    ids = list(ids)
    w = StoreWriter(path, ids, prepared.sizes(ids), {"cam": ArraySpec("float16", stride=stride, channels=num_fg, fill=0)},
                    {"class_names": prepared.class_names, "stride": stride, "method": "synthetic", "params": {},
                     "split": "train"}, shard_images=shard_images)
    for s in w.pending_shards():
        idx = w.shard_indices(s)
        w.write_shard(s, {"cam": [fake_cam(prepared.gt(ids[i]), prepared.labels(ids[i]), num_fg, stride, rng, **kw)
                                  for i in idx]})
    return w.commit()


def tiny_demo_with_cams(root: str | Path, num_train: int = 6, crf_iterations: int | None = None,
                        **compute) -> tuple[dict, Path, Path]:
    """A tiny demo (one val image) and fake CAMs of its train images at root/cams.zarr, as the refiner
    tests start from. ``compute`` updates ``params["compute"]`` (default: shards of 2 images).
    Returns (params, prepared_dir, cams_path)."""
    from pipeline.datasets import PreparedData

    params, prepared_dir = tiny_demo(root, num_train=num_train, num_val=1)
    prepared = PreparedData(params["data"], prepared_dir)
    cams = write_fake_cams(prepared, prepared.ids("train"), Path(root) / "cams.zarr", stride=4)
    if crf_iterations is not None:
        params["crf"]["iterations"] = crf_iterations
    params["compute"].update({"shard_images": 2, **compute})
    return params, prepared_dir, cams


def tiny_data_with_gt_seeds(tmp_path: str | Path, num_train: int = 4):
    """A tiny demo and a seed store at tmp_path/seeds.zarr holding its ground truth.
    Returns (params, PreparedData, train ids)."""
    from pipeline.datasets import PreparedData

    params, prepared_dir = tiny_demo(tmp_path, num_train=num_train, num_val=1)
    prepared = PreparedData(params["data"], prepared_dir)
    ids = prepared.ids("train")
    write_store(Path(tmp_path) / "seeds.zarr", ids, prepared.sizes(ids), {"seed": ArraySpec("uint8", fill=255)}, {},
                lambda idx: {"seed": [prepared.gt(ids[i]) for i in idx]}, shard_images=4)
    return params, prepared, ids


GRAPH = ("prepare", "saliency", "train_cam", "make_cam", "crf", "train_aff", "random_walk", "instances", "train_seg",
         "upper_bound", "evaluate", "export")


def run_stages(work: str | Path, params: dict, stages=GRAPH, env: dict | None = None) -> Path:
    """Write ``params`` as ``work/params.yaml`` and run each stage's ``main`` in order with ``work`` as
    the working directory (and ``env`` set), as ``dvc repro`` would. Returns ``work``."""
    import importlib

    import pytest

    from pipeline.config import render_params

    work = Path(work)
    (work / "params.yaml").write_text(render_params(params))
    mp = pytest.MonkeyPatch()
    mp.chdir(work)
    for key, value in (env or {}).items():
        mp.setenv(key, value)
    try:
        for name in stages:
            importlib.import_module(f"stages.{name}").main()
    finally:
        mp.undo()
    return work

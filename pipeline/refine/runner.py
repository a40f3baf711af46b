"""Running per-image work over a store: inputs opened once per process (prepared data, stores,
CAMs of an image), the loop that maps a per-image function through the dask helper into a
resumable store and scores it, and the CAM-sweep threshold the ``cam_sweep`` settings need.
Label conventions (ignore value, background channel, grid upsampling) are in ``pipeline.labels``."""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np


def required_cam_threshold(setting: str, cam_threshold: float | None) -> float:
    """The CAM sweep's best threshold for a ``cam_sweep`` setting (named in ``setting``, e.g.
    ``rw.background``); a clear error when there was no sweep (no train image has GT)."""
    if cam_threshold is None:
        raise ValueError(f"param {setting}=cam_sweep: the CAM threshold sweep has no best threshold (metrics/cam.json "
                         f"needs train images with GT); set {setting}: fixed")
    return float(cam_threshold)


@lru_cache(maxsize=4)
def _prepared_cached(prepared_dir: str, data_json: str, stamp: float):
    from pipeline.datasets import PreparedData

    return PreparedData(json.loads(data_json), prepared_dir)


def open_prepared(prepared_dir: str | Path, data_params: dict):
    """PreparedData, opened once per process (worker processes reuse it across images)."""
    idx = Path(prepared_dir) / "index.json"
    stamp = idx.stat().st_mtime if idx.exists() else 0.0
    return _prepared_cached(str(prepared_dir), json.dumps(data_params, sort_keys=True), stamp)


@lru_cache(maxsize=8)
def _store_cached(path: str, stamp: float):
    from pipeline.store import Store

    return Store(path)


def open_store(path: str | Path):
    """A committed Store, opened once per process; a rewritten store is reopened."""
    meta = Path(path) / "zarr.json"
    stamp = meta.stat().st_mtime_ns if meta.exists() else 0.0
    return _store_cached(str(path), stamp)


def saliency_store_fingerprint(path: str | Path | None, param: str) -> str:
    """The fingerprint of the saliency store a stage reads (its resume key); a clear error when the
    saliency stage has not written it."""
    if path is None or not (Path(path) / "zarr.json").is_file():
        raise FileNotFoundError(f"param {param}: the saliency maps are not there ({path}); run the saliency stage")
    return open_store(path).attrs.get("fingerprint")


def read_cams(cams_path: str | Path, image_id: str, classes: Sequence[int]) -> tuple[np.ndarray, int]:
    """The CAMs of ``classes`` for one image: ((K, gh, gw) float32 in [0, 1], grid stride). The store's
    attrs say whether its classes start after a background (channel k-1 = class k) or not (channel k)."""
    from pipeline.labels import class_channels

    store = open_store(cams_path)
    cam = store.read("cam", image_id)
    idx = class_channels(classes, bool(store.attrs.get("background", True)))
    if idx and max(idx) >= cam.shape[0]:
        raise ValueError(f"{cams_path}: image {image_id!r} has class {max(classes)} but the store has {cam.shape[0]} channels")
    return np.clip(cam[idx].astype(np.float32), 0.0, 1.0), int(store.specs["cam"].stride)


@dataclass(frozen=True)
class ImageTask:
    """What every per-image worker task carries (small and picklable); each refiner's task adds its own
    fields. Paths are made absolute when the task is made (fields ending in ``_dir``, ``_path`` or
    ``_store``, and ``data.root``), so a dask worker started in another folder, or on another machine
    that mounts the same paths, reads this run's files and never its own folder's."""

    image_id: str
    prepared_dir: str
    data: dict
    cams_path: str

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith(("_dir", "_path", "_store")) and isinstance(value, (str, Path)):
                object.__setattr__(self, f.name, str(Path(value).resolve()))
        if isinstance(self.data, dict) and self.data.get("root"):
            object.__setattr__(self, "data", {**self.data, "root": str(Path(self.data["root"]).resolve())})


def task_inputs(task: ImageTask) -> tuple:
    """What every per-image worker task starts from (a task with image_id, prepared_dir, data,
    cams_path, torch_threads): sets the worker's torch threads, returns (image, classes, cam_grid,
    cam_stride) with the CAMs of the image's labelled classes."""
    import torch

    from pipeline.labels import present_classes

    if task.torch_threads:
        torch.set_num_threads(task.torch_threads)
    prepared = open_prepared(task.prepared_dir, task.data)
    classes = present_classes(prepared.labels(task.image_id))
    cam_grid, cam_stride = read_cams(task.cams_path, task.image_id, classes)
    return prepared.image(task.image_id), classes, cam_grid, cam_stride


def quiet_dask_logs() -> None:
    """The stage log shows one line per stage; distributed's per-worker INFO lines drown it."""
    import logging

    for name in ("distributed", "distributed.nanny", "distributed.scheduler", "distributed.core"):
        logging.getLogger(name).setLevel(logging.WARNING)


def map_over_store(run: Callable, fn: Callable, tasks: Sequence, writer, array: str,
                   on_result: Callable[[int, np.ndarray], None] | None = None, desc: str = "") -> dict:
    """Fill ``writer`` (a StoreWriter) shard by shard with ``run(fn, tasks[shard])``; resumes past
    finished shards; ``on_result(index, array)`` sees every image's ``array`` (including resumed ones,
    re-read). ``fn`` returns that array, or a dict {array name: array} when the store has several."""
    from pipeline.progress import progress_bar

    pending = writer.pending_shards()
    done_shards = [s for s in range(writer.n_shards) if s not in pending]
    with progress_bar(total=len(tasks), desc=desc, unit="img") as bar:
        for s in done_shards:  # resumed: feed metrics from what is already written
            idx = writer.shard_indices(s)
            if on_result is not None:
                z = writer.group[array]
                for i in idx:
                    gh, gw = writer.specs[array].grid(writer.sizes[i])
                    on_result(i, np.asarray(z[i, :gh, :gw]))
            bar.update(len(idx))
        for s in pending:
            idx = list(writer.shard_indices(s))
            results = run(fn, [tasks[i] for i in idx])
            if results and isinstance(results[0], dict):
                writer.write_shard(s, {name: [r[name] for r in results] for name in results[0]})
                results = [r[array] for r in results]
            else:
                writer.write_shard(s, {array: results})
            if on_result is not None:
                for i, r in zip(idx, results):
                    on_result(i, r)
            bar.update(len(idx))
    return {"resumed_shards": len(done_shards), "computed_shards": len(pending)}


def write_scored_label_store(prepared, ids: Sequence[str], out_path, array: str, attrs: dict, fn: Callable,
                             tasks: Sequence, compute: dict, desc: str, extra_arrays: dict | None = None) -> dict:
    """Map ``fn`` over ``tasks`` through dask into a full-resolution uint8 label store ``out_path``
    (array ``array``, 255 = unsure), scoring every image against GT as it arrives. With
    ``extra_arrays`` ({name: ArraySpec}, stored beside it) ``fn`` returns {name: array} for all of them.

    Returns the ConfusionMatrix summary plus ``seconds``, ``resumed_shards``, ``computed_shards``.
    """
    import time

    from pipeline.compute import dask_client
    from pipeline.metrics import ConfusionMatrix
    from pipeline.labels import IGNORE_INDEX
    from pipeline.store import ArraySpec, StoreWriter

    specs = {array: ArraySpec("uint8", stride=1, fill=IGNORE_INDEX), **(extra_arrays or {})}
    writer = StoreWriter(out_path, ids, prepared.sizes(ids), specs, attrs, shard_images=compute["shard_images"])
    cm = ConfusionMatrix(prepared.num_classes)

    def score(i, labels):
        gt = prepared.gt(ids[i])
        if gt is not None:
            cm.update(labels, gt)

    t0 = time.perf_counter()
    quiet_dask_logs()
    with dask_client(compute["scheduler"], compute["workers"]) as run:
        run_info = map_over_store(run, fn, tasks, writer, array, on_result=score, desc=desc)
    writer.commit()
    metrics = cm.summary(prepared.class_names)
    metrics.update({"seconds": round(time.perf_counter() - t0, 2), **run_info})
    return metrics

"""The export: :func:`run_export`, used by the ``export`` stage and ``wsss export``. It checks the
target (:mod:`.target`), validates every mask while the format writers (:data:`.formats.WRITERS`)
write them into a hidden work folder, scores them against GT on the first pass, writes each
format's manifest and datasheet, and publishes the folder by rename."""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from pipeline.export.formats import FORMATS, READERS, WRITERS, ExportError, ExportJob, safe_member
from pipeline.export.manifest import build_manifest, datasheet, dvc_lock_hashes_status
from pipeline.provenance import git_revision_status, utc_now
from pipeline.export.target import _check_target, _hidden_name, _os_reason, _publish, clean_killed_exports
from pipeline.labels import IGNORE_INDEX
from pipeline.metrics import ConfusionMatrix
from pipeline.progress import progress_bar
from pipeline.refine.instance_store import instance_items
from pipeline.store import Store, StoreError

log = logging.getLogger("wsss")


def read_export(folder: str | Path) -> dict[str, np.ndarray]:
    """{image_id: mask} of any export folder (its manifest names the format; instance-id maps for
    coco_instances)."""
    folder = Path(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    return READERS[manifest["format"]](folder)


def iter_store_masks(store: Store, name: str = "mask") -> Iterator[tuple[int, np.ndarray]]:
    """(index, (H, W) mask) for every image, one shard-sized block at a time; a missing or corrupt shard
    raises StoreError naming the store and the images."""
    yield from store.iter(name)


def _image_file_name(prepared):
    """id -> the image's file name in the dataset (COCO ``file_name``).

    Only when the dataset cannot say (its root moved or is gone, or it has no file for the id: a
    DatasetError) is the name ``<id>.jpg``, with a warning naming the image; any other error is a
    bug and propagates."""
    from pipeline.datasets import DatasetError

    state: dict = {"dataset": None, "why": None, "warned": 0}
    max_warnings = 10

    def name(image_id: str) -> str:
        if state["dataset"] is None and state["why"] is None:
            try:
                state["dataset"] = prepared.dataset
            except DatasetError as e:
                state["why"] = str(e)
                log.warning("export coco: the dataset cannot be opened (%s); every file_name is <image id>.jpg, "
                            "starting with image %r", e, image_id)
        if state["why"] is not None:
            return f"{image_id}.jpg"
        try:
            return state["dataset"].image_path(image_id).name
        except DatasetError as e:
            state["warned"] += 1
            if state["warned"] <= max_warnings:
                more = "; further such images are not logged" if state["warned"] == max_warnings else ""
                log.warning("export coco: image %r: file_name unknown (%s); using %r%s", image_id, e,
                            f"{image_id}.jpg", more)
            return f"{image_id}.jpg"
    return name


def _open_instance_store(path: str | Path | None, class_names: list[str]) -> Store:
    if path is None or not Path(path).exists():
        raise ExportError(f"export format coco_instances needs the instance store (the instances stage writes "
                          f"data/instances.zarr): not found: {path}")
    try:
        store = Store(path)
    except StoreError as e:
        raise ExportError(str(e)) from e
    if "instance" not in store.specs or "mask" not in store.specs:
        raise ExportError(f"{path}: not an instance store (arrays: {sorted(store.specs)})")
    if store.attrs.get("class_names") not in (None, class_names):
        raise ExportError(f"{path}: class names {store.attrs['class_names']} differ from the prepared dataset's {class_names}")
    return store


def run_export(pseudo_store_path: str | Path, prepared_dir: str | Path, data_params: dict, formats: Sequence[str],
               out_dir: str | Path, force: bool = False, *, params: dict | None = None,
               label_metrics: dict | None = None, lock_path: str | Path = "dvc.lock", repo_dir: str | Path = ".",
               nest: bool | None = None, progress: bool = True, instances_store_path: str | Path | None = None) -> dict:
    """Export the mask store at ``pseudo_store_path`` into ``out_dir``.

    formats: any of ``voc``, ``coco``, ``zarr`` (the pseudo masks) and ``coco_instances`` (the
    instance store at ``instances_store_path``, written by the instances stage). nest: write each format into ``out_dir/<format>``
    (default: only when more than one format is asked for; the stage always nests). With one
    format and nest False, ``out_dir`` itself is the export folder.
    params: the full params dict recorded in the manifest; label_metrics: metrics/labels.json
    content (per-stage mIoU) recorded as ``stage_metrics``.
    Returns a summary: {"out_dir", "count", "formats": {fmt: {"path", "seconds", "images_per_s",
    "bytes", "bytes_per_image"}}, "label_quality"}.
    Raises ExportError (bad format, unsafe id, a target that is not empty and not a previous export, a
    previous export without force, an unwritable target, bad mask values).
    """
    from pipeline.datasets import PreparedData

    formats = list(dict.fromkeys(formats))
    if not formats:
        raise ExportError("no export format given (voc, coco, zarr)")
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise ExportError(f"unknown export format(s) {bad}; known: {list(FORMATS)}")
    nest = len(formats) > 1 if nest is None else nest
    if len(formats) > 1 and not nest:
        raise ExportError("several formats need nest=True (one sub-folder per format)")
    out_dir = Path(out_dir)
    pseudo_store_path, prepared_dir = Path(pseudo_store_path), Path(prepared_dir)
    clean_killed_exports(out_dir)
    _check_target(out_dir, force, [pseudo_store_path, prepared_dir])
    try:
        store = Store(pseudo_store_path)
    except StoreError as e:
        raise ExportError(str(e)) from e
    if "mask" not in store.specs:
        raise ExportError(f"{pseudo_store_path}: has no array 'mask' (arrays: {sorted(store.specs)})")
    prepared = PreparedData(data_params, prepared_dir)
    class_names = list(prepared.class_names)
    if store.attrs.get("class_names") not in (None, class_names):
        raise ExportError(f"{pseudo_store_path}: class names {store.attrs['class_names']} differ from the prepared "
                          f"dataset's {class_names}")
    instances = None
    if "coco_instances" in formats:
        instances = _open_instance_store(instances_store_path, class_names)
    for image_id in store.ids + (instances.ids if instances is not None else []):
        safe_member(out_dir, image_id, "")  # refuse before writing anything
    split = store.attrs.get("split") or data_params["train_split"]
    n_classes = len(class_names)
    palette = np.asarray(prepared.palette, np.uint8)

    # every pass validates each mask; the first also scores it against the GT (masks are never all in memory)
    quality = ConfusionMatrix(n_classes)
    scored = {"images": 0, "done": False}

    def items() -> Iterator[tuple[str, np.ndarray]]:
        for i, m in iter_store_masks(store):
            image_id = store.ids[i]
            bad_vals = np.setdiff1d(np.unique(m), np.r_[np.arange(n_classes), IGNORE_INDEX])
            if bad_vals.size:
                raise ExportError(f"{pseudo_store_path}: mask of {image_id!r} has values {bad_vals.tolist()} outside "
                                  f"0..{n_classes - 1} and {IGNORE_INDEX}")
            if not scored["done"] and image_id in prepared and prepared.has_gt(image_id):
                quality.update(m, prepared.gt(image_id))
                scored["images"] += 1
            yield image_id, m
        scored["done"] = True

    def label_quality() -> dict | None:
        if not scored["images"]:
            return None
        return {"images_with_gt": scored["images"], "measured_by": "export (masks vs ground truth, 255 left out)",
                **quality.summary(class_names)}

    revision, no_revision = git_revision_status(repo_dir)
    inputs, no_inputs = dvc_lock_hashes_status(lock_path, [pseudo_store_path, prepared_dir] + (
        [Path(instances_store_path)] if instances is not None else []))
    common = dict(
        dataset={"name": prepared.index.get("dataset"), "root": prepared.index.get("root"),
                 "prepared_dir": str(prepared_dir)},
        split=split, ids_count=len(store.ids), class_names=class_names, background=prepared.background,
        palette=palette.tolist(),
        ignore_value=IGNORE_INDEX, params=params or {}, code_revision=revision, code_revision_unavailable=no_revision,
        inputs=inputs, inputs_unavailable=no_inputs,
        stage_metrics=label_metrics,
        source={"store": str(pseudo_store_path), "fingerprint": store.attrs.get("fingerprint"),
                "method": store.attrs.get("method")},
        created=utc_now(),
    )
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=_hidden_name(out_dir), suffix=".partial", dir=out_dir.parent))
    except OSError as e:
        raise ExportError(f"export target {out_dir}: cannot write in {out_dir.parent}: {_os_reason(e)}") from e
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the published folder gets normal permissions
    summary = {"out_dir": str(out_dir), "count": len(store.ids), "formats": {}}
    job = ExportJob(masks=items, store=store, split=split, class_names=class_names, palette=palette,
                    file_name=_image_file_name(prepared), dataset_name=common["dataset"]["name"],
                    created=common["created"], background=prepared.background,
                    instances=(lambda: instance_items(instances)) if instances is not None else None)
    try:
        for fmt in formats:
            folder = tmp / fmt if nest else tmp
            folder.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            with progress_bar(total=len(store.ids), desc=f"export {fmt}", unit="img", disable=not progress) as bar:
                tick = lambda: bar.update(1)  # noqa: E731
                files = WRITERS[fmt](job, folder, tick)
            seconds = time.perf_counter() - t0
            mask_bytes = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
            if fmt == "coco_instances":
                manifest = build_manifest(fmt=fmt, files=files, label_quality=None, **{
                    **common, "ids_count": len(instances.ids), "split": instances.attrs.get("split") or split,
                    "source": {"store": str(instances_store_path), "method": instances.attrs.get("method"),
                               "fingerprint": instances.attrs.get("fingerprint")}})
            else:
                manifest = build_manifest(fmt=fmt, files=files, label_quality=label_quality(), **common)
            (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            (folder / "README.md").write_text(datasheet(manifest))
            summary["formats"][fmt] = {
                "path": str(out_dir / fmt if nest else out_dir), "seconds": round(seconds, 3),
                "images_per_s": round(len(store.ids) / seconds, 1) if seconds > 0 else None,
                "bytes": mask_bytes, "bytes_per_image": round(mask_bytes / max(len(store.ids), 1), 1)}
            log.info("export %s: %d images in %.2f s, %.0f bytes/image", fmt, len(store.ids), seconds,
                     summary["formats"][fmt]["bytes_per_image"])
        summary["label_quality"] = label_quality()
        try:
            _publish(tmp, out_dir)
        except OSError as e:
            raise ExportError(f"export target {out_dir} cannot be replaced (busy or read-only?): "
                              f"{_os_reason(e)}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.utime(out_dir)
    return summary

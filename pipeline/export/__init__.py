"""Export the pseudo masks for another team: VOC PNGs, COCO RLE json or a zarr store, and the
instance pseudo masks as COCO instance annotations (``coco_instances``).

:func:`run_export` is the one entry used by the ``export`` stage and by ``wsss export``. Every
export folder holds the masks, ``manifest.json`` and a datasheet ``README.md``. Writes are safe:
image ids cannot name files outside the folder, a non-empty target is refused unless it
holds a previous export (an export ``manifest.json``, or format sub-folders with one each) and
``force`` is given, and everything is written into a temporary sibling folder that is renamed into
place only when complete.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from pipeline.export.formats import (READERS, ExportError, read_coco, read_coco_instances, read_voc, read_zarr,
                                     safe_member, write_coco, write_coco_instances, write_voc, write_zarr)
from pipeline.export.manifest import build_manifest, datasheet, dvc_lock_hashes_status, git_revision_status, utc_now
from pipeline.metrics import ConfusionMatrix
from pipeline.progress import progress_bar
from pipeline.labels import IGNORE_INDEX
from pipeline.refine.instance_store import instance_items
from pipeline.store import Store, StoreError

log = logging.getLogger("wsss")

FORMATS = ("voc", "coco", "zarr", "coco_instances")

__all__ = ["FORMATS", "ExportError", "READERS", "read_coco", "read_coco_instances", "read_export", "read_voc", "read_zarr", "run_export",
           "safe_member"]


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


def _export_manifest_format(folder: Path) -> str | None:
    """The format named by ``folder/manifest.json`` when it is the manifest of an export, else None."""
    try:
        m = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if isinstance(m, dict) and "manifest_version" in m and m.get("format") in FORMATS and "files" in m:
        return m["format"]
    return None


# what each format writes at the top of its folder (beside manifest.json and README.md)
FORMAT_ENTRIES = {"voc": {"SegmentationClass", "ImageSets", "class_names.txt"}, "coco": {"annotations"},
                  "zarr": {"masks.zarr"}, "coco_instances": {"annotations"}}


def _foreign_entries(folder: Path, fmt: str) -> list[str]:
    """Entries of a one-format export folder that its format does not write (a user's files)."""
    expected = FORMAT_ENTRIES[fmt] | {"manifest.json", "README.md"}
    return sorted(e.name for e in folder.iterdir() if e.name not in expected)


def _previous_export(folder: Path) -> str | None:
    """Why ``folder`` is not a previous export (None when it is one and may be replaced).

    An export is a folder with an export ``manifest.json`` (one format) holding only what that format
    writes, or a folder whose entries are all such format sub-folders (voc, coco, zarr) with one
    each (what the ``export`` stage writes)."""
    fmt = _export_manifest_format(folder)
    if fmt is not None:
        foreign = _foreign_entries(folder, fmt)
        if foreign:
            return f"it holds {', '.join(foreign[:3])}{' and more' if len(foreign) > 3 else ''}, which no export wrote"
        return None
    if (folder / "manifest.json").exists():
        return "its manifest.json is not an export manifest"
    entries = sorted(folder.iterdir())
    foreign = [e.name for e in entries if not (e.is_dir() and not e.is_symlink() and e.name in FORMATS
                                                and _export_manifest_format(e) == e.name)]
    foreign += [f"{e.name}/{x}" for e in entries if e.name in FORMATS and e.is_dir() and not e.is_symlink()
                and _export_manifest_format(e) == e.name for x in _foreign_entries(e, e.name)]
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        return f"it holds {shown}, which no export wrote"
    return None


def _check_writable(out_dir: Path) -> None:
    """Refuse before any work when the folder that receives ``out_dir`` cannot be made or written."""
    parent = out_dir.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ExportError(f"export target {out_dir}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"export target {out_dir}: no write permission in {parent}")


def _check_target(out_dir: Path, force: bool, protected: Sequence[Path]) -> None:
    """Refuse a target that is a file, holds / is an input or the cwd, or is a non-empty folder
    other than a previous export (that one only with force). Raises ExportError naming the folder."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"export target {out_dir} exists and is not a folder")
    target = out_dir.resolve()
    for p in [Path.cwd(), *protected]:
        p = Path(p).resolve()
        if target == p or target in p.parents:
            raise ExportError(f"export target {out_dir} is or contains {p}; pick a new folder")
    if out_dir.is_dir():
        try:
            empty = not any(out_dir.iterdir())
            why = None if empty else _previous_export(out_dir)
        except OSError as e:
            raise ExportError(f"export target {out_dir} cannot be read: {e.strerror or e}") from e
        if why is not None:
            raise ExportError(f"export target {out_dir} is not empty and is not a previous export ({why}); "
                              "refusing to replace it even with --force: pick a new or empty folder")
        if not empty and not force:
            raise ExportError(f"export target {out_dir} is not empty (a previous export); pass --force "
                              "(force=True) to replace it")
    _check_writable(out_dir)


def _os_reason(e: OSError) -> str:
    """``[Errno 16] Device or resource busy`` -> ``device or resource busy`` (the path is named by the caller)."""
    return (e.strerror or str(e)).lower()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _hidden_name(out_dir: Path) -> str:
    """Prefix of the hidden folders an export works in beside ``out_dir``: ``.<name>.<pid>.``."""
    return f".{out_dir.name}.{os.getpid()}."


def clean_killed_exports(out_dir: Path) -> list[str]:
    """What a killed export left beside ``out_dir``: its hidden ``.<name>.<pid>.*.partial`` work folder
    (removed) and, when the kill fell between the two renames of :func:`_publish`, the previous export
    in ``.<name>.<pid>.*.old`` while ``out_dir`` is absent (renamed back). Only folders of processes
    that are gone are touched. Returns a line per action."""
    pattern = re.compile(rf"\.{re.escape(out_dir.name)}\.(\d+)\.[a-z0-9_]+\.(partial|old)")
    done = []
    if not out_dir.parent.is_dir():
        return done
    for leftover in sorted(out_dir.parent.iterdir()):
        m = pattern.fullmatch(leftover.name)
        if not m or not leftover.is_dir() or _pid_alive(int(m.group(1))):
            continue
        if m.group(2) == "old" and not out_dir.exists() and _previous_export(leftover) is None:
            leftover.rename(out_dir)
            done.append(f"recovered the previous export {out_dir} from {leftover.name} (a killed export)")
        else:
            shutil.rmtree(leftover, ignore_errors=True)
            done.append(f"removed {leftover.name}, left by a killed export")
    for line in done:
        log.warning("export: %s", line)
    return done


def _publish(tmp: Path, out_dir: Path) -> None:
    """Rename ``tmp`` to ``out_dir``; an existing ``out_dir`` is moved aside first and removed after."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=_hidden_name(out_dir), suffix=".old", dir=out_dir.parent))
        old.rmdir()
        out_dir.rename(old)
    try:
        tmp.rename(out_dir)
    except OSError:
        if old is not None:
            old.rename(out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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
        split=split, ids_count=len(store.ids), class_names=class_names, palette=palette.tolist(),
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
    try:
        for fmt in formats:
            folder = tmp / fmt if nest else tmp
            folder.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            with progress_bar(total=len(store.ids), desc=f"export {fmt}", unit="img", disable=not progress) as bar:
                tick = lambda: bar.update(1)  # noqa: E731
                if fmt == "voc":
                    written = write_voc(folder, items(), split, class_names, palette, tick)
                    files = {"masks": "SegmentationClass/<id>.png", "ids": written[1], "class_names": written[2]}
                elif fmt == "coco":
                    info = {"description": f"pseudo masks of {common['dataset']['name']}/{split}",
                            "version": "1", "date_created": common["created"]}
                    written = write_coco(folder, items(), split, class_names, _image_file_name(prepared), info, tick)
                    files = {"annotations": written[0]}
                elif fmt == "coco_instances":
                    info = {"description": f"instance pseudo masks of {common['dataset']['name']}/{split}",
                            "version": "1", "date_created": common["created"]}
                    written = write_coco_instances(folder, instance_items(instances), split, class_names,
                                                   _image_file_name(prepared), info, tick)
                    files = {"annotations": written[0]}
                else:
                    written = write_zarr(folder, store, items(), tick)
                    files = {"store": "masks.zarr"}
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

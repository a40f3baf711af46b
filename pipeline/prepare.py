"""Prepare: (generate the demo,) validate every image once, write the index and the GT store."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from pipeline.datasets import DatasetError, open_dataset
from pipeline.labels import IGNORE_INDEX, first_class
from pipeline.provenance import GENERATED_DATASETS
from pipeline.store import ArraySpec, replace_dir, write_store
from pipeline.visual import grid, overlay, save_png


def prepare_dataset(data: dict, out_dir: str | Path, shard_images: int = 32, source: dict | None = None) -> dict:
    """Build ``out_dir`` atomically (``<out_dir>.partial`` then rename). Returns a summary dict.

    Layout: index.json, gt.zarr (arrays ``mask`` and ``instance``: instance ids where the dataset has
    instance masks, 255 everywhere where it has none), skipped.json and, for the demo, demo/ (VOC layout). ``source``: the
    dataset files' digest (:func:`pipeline.provenance.dataset_digest`), recorded in index.json so
    every resume fingerprint downstream changes when the files do.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    if data["dataset"] == "demo":
        from pipeline.datasets.demo import generate

        generate(tmp / "demo", data["demo_seed"], data["demo_num_train"], data["demo_num_val"],
                 data["demo_min_side"], data["demo_max_side"])
    elif data["dataset"] == "demo_stuff":
        from pipeline.datasets.demo_stuff import generate_stuff

        generate_stuff(tmp / "demo_stuff", data["demo_seed"], data["demo_num_train"] + data["demo_num_val"],
                       data["demo_min_side"], data["demo_max_side"])
    ds = open_dataset(data, tmp)
    if bool(ds.background) != bool(data["background"]):
        raise DatasetError(f"param data.background: {str(data['background']).lower()}, but dataset "
                           f"{data['dataset']!r} {'has' if ds.background else 'has no'} background class "
                           f"(class 0 is {ds.class_names[0]!r}); set data.background: {str(ds.background).lower()}")
    splits, items, skipped = {}, {}, []
    for split in dict.fromkeys([data["train_split"], data["eval_split"]]):
        res = ds.scan(split, on_bad_item=data["on_bad_item"], max_images=data["max_images"])
        splits[split] = [r.id for r in res.records]
        for r in res.records:
            items[r.id] = {"size": list(r.size), "labels": r.labels, "has_gt": r.has_gt}
        skipped += res.skipped
    dup = set(splits[data["train_split"]]) & set(splits.get(data["eval_split"], [])) if data["train_split"] != data["eval_split"] else set()
    if dup:
        raise DatasetError(f"{ds.root}: {len(dup)} ids are in both {data['train_split']!r} and {data['eval_split']!r}, e.g. {sorted(dup)[:3]}")
    index = {
        # the demo is generated inside the .partial folder that becomes out_dir
        "dataset": data["dataset"],
        "root": str(out_dir / data["dataset"] if data["dataset"] in GENERATED_DATASETS else ds.root),
        "class_names": ds.class_names, "background": bool(ds.background),
        "palette": ds.palette.tolist(), "splits": splits, "items": items,
        "num_skipped": len(skipped), "source_digest": (source or {}).get("digest"),
    }
    (tmp / "index.json").write_text(json.dumps(index))
    (tmp / "skipped.json").write_text(json.dumps(skipped, indent=1))
    all_ids = [i for s in splits.values() for i in s]
    sizes = np.array([items[i]["size"] for i in all_ids], np.int32)

    def gt_batch(idx):
        masks, instances = [], []
        for i in idx:
            m = ds.load_gt(all_ids[i]) if items[all_ids[i]]["has_gt"] else None
            masks.append(m if m is not None else np.full(tuple(sizes[i]), IGNORE_INDEX, np.uint8))
            inst = ds.load_instance_gt(all_ids[i], tuple(sizes[i])) if m is not None else None
            instances.append(inst if inst is not None else np.full(tuple(sizes[i]), IGNORE_INDEX, np.uint8))
        return {"mask": masks, "instance": instances}

    write_store(tmp / "gt.zarr", all_ids, sizes, {"mask": ArraySpec("uint8", fill=IGNORE_INDEX),
                                                   "instance": ArraySpec("uint8", fill=IGNORE_INDEX)},
                {"kind": "ground_truth", "class_names": ds.class_names, "stride": 1}, gt_batch,
                shard_images=shard_images, progress="gt.zarr")
    replace_dir(tmp, out_dir)
    return {"dataset": data["dataset"], "images": {s: len(v) for s, v in splits.items()}, "skipped": len(skipped),
            "classes": len(ds.class_names) - first_class(ds.background)}


def contact_sheet(prepared, split: str, n: int = 16) -> np.ndarray:
    """Images next to their GT overlays, ``n`` pairs in 4 pairs per row."""
    ids = prepared.ids(split)[:n]
    cells = []
    for i in ids:
        img = prepared.image(i)
        gt = prepared.gt(i)
        cells += [img, overlay(img, gt, prepared.palette, alpha=0.75, background=prepared.background)
                  if gt is not None else img]
    rows = [cells[k:k + 8] for k in range(0, len(cells), 8)]
    return grid(rows, titles=["image", "GT"] * 4, cell=112)


def class_statistics(prepared, split: str) -> dict:
    """Per-class image counts and pairwise co-occurrence (shows the demo's context bias)."""
    names = prepared.class_names[prepared.first_class:]
    c = len(names)
    co = np.zeros((c, c), int)
    for i in prepared.ids(split):
        v = prepared.label_vector(i)
        co += np.outer(v, v).astype(int)
    return {"images_per_class": {names[k]: int(co[k, k]) for k in range(c)},
            "co_occurrence": {names[a]: {names[b]: int(co[a, b]) for b in range(c) if b != a} for a in range(c)}}


def save_contact_sheet(prepared, split: str, path) -> Path:
    return save_png(path, contact_sheet(prepared, split))

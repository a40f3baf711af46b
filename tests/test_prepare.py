"""prepare_dataset: atomic output, index.json fields, skipped.json, gt.zarr round trip."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pipeline.prepare as prepare_mod
from pipeline.presets import preset
from pipeline.datasets import DatasetError, PreparedData
from pipeline.datasets.demo import DEMO_CLASSES, DemoDataset
from pipeline.prepare import class_statistics, prepare_dataset
from pipeline.store import Store

TINY = preset("tiny")["data"]


@pytest.fixture(scope="module")
def prepared_demo(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo") / "prepared"
    summary = prepare_dataset(dict(TINY), out, shard_images=8)
    return out, summary


def write_folder(root: Path, rows: list[str], images: list[str]) -> dict:
    (root / "images").mkdir(parents=True)
    (root / "classes.txt").write_text("cat\ndog\n")
    (root / "labels.csv").write_text("\n".join(["image,labels"] + rows) + "\n")
    rng = np.random.default_rng(0)
    for name in images:
        Image.fromarray(rng.integers(0, 256, (10, 14, 3), dtype=np.uint8)).save(root / "images" / name)
    return dict(TINY, dataset="folder", root=str(root), folder_val_fraction=0.0, eval_split="train")


# --- the demo end to end --------------------------------------------------------------------------
def test_summary_counts_images_and_classes(prepared_demo):
    _, summary = prepared_demo
    assert summary == {"dataset": "demo", "images": {"train": 24, "val": 8}, "skipped": 0, "classes": 6}


def test_index_json_has_every_field(prepared_demo):
    out, _ = prepared_demo
    index = json.loads((out / "index.json").read_text())
    assert set(index) == {"dataset", "root", "class_names", "palette", "splits", "items", "num_skipped", "source_digest", "background"}
    assert index["dataset"] == "demo" and index["num_skipped"] == 0
    assert Path(index["root"]) == out / "demo" and (out / "demo").is_dir()  # not the .partial it was built in
    assert index["class_names"] == DEMO_CLASSES
    assert np.asarray(index["palette"]).shape == (len(DEMO_CLASSES), 3)
    assert index["splits"]["train"] == [f"train_{i:05d}" for i in range(24)]
    assert index["splits"]["val"] == [f"val_{i:05d}" for i in range(8)]
    assert set(index["items"]) == set(index["splits"]["train"]) | set(index["splits"]["val"])
    ds = DemoDataset(out / "demo")
    for image_id, item in index["items"].items():
        assert set(item) == {"size", "labels", "has_gt"} and item["has_gt"] is True
        assert tuple(item["size"]) == ds.load_image(image_id).shape[:2]
        assert item["labels"] == ds.labels(image_id) and item["labels"]
    assert json.loads((out / "skipped.json").read_text()) == []


def test_gt_store_round_trip_equals_the_dataset_masks(prepared_demo):
    out, _ = prepared_demo
    ds = DemoDataset(out / "demo")
    prepared = PreparedData(dict(TINY), out)
    store = Store(out / "gt.zarr")
    assert store.attrs["class_names"] == DEMO_CLASSES and store.attrs["kind"] == "ground_truth"
    assert store.ids == prepared.ids("train") + prepared.ids("val")
    for image_id in store.ids:
        np.testing.assert_array_equal(prepared.gt(image_id), ds.load_gt(image_id))


def test_prepared_data_serves_images_labels_and_label_vectors(prepared_demo):
    out, _ = prepared_demo
    prepared = PreparedData(dict(TINY), out)
    image_id = prepared.ids("train")[0]
    img = prepared.image(image_id)
    assert img.shape == prepared.size(image_id) + (3,) and img.dtype == np.uint8
    v = prepared.label_vector(image_id)
    assert v.shape == (6,) and (np.flatnonzero(v) + 1).tolist() == prepared.labels(image_id)
    stats = class_statistics(prepared, "train")
    assert sum(stats["images_per_class"].values()) == sum(len(prepared.labels(i)) for i in prepared.ids("train"))


def test_max_images_keeps_the_first_ids_of_each_split(tmp_path):
    summary = prepare_dataset(dict(TINY, max_images=3), tmp_path / "p", shard_images=8)
    assert summary["images"] == {"train": 3, "val": 3}
    assert PreparedData(TINY, tmp_path / "p").ids("train") == ["train_00000", "train_00001", "train_00002"]


# --- atomicity ------------------------------------------------------------------------------------
def test_failure_midway_leaves_no_output_dir(tmp_path, monkeypatch):
    def broken_write_store(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(prepare_mod, "write_store", broken_write_store)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare_dataset(dict(TINY), tmp_path / "prepared", shard_images=8)
    assert not (tmp_path / "prepared").exists()


def test_bad_dataset_leaves_no_output_dir(tmp_path):
    data = write_folder(tmp_path / "src", ["a.png,cat", "b.png,cat"], images=["a.png"])
    with pytest.raises(DatasetError, match=r"labels\.csv:3 \(image b\.png\).*image file is missing"):
        prepare_dataset(data, tmp_path / "prepared")
    assert not (tmp_path / "prepared").exists()


def test_stale_partial_folder_is_replaced(tmp_path):
    stale = tmp_path / "prepared.partial"
    (stale / "gt.zarr").mkdir(parents=True)
    (stale / "junk.txt").write_text("left by a killed run")
    (stale / "index.json").write_text("{}")
    prepare_dataset(dict(TINY), tmp_path / "prepared", shard_images=8)
    assert not stale.exists()
    assert not (tmp_path / "prepared" / "junk.txt").exists()
    assert len(PreparedData(TINY, tmp_path / "prepared").ids("train")) == 24


def test_rerun_replaces_the_previous_output(tmp_path):
    prepare_dataset(dict(TINY), tmp_path / "p", shard_images=8)
    prepare_dataset(dict(TINY, demo_num_train=5, demo_seed=1), tmp_path / "p", shard_images=8)
    assert len(PreparedData(TINY, tmp_path / "p").ids("train")) == 5
    assert not (tmp_path / "p.partial").exists()


# --- bad items and other adapters ---------------------------------------------------------------
def test_skip_mode_lists_skipped_items_in_skipped_json(tmp_path):
    data = write_folder(tmp_path / "src", ["a.png,cat", "b.png,cat", "c.png,zebra", "d.png,dog"],
                        images=["a.png", "c.png", "d.png"])
    summary = prepare_dataset(dict(data, on_bad_item="skip"), tmp_path / "p")
    assert summary["skipped"] == 2 and summary["images"] == {"train": 2}
    skipped = json.loads((tmp_path / "p" / "skipped.json").read_text())
    assert [(s["id"], s["split"]) for s in skipped] == [("b", "train"), ("c", "train")]
    assert "image file is missing" in skipped[0]["reason"] and "unknown class name 'zebra'" in skipped[1]["reason"]
    index = json.loads((tmp_path / "p" / "index.json").read_text())
    assert index["num_skipped"] == 2 and index["splits"]["train"] == ["a", "d"]


def test_fail_mode_raises_on_the_first_bad_item(tmp_path):
    data = write_folder(tmp_path / "src", ["a.png,cat", "c.png,zebra"], images=["a.png", "c.png"])
    with pytest.raises(DatasetError, match=r"labels\.csv:3 \(image c\.png\): unknown class name 'zebra'"):
        prepare_dataset(dict(data, on_bad_item="fail"), tmp_path / "p")


def test_ids_in_both_splits_are_refused(tmp_path):
    root = tmp_path / "voc"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "Annotations").mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "JPEGImages" / "x.jpg")
    (root / "Annotations" / "x.xml").write_text("<annotation><object><name>cat</name></object></annotation>")
    for split in ("train", "val"):
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("x\n")
    with pytest.raises(DatasetError, match=r"1 ids are in both 'train' and 'val'"):
        prepare_dataset(dict(TINY, dataset="voc", root=str(root)), tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_coco_prepare_round_trips_gt_and_reports_unannotated_images(tmp_path):
    from pycocotools import mask as mask_utils

    root = tmp_path / "coco"
    (root / "imgs").mkdir(parents=True)
    for name in ("p.jpg", "q.jpg"):
        Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(root / "imgs" / name)
    m = np.zeros((10, 12), np.uint8)
    m[2:6, 3:9] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    rle["counts"] = rle["counts"].decode()
    js = {"images": [{"id": 1, "file_name": "p.jpg", "width": 12, "height": 10},
                     {"id": 2, "file_name": "q.jpg", "width": 12, "height": 10}],
          "categories": [{"id": 4, "name": "bear"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 4, "iscrowd": 1, "segmentation": rle}]}
    (root / "a.json").write_text(json.dumps(js))
    data = dict(TINY, dataset="coco", root=str(root), coco_train_json="a.json", coco_train_images="imgs",
                eval_split="train")
    summary = prepare_dataset(data, tmp_path / "p")
    assert summary["images"] == {"train": 1} and summary["skipped"] == 1
    assert json.loads((tmp_path / "p" / "skipped.json").read_text())[0]["id"] == "q"
    prepared = PreparedData(data, tmp_path / "p")
    assert prepared.class_names == ["background", "bear"] and prepared.labels("p") == [1]
    np.testing.assert_array_equal(prepared.gt("p"), np.where(m > 0, 255, 0).astype(np.uint8))

"""The embedded demo dataset: deterministic, varied, always labelled; and its contact sheet."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.presets import preset
from pipeline.datasets import PreparedData
from pipeline.datasets.demo import DEMO_CLASSES, DemoDataset, generate, render_image
from pipeline.prepare import prepare_dataset, save_contact_sheet

TINY = preset("tiny")["data"]
LO, HI = TINY["demo_min_side"], TINY["demo_max_side"]


def make(root: Path, seed: int, n_train: int = 4, n_val: int = 2) -> DemoDataset:
    return generate(root, seed, n_train, n_val, LO, HI, progress=False)


def file_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_writes_identical_bytes(tmp_path):
    make(tmp_path / "a", seed=3)
    make(tmp_path / "b", seed=3)
    a, b = file_bytes(tmp_path / "a"), file_bytes(tmp_path / "b")
    assert len(a) == 4 + 2 + 4 + 2 + 4 + 2 + 2 + 1  # images, class masks, instance masks, two split lists, classes.txt
    assert a == b


def test_another_seed_gives_different_images(tmp_path):
    make(tmp_path / "a", seed=3)
    make(tmp_path / "b", seed=4)
    a, b = file_bytes(tmp_path / "a"), file_bytes(tmp_path / "b")
    assert a.keys() == b.keys()
    images = [k for k in a if k.startswith("JPEGImages")]
    assert all(a[k] != b[k] for k in images)


def test_train_and_val_images_differ_within_one_seed():
    train, _ = render_image(0, 0, LO, HI)
    val, _ = render_image(0, 10_000_000, LO, HI)
    assert train.shape != val.shape or not np.array_equal(train, val)


def test_demo_has_at_least_six_object_classes(tmp_path):
    ds = make(tmp_path, seed=0)
    assert ds.class_names == DEMO_CLASSES and ds.class_names[0] == "background"
    assert len(ds.class_names) - 1 >= 6
    assert (tmp_path / "classes.txt").read_text().split() == DEMO_CLASSES


@pytest.mark.parametrize("seed", [0, 1])
def test_every_image_has_one_to_three_objects_and_a_size_within_bounds(seed):
    for index in range(40):
        img, gt = render_image(seed, index, LO, HI)
        h, w = gt.shape
        assert img.shape == (h, w, 3) and img.dtype == np.uint8 and gt.dtype == np.uint8
        assert LO <= h <= HI and LO <= w <= HI
        fg = set(np.unique(gt).tolist()) - {0}
        assert 1 <= len(fg) <= 3 and fg <= set(range(1, len(DEMO_CLASSES)))


def test_generated_images_have_gt_and_labels_matching_it(tmp_path):
    ds = make(tmp_path, seed=5, n_train=6, n_val=3)
    for split, n in (("train", 6), ("val", 3)):
        res = ds.scan(split, progress=False)
        assert len(res.records) == n and not res.skipped
        for r in res.records:
            gt = ds.load_gt(r.id)
            assert r.has_gt and gt.shape == r.size
            assert r.labels == sorted(set(np.unique(gt).tolist()) - {0, 255}) and len(r.labels) >= 1


def test_classes_co_occur_more_often_than_chance():
    # disk(1)+square(2) are drawn together by design; disk+star(4) only by chance
    pairs = {(1, 2): 0, (1, 4): 0}
    for index in range(300):
        labels = set(np.unique(render_image(0, index, 32, 40)[1]).tolist())
        for a, b in pairs:
            pairs[(a, b)] += a in labels and b in labels
    assert pairs[(1, 2)] > 2 * pairs[(1, 4)]


def test_contact_sheet_png_is_written(tmp_path):
    data = dict(TINY)
    prepare_dataset(data, tmp_path / "prepared", shard_images=8)
    prepared = PreparedData(data, tmp_path / "prepared")
    out = save_contact_sheet(prepared, "train", tmp_path / "plots" / "contact_sheet.png")
    assert out == tmp_path / "plots" / "contact_sheet.png"
    with Image.open(out) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        w, h = im.size
    assert w >= 8 * 112 and h >= 4 * 112  # 16 image/GT pairs, 4 pairs per row
    sheet = np.asarray(Image.open(out))
    assert sheet.std() > 10  # not blank

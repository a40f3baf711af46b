"""Issue 23: datasets without a background class (``data.background: false``).

Class k is ``class_names[k]`` from 0, no stage adds a background channel, and every output keeps that
indexing: the folder reader, the CAM score, the seeds, affinity pairs, the walk, instances, the
segmenter and the exports. The tests that run the graph check that a pixel labelled 0 is the first
class, never a background that sneaked back.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.cam.evaluate import LabelArgmax, label_argmax, pseudo_label
from pipeline.config import ParamsError, validate
from pipeline.datasets import DatasetError
from pipeline.datasets.folder import FolderDataset, read_class_list
from pipeline.labels import IGNORE_INDEX, class_channels, first_class, label_scores, to_class_labels
from pipeline.models.pairs import pair_labels
from pipeline.presets import preset
from pipeline.refine.instances import instances_from_scores
from pipeline.refine.random_walk import pseudo_mask
from pipeline.refine.seeds import MarginSeeds, margin_labels, threshold_seeds
from synthetic import run_stages

SCENE = ["sky", "grass", "road"]


# ------------------------------------------------------------------ label conventions, by hand

def test_label_space_without_background_starts_at_class_zero():
    assert first_class(True) == 1 and first_class(False) == 0
    assert class_channels([1, 3], True) == [0, 2]
    assert class_channels([0, 2], False) == [0, 2]
    cams = np.array([[[0.2]], [[0.1]]], np.float32)
    assert label_scores(cams, 4.0, background=False).shape == (2, 1, 1)  # no channel added
    assert label_scores(cams, 4.0, background=True).shape == (3, 1, 1)
    index = np.array([[0, 1, 255]])
    np.testing.assert_array_equal(to_class_labels(index, [0, 2], background=False), [[0, 2, 255]])
    np.testing.assert_array_equal(to_class_labels(index, [1, 3], background=True), [[0, 1, 255]])


def test_cam_score_without_background_is_the_argmax_over_the_image_labels():
    # channel k = class k; class 1 is not a label of this image, so its (high) CAM must not win
    cam = np.array([[[0.9, 0.1]], [[0.95, 0.95]], [[0.2, 0.7]]], np.float32)
    np.testing.assert_array_equal(label_argmax(cam, [0, 2]), [[0, 2]])
    np.testing.assert_array_equal(pseudo_label(cam, None, [0, 2], background=False), [[0, 2]])
    score = LabelArgmax(3)
    score.update(cam, np.array([[0, 2]], np.uint8), top_label=0, labels=[0, 2])
    m = score.summary(SCENE)
    assert m["miou"] == 100.0 and m["best_threshold"] is None and m["curve"] == []
    assert "no background" in m["note"] and "all_background" not in m["baselines"]


def test_margin_seeds_by_hand():
    # three pixels, two labels: clear win for the first, too close to call, clear win for the second
    scores = np.array([[[0.9, 0.5, 0.1]], [[0.1, 0.45, 0.8]]], np.float32)
    np.testing.assert_array_equal(margin_labels(None, scores, 0.2, None), [[0, IGNORE_INDEX, 1]])
    seeds = threshold_seeds(scores, [0, 2], 0.3, 0.05, background=False, margin=0.2)
    np.testing.assert_array_equal(seeds, [[0, IGNORE_INDEX, 2]])  # class 0 is a class, not background
    # one label: every pixel is that class whatever its score (nothing else it can be)
    one = threshold_seeds(np.array([[[0.01, 0.9]]], np.float32), [2], 0.3, 0.05, background=False, margin=0.2)
    np.testing.assert_array_equal(one, [[2, 2]])


def test_margin_rule_is_not_a_plain_argmax():
    rng = np.random.default_rng(0)
    scores = rng.random((2, 16, 16)).astype(np.float32)
    seeds = margin_labels(None, scores, 0.3, None)
    assert (seeds == IGNORE_INDEX).any() and (seeds != IGNORE_INDEX).any()
    confident = seeds != IGNORE_INDEX
    np.testing.assert_array_equal(seeds[confident], scores.argmax(0)[confident])


def test_margin_seed_maker_with_the_crf_keeps_class_zero_and_marks_unsure():
    maker = MarginSeeds(validate({"crf": {"mode": "margin", "iterations": 2}})["crf"])
    maker.background = False
    image = np.zeros((8, 12, 3), np.uint8)
    image[:, 6:] = 200  # a colour edge where the CAMs cross
    cams = np.zeros((2, 8, 12), np.float32)
    cams[0, :, :5], cams[1, :, 7:] = 1.0, 1.0
    cams[:, :, 5:7] = 0.5  # a tie: unsure
    seeds = maker(image, cams, [0, 1])
    assert (seeds[:, :4] == 0).all() and (seeds[:, 8:] == 1).all()
    assert (seeds[:, 5:7] == IGNORE_INDEX).all()


def test_walk_without_background_gives_every_pixel_one_of_its_labels():
    image = np.zeros((8, 8, 3), np.uint8)
    cams = np.full((2, 2, 2), 0.05, np.float32)  # weak CAMs everywhere: with a background they would be background
    cams[1, :, 1] = 0.08
    rw = {"alpha": 4.0, "beta": 8.0, "logt": 2, "ignore_below": 0.0, "final_crf": False}
    mask = pseudo_mask(image, cams, 4, [0, 2], rw, {}, has_background=False)
    assert set(np.unique(mask)) == {0, 2}
    with_bg = pseudo_mask(image, cams, 4, [1, 3], rw, {}, has_background=True)
    assert set(np.unique(with_bg)) == {0}  # the same weak CAMs are all background when there is one


def test_pair_labels_without_background_make_class_zero_pairs_ordinary_positives():
    grid = torch.tensor([[[0, 0, 1]]])
    bg, fg, neg = pair_labels(grid, [(0, 1)], background=True)
    assert bg.sum() == 1 and fg.sum() == 0 and neg.sum() == 1
    bg, fg, neg = pair_labels(grid, [(0, 1)], background=False)
    assert bg.sum() == 0 and fg.sum() == 1 and neg.sum() == 1


def test_instances_without_background_tile_with_classes_not_background():
    scores = np.zeros((2, 4, 4), np.float32)
    scores[0, :, :2], scores[1, :, 2:] = 1.0, 1.0
    out = instances_from_scores(scores, [0, 2], min_area=0.0, background=False)
    np.testing.assert_array_equal(out["mask"][:, :2], 0)
    np.testing.assert_array_equal(out["mask"][:, 2:], 2)
    assert set(np.unique(out["instance"])) == {1, 2}


# ------------------------------------------------------------------ params and datasets

def test_params_that_need_a_background_are_refused_naming_the_param():
    base = {"data": {"background": False}, "crf": {"mode": "margin"}}
    validate(base)
    for ns, key, value in (("crf", "mode", "affinitynet"), ("crf", "thresholds", "cam_sweep"),
                           ("crf", "background_cue", "saliency"), ("rw", "background", "cam_sweep"),
                           ("rw", "background_cue", "saliency")):
        raw = {**base, ns: {**base.get(ns, {}), key: value}}
        with pytest.raises(ParamsError, match=rf"param {ns}\.{key}: .*data\.background is false"):
            validate(raw)


def _scene_folder(root: Path, classes_text: str = "\n".join(SCENE) + "\n", n: int = 6) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text(classes_text)
    rows = ["image,labels"]
    for i in range(n):
        img = np.zeros((24, 32, 3), np.uint8)
        mask = np.zeros((24, 32), np.uint8)  # top half class 0 (sky)
        mask[12:] = 1 + i % 2  # bottom half grass or road
        img[mask == 0], img[mask == 1], img[mask == 2] = (90, 140, 230), (40, 160, 40), (90, 90, 90)
        Image.fromarray(img).save(root / "images" / f"s{i}.png")
        Image.fromarray(mask, mode="L").save(root / "masks" / f"s{i}.png")
        rows.append(f"s{i}.png,sky;{SCENE[1 + i % 2]}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def test_folder_without_background_reads_mask_value_zero_as_the_first_class(tmp_path):
    root = _scene_folder(tmp_path / "scenes")
    ds = FolderDataset(root, csv=root / "labels.csv", classes=root / "classes.txt", images=root / "images",
                       background=False)
    assert ds.class_names == SCENE and ds.background is False
    assert ds.labels("s0") == [0, 1] and ds.labels("s1") == [0, 2]
    rec = ds.check_item("s1")
    assert rec.labels == [0, 2]
    gt = ds.load_gt("s1")
    assert ds.class_names[int(gt[0, 0])] == "sky" and ds.class_names[int(gt[-1, 0])] == "road"
    with_bg = FolderDataset(root, csv=root / "labels.csv", classes=root / "classes.txt", images=root / "images")
    assert with_bg.class_names == ["background"] + SCENE  # the same folder read with background: one index off


def test_folder_without_background_refuses_a_background_line(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("sky\nbackground\nroad\n")
    with pytest.raises(DatasetError, match=rf"{path}:2: 'background' listed, but data.background is false"):
        read_class_list(path, background=False)


def test_prepare_refuses_a_dataset_whose_background_differs_from_the_param(tmp_path):
    from pipeline.prepare import prepare_dataset

    params = preset("tiny")
    params["data"].update(background=False, demo_num_train=2, demo_num_val=1)
    with pytest.raises(DatasetError, match=r"param data.background: false, but dataset 'demo' has background class"):
        prepare_dataset(params["data"], tmp_path / "prepared")


# ------------------------------------------------------------------ the whole graph on the tiny stuff demo

STAGES = ("prepare", "saliency", "train_cam", "make_cam", "crf", "train_aff", "random_walk", "instances", "train_seg",
          "evaluate", "export")


@pytest.fixture(scope="module")
def stuff_run(tmp_path_factory):
    return run_stages(tmp_path_factory.mktemp("stuff"), preset("tiny_stuff"), STAGES)


def _read(work: Path, name: str) -> dict:
    return json.loads((work / "metrics" / f"{name}.json").read_text())


def test_stuff_graph_runs_and_no_stage_invents_a_background(stuff_run):
    from pipeline.datasets.prepared import PreparedData
    from pipeline.store import Store

    work = stuff_run
    prepared = PreparedData(preset("tiny_stuff")["data"], work / "data/prepared")
    assert prepared.background is False and prepared.class_names[0] == "sky"
    assert tuple(prepared.palette[0]) != (0, 0, 0)  # the first class is not drawn as a background would be
    assert Store(work / "data/cams.zarr").specs["cam"].channels == len(prepared.class_names)  # a CAM per class
    stores = {"seed": Store(work / "data/seeds.zarr"), "mask": Store(work / "data/pseudo.zarr")}
    instances = Store(work / "data/instances.zarr")
    checked = 0
    for image_id in stores["mask"].ids:
        allowed = set(prepared.labels(image_id)) | {IGNORE_INDEX}
        for name, store in stores.items():
            values = set(np.unique(store.read(name, image_id)).tolist())
            assert values <= allowed, f"{name} of {image_id}: {values - allowed} not among its labels {allowed}"
        assert set(np.unique(instances.read("mask", image_id)).tolist()) <= allowed
        # the walk labels every pixel (rw.ignore_below 0): without background nothing is left over
        assert (stores["mask"].read("mask", image_id) != IGNORE_INDEX).all()
        checked += 0 not in allowed  # images without sky: a 0 there would be an invented background
    assert checked > 0


def test_stuff_graph_metrics_say_there_is_no_background(stuff_run):
    work = stuff_run
    cam, crf, rw = _read(work, "cam"), _read(work, "crf"), _read(work, "rw")
    assert cam["background"] is False and cam["best_threshold"] is None and "no background" in cam["note"]
    assert crf["background"] is False and crf["mode"] == "margin" and "bg_threshold" not in crf
    assert rw["background"] is False and rw["alpha"] is None
    for m in (cam, crf, rw, _read(work, "segmenter")):
        assert "background" not in m["per_class_iou"] and list(m["per_class_iou"])[0] == "sky"
    ckpt = torch.load(work / "models/seg/segmenter.pt", map_location="cpu", weights_only=True)
    assert ckpt["num_classes"] == 7 and ckpt["class_names"][0] == "sky"  # no background output


def test_stuff_exports_keep_class_zero_as_the_first_class(stuff_run):
    from pipeline.export.formats import read_coco, read_voc
    from pipeline.store import Store

    out = stuff_run / "exports/pseudo_masks"
    pseudo = Store(stuff_run / "data/pseudo.zarr")
    voc, coco = read_voc(out / "voc"), read_coco(out / "coco")
    for image_id in pseudo.ids:
        np.testing.assert_array_equal(voc[image_id], pseudo.read("mask", image_id))
        np.testing.assert_array_equal(coco[image_id], pseudo.read("mask", image_id))
    assert (out / "voc/class_names.txt").read_text().splitlines()[0] == "sky"
    doc = json.loads((out / "coco/annotations/instances_train.json").read_text())
    assert doc["categories"][0] == {"id": 0, "name": "sky", "supercategory": "object"}
    inst = json.loads((out / "coco_instances/annotations/instances_train.json").read_text())
    assert [c["id"] for c in inst["categories"]] == list(range(7))
    for fmt in ("voc", "coco", "zarr", "coco_instances"):
        manifest = json.loads((out / fmt / "manifest.json").read_text())
        assert manifest["background"] is False, fmt
        assert "no background class" in (out / fmt / "README.md").read_text(), fmt


# ------------------------------------------------------------------ with a background: nothing changed

DIGESTS = Path(__file__).parent / "fixtures" / "tiny_demo_digests.json"


def test_with_background_every_store_metric_model_and_export_is_what_it_was(tmp_path):
    """The tiny preset's whole graph (data.background true) against the digests recorded from commit
    d24c51c, before data.background existed (`python bench/tiny_graph_digests.py <worktree of d24c51c>
    WORK tests/fixtures/tiny_demo_digests.json`). A change that alters results on purpose records them
    again with the same command on its own code, and says so in its commit: issue 24 added
    ``world_size`` to metrics/train_cam.json, the one digest recorded again (every other one is
    d24c51c's)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from compare_runs import run_digests

    params = preset("tiny")
    assert params["data"]["background"] is True
    run_stages(tmp_path, params, STAGES)
    want, got = json.loads(DIGESTS.read_text()), run_digests(tmp_path)
    differ = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    assert not differ, f"{len(differ)} outputs differ from the recorded run: {differ[:12]}"

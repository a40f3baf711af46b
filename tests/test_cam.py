"""CAM stages: localisation, multi-scale/flip alignment, methods, checkpoints, resume, stored attributes."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.augment import MEAN, STD
from pipeline.cam import (CamInference, CamMethod, CamOutput, ClassActivationMap, GradCAM, GradCAMPlusPlus,
                          ThresholdSweep, build_method, pseudo_label, threshold_range, top_label)
from pipeline.cam.infer import scale_inputs
from pipeline.cam.run import evaluate_cam_store, make_cam_store
from pipeline.cam.train import ClassificationSet, average_precision, train_classifier
from pipeline.presets import preset
from pipeline.datasets import PreparedData
from pipeline.labels import grid_to_image
from pipeline.models.backbones import Backbone
from pipeline.models.classifier import CamClassifier, build_classifier, load_classifier, save_classifier
from pipeline.prepare import prepare_dataset
from pipeline.registry import RegistryError
from pipeline.store import Store

torch.set_num_threads(1)
TINY = preset("tiny")


class PixelPool(Backbone):
    """A 'backbone' whose features are the raw RGB values (un-normalised) averaged over os×os cells:
    cell i covers input pixels [i·os, (i+1)·os), the convention the merge code assumes."""

    def __init__(self, os: int = 8):
        super().__init__()
        self.os = os
        self.channels, self.strides = [3], [os]
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))

    def forward(self, x):
        raw = x * self.std + self.mean
        return [F.avg_pool2d(raw, self.os, ceil_mode=True)]


def channel_model(os: int = 8) -> CamClassifier:
    """Class k (channel k-1 of the CAM) = colour channel k-1 of the image."""
    model = CamClassifier(PixelPool(os), 3)
    with torch.no_grad():
        model.classifier.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
    return model.eval()


def ramp_image(h: int, w: int) -> np.ndarray:
    """R rises with x, G with y, B constant: value = 2·(pixel centre coordinate)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w, 3), np.float64)
    img[..., 0] = 2 * (xx + 0.5)
    img[..., 1] = 2 * (yy + 0.5)
    img[..., 2] = 100
    return np.clip(img.round(), 0, 255).astype(np.uint8)


def run_one(model, image, labels, scales=(1.0,), flip=False, stride=4, method="cam"):
    inf = CamInference(build_method(method, model), scales, flip, stride, "cpu")

    cams, logits = inf.run_group([scale_inputs(image, scales)], image.shape[:2], torch.as_tensor(labels)[None].bool())
    return cams[0].numpy(), logits[0].numpy()


# --- localisation ---------------------------------------------------------------------------------
def test_cam_peak_lies_inside_the_object():
    h, w = 90, 120
    image = np.full((h, w, 3), 20, np.uint8)
    y0, y1, x0, x1 = 50, 80, 70, 105
    image[y0:y1, x0:x1] = 230
    # a real conv stack (padding, strides) measuring brightness: conv 3×3 then two stride-2 convs, stride 8 in all
    bb = Backbone()
    bb.channels, bb.strides = [1], [8]
    body = nn.Sequential(nn.Conv2d(3, 1, 3, 2, 1), nn.ReLU(), nn.Conv2d(1, 1, 3, 2, 1), nn.Conv2d(1, 1, 3, 2, 1))
    with torch.no_grad():
        for conv in body:
            if isinstance(conv, nn.Conv2d):
                conv.weight.fill_(1.0 / conv.weight[0].numel())
                conv.bias.zero_()
        body[0].bias.fill_(0.5)
    bb.body = body
    bb.forward = lambda x: [bb.body(x)]
    model = CamClassifier(bb, 1)
    with torch.no_grad():
        model.classifier.weight.fill_(1.0)
    cams, _ = run_one(model.eval(), image, [1], scales=(1.0, 0.5, 1.5, 2.0), flip=True, stride=4)
    full = grid_to_image(cams, (h, w), 4)[0]
    py, px = np.unravel_index(full.argmax(), full.shape)
    assert y0 <= py < y1 and x0 <= px < x1
    assert cams.max() == pytest.approx(1.0, abs=1e-6)


# --- alignment of scales and flips ----------------------------------------------------------------
@pytest.mark.parametrize("size", [(64, 96), (61, 83)])
def test_scale_and_flip_merge_is_aligned(size):
    h, w = size
    stride = 4
    cams, _ = run_one(channel_model(8), ramp_image(h, w), [1, 1, 0], scales=(1.0, 0.5, 1.5, 2.0), flip=True,
                      stride=stride)
    gh, gw = math.ceil(h / stride), math.ceil(w / stride)
    assert cams.shape == (3, gh, gw)
    centre_x = (np.arange(gw) + 0.5) * stride  # each stored cell's centre in image pixels
    centre_y = (np.arange(gh) + 0.5) * stride
    inner_x, inner_y = slice(4, gw - 4), slice(4, gh - 4)  # at the borders the coarsest scale clamps
    # the merged map must be proportional to the ramp at the cell centres: fit a line, its offset is the shift
    for got, centres, axis in ((cams[0][inner_y, inner_x], centre_x[inner_x], 0), (cams[1][inner_y, inner_x], centre_y[inner_y], 1)):
        profile = got.mean(axis)
        slope, offset = np.polyfit(centres, profile, 1)
        shift_px = offset / slope
        assert abs(shift_px) < 0.5, f"merged map shifted by {shift_px:.2f} px"
        np.testing.assert_allclose(profile, slope * centres, atol=0.01)
        assert np.ptp(got, axis=axis).max() < 0.01  # constant along the other axis
    assert np.all(cams[2] == 0), "a class not in the labels must be exactly zero"


def test_flip_alone_matches_no_flip_on_a_flip_symmetric_model():
    image = ramp_image(48, 72)
    plain, _ = run_one(channel_model(8), image, [1, 1, 1], scales=(1.0,), flip=False)
    both, _ = run_one(channel_model(8), image, [1, 1, 1], scales=(1.0,), flip=True)
    np.testing.assert_allclose(both, plain, atol=1e-5)


# --- methods --------------------------------------------------------------------------------------
def test_method_names_resolve_to_their_classes():
    model = channel_model()
    assert type(build_method("cam", model)) is ClassActivationMap
    assert type(build_method("gradcam", model)) is GradCAM
    assert type(build_method("gradcampp", model)) is GradCAMPlusPlus
    with pytest.raises(RegistryError, match="unknown cam_method 'nope'"):
        build_method("nope", model)


def test_gradcam_equals_cam_up_to_scale_for_a_gap_linear_head_and_gradcampp_differs():
    torch.manual_seed(0)
    model = build_classifier("tiny", "none", 3).eval()
    x = torch.randn(2, 3, 40, 56)
    labels = torch.tensor([[True, False, True], [False, True, False]])
    with torch.no_grad():
        cam = torch.relu(build_method("cam", model)(x, labels).maps) * labels[..., None, None]
        grad = build_method("gradcam", model)(x, labels).maps
        gpp = build_method("gradcampp", model)(x, labels).maps
    hw = cam.shape[-2] * cam.shape[-1]
    torch.testing.assert_close(grad * hw, cam, rtol=1e-4, atol=1e-4)
    assert torch.all(gpp[~labels] == 0) and torch.all(gpp >= 0)
    a = gpp[0, 0].flatten() / gpp[0, 0].max()
    b = cam[0, 0].flatten() / cam[0, 0].max()
    assert (a - b).abs().max() > 1e-3


def test_switching_method_changes_the_stored_maps(prepared_tiny, tmp_path):
    prepared, params = prepared_tiny
    model = build_classifier("tiny", "none", prepared.num_classes - 1).eval()
    meta = {"class_names": prepared.class_names, "backbone": "tiny"}
    out = {}
    for method in ("cam", "gradcampp"):
        p = {ns: dict(v) for ns, v in params.items()}
        p["cam"]["method"] = method
        path, _ = make_cam_store(prepared, model, meta, p, torch.device("cpu"), tmp_path / f"{method}.zarr", "x")
        store = Store(path)
        assert store.attrs["method"] == method
        out[method] = store.read("cam", 0)
    assert not np.allclose(out["cam"], out["gradcampp"])


class Interrupted(Exception):
    pass


class DoubleCAM(CamMethod):
    """A plugin: CAM squared (subclassing the base class is all it takes)."""

    name = "double"

    def compute(self, features, labels):
        maps = self.model.cam(features)
        return CamOutput(torch.relu(maps) ** 2, maps.mean((2, 3)))


def test_a_plugin_method_by_dotted_path_runs():
    image = ramp_image(40, 40)
    plain, _ = run_one(channel_model(8), image, [1, 0, 0], method="cam")
    sq, _ = run_one(channel_model(8), image, [1, 0, 0], method="tests.test_cam:DoubleCAM")
    assert sq.max() == pytest.approx(1.0)
    assert np.all(sq[1:] == 0)
    assert not np.allclose(sq, plain)


def test_a_registry_entry_that_is_not_a_cam_method_is_refused():
    with pytest.raises(TypeError, match="not a CamMethod"):
        build_method("pipeline.cam.evaluate:pseudo_label", channel_model())


# --- evaluation -----------------------------------------------------------------------------------
def test_threshold_range_includes_both_ends():
    assert threshold_range(0.05, 0.6, 0.05) == [round(0.05 * k, 6) for k in range(1, 13)]
    with pytest.raises(ValueError, match="eval_thr_min"):
        threshold_range(0.5, 0.1, 0.05)


def test_pseudo_label_uses_background_below_threshold():
    cam = np.array([[[0.9, 0.2]], [[0.1, 0.3]]], np.float32)
    np.testing.assert_array_equal(pseudo_label(cam, 0.25), [[1, 2]])
    np.testing.assert_array_equal(pseudo_label(cam, 0.5), [[1, 0]])


def test_sweep_finds_the_best_threshold_and_scores_baselines():
    gt = np.zeros((4, 4), np.uint8)
    gt[:2] = 1
    cam = np.zeros((1, 4, 4), np.float32)
    cam[0, :2] = 0.5
    cam[0, 2:] = 0.2
    sweep = ThresholdSweep([0.1, 0.3, 0.6], 2)
    sweep.update(cam, gt, top_label([1], np.array([3.0])))
    out = sweep.summary(["background", "a"])
    assert out["best_threshold"] == 0.3 and out["miou"] == 100.0
    assert [c["miou"] for c in out["curve"]] == [25.0, 100.0, 25.0]
    assert out["baselines"]["all_background"]["miou"] == 25.0
    assert out["baselines"]["top_label"]["miou"] == 25.0


def test_top_label_picks_the_labelled_class_with_highest_logit():
    assert top_label([1, 3], np.array([0.5, 9.0, 0.7])) == 3


def test_grid_to_image_keeps_cell_centres():
    cam = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    full = grid_to_image(cam, (11, 15), 4)
    assert full.shape == (1, 11, 15)
    # cell (j, i) is centred at ((j + 0.5)·4, (i + 0.5)·4): between pixels 4j+1 and 4j+2
    assert full[0, 5:7, 5:7].mean() == pytest.approx(5.0) and full[0, 5:7, 9:11].mean() == pytest.approx(6.0)


def test_average_precision_of_a_perfect_ranking_is_one():
    assert average_precision(np.array([0.9, 0.1, 0.8]), np.array([1, 0, 1])) == 1.0
    assert np.isnan(average_precision(np.array([0.9]), np.array([0])))


# --- checkpoints and weights ----------------------------------------------------------------------
def test_classifier_round_trip_keeps_weights_and_metadata(tmp_path):
    model = build_classifier("tiny", "none", 4)
    path = save_classifier(tmp_path / "c.pt", model, "tiny", ["background", "a", "b", "c", "d"], {"epochs": 1})
    loaded, meta = load_classifier(path, "cpu")
    assert meta == {"backbone": "tiny", "num_classes": 4, "class_names": ["background", "a", "b", "c", "d"],
                    "params": {"epochs": 1}}
    assert isinstance(loaded.backbone, Backbone) and not loaded.training
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)


def test_load_classifier_rejects_other_checkpoints(tmp_path):
    torch.save({"model": {}}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a CAM classifier checkpoint"):
        load_classifier(tmp_path / "x.pt")
    with pytest.raises(FileNotFoundError, match="run the stage"):
        load_classifier(tmp_path / "missing.pt")


def test_load_classifier_rejects_weights_of_another_backbone(tmp_path):
    model = build_classifier("tiny", "none", 2)
    path = save_classifier(tmp_path / "c.pt", model, "tiny", ["background", "a", "b"], {})
    ckpt = torch.load(path, weights_only=True)
    ckpt["backbone"] = "resnet18"
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match="do not fit backbone 'resnet18'"):
        load_classifier(path)


# --- the stages' library functions on a tiny prepared demo ---------------------------------------
@pytest.fixture(scope="module")
def prepared_tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("camdemo") / "prepared"
    params = preset("tiny")
    params["data"].update(demo_num_train=10, demo_num_val=4)
    params["compute"]["shard_images"] = 4
    params["cam"].update(scales=[1.0, 0.5], stride=4, num_workers=0)
    prepare_dataset(params["data"], out, shard_images=4)
    return PreparedData(params["data"], out), params


def test_stored_cams_have_the_contract_attributes_and_shapes(prepared_tiny, tmp_path):
    prepared, params = prepared_tiny
    model = build_classifier("tiny", "none", prepared.num_classes - 1).eval()
    meta = {"class_names": prepared.class_names, "backbone": "tiny"}
    path, logits = make_cam_store(prepared, model, meta, params, torch.device("cpu"), tmp_path / "cams.zarr", "abc")
    store = Store(path)
    assert store.attrs["class_names"] == prepared.class_names
    assert store.attrs["stride"] == 4 and store.attrs["method"] == "cam" and store.attrs["split"] == "train"
    assert store.attrs["params"]["scales"] == [1.0, 0.5]
    assert store.ids == prepared.ids("train") and set(logits) == set(store.ids)
    for image_id in store.ids:
        cam = store.read("cam", image_id)
        h, w = prepared.size(image_id)
        assert cam.shape == (prepared.num_classes - 1, math.ceil(h / 4), math.ceil(w / 4)) and cam.dtype == np.float16
        labels = prepared.labels(image_id)
        for k in range(cam.shape[0]):
            if k + 1 in labels:
                # a labelled class peaks at 1, or is 0 everywhere when an (untrained) model scores it ≤ 0
                assert float(cam[k].max()) in (0.0, 1.0) and cam[k].min() >= 0
            else:
                assert np.all(cam[k] == 0)
    metrics = evaluate_cam_store(prepared, store, model, logits, params, torch.device("cpu"))
    assert {"miou", "best_threshold", "curve", "baselines", "per_class_iou"} <= set(metrics)
    assert len(metrics["curve"]) == len(threshold_range(0.05, 0.6, 0.05))


def test_make_cam_resumes_after_an_interruption(prepared_tiny, tmp_path, monkeypatch):
    prepared, params = prepared_tiny
    model = build_classifier("tiny", "none", prepared.num_classes - 1).eval()
    meta = {"class_names": prepared.class_names, "backbone": "tiny"}
    full, _ = make_cam_store(prepared, model, meta, params, torch.device("cpu"), tmp_path / "a.zarr", "abc")

    import pipeline.cam.run as run_mod

    real, calls, crash = run_mod.compute_cams, [], [True]

    def flaky(*args, **kw):
        calls.append(len(args[2]))
        if len(calls) == 2 and crash[0]:
            raise Interrupted
        return real(*args, **kw)

    monkeypatch.setattr(run_mod, "compute_cams", flaky)
    with pytest.raises(Interrupted):
        make_cam_store(prepared, model, meta, params, torch.device("cpu"), tmp_path / "b.zarr", "abc")
    assert not (tmp_path / "b.zarr").exists() and (tmp_path / "b.zarr.partial").exists()
    calls.clear()
    crash[0] = False
    _, logits = make_cam_store(prepared, model, meta, params, torch.device("cpu"), tmp_path / "b.zarr", "abc")
    n = len(prepared.ids("train"))
    assert sum(calls) == n - 4 and len(logits) == n - 4  # the first shard of 4 was not recomputed
    a, b = Store(full), Store(tmp_path / "b.zarr")
    for i in range(n):
        np.testing.assert_array_equal(a.read("cam", i), b.read("cam", i))


def test_make_cam_refuses_a_classifier_for_other_classes(prepared_tiny, tmp_path):
    prepared, params = prepared_tiny
    model = build_classifier("tiny", "none", prepared.num_classes - 1).eval()
    with pytest.raises(ValueError, match="re-run train_cam"):
        make_cam_store(prepared, model, {"class_names": ["background", "x"], "backbone": "tiny"}, params,
                       torch.device("cpu"), tmp_path / "c.zarr", "abc")


def test_training_resumes_after_an_interruption_with_the_same_result(prepared_tiny, tmp_path):
    prepared, params = prepared_tiny
    cam = dict(params["cam"], epochs=2, batch_size=4, crop_size=32)
    ids = prepared.ids("train")
    ds = ClassificationSet(prepared.image, ids, [prepared.label_vector(i) for i in ids], 32, 0.8, 1.2, seed=3)
    k = prepared.num_classes - 1
    straight, hist = train_classifier(ds, cam, k, torch.device("cpu"), 3)
    assert [h["epoch"] for h in hist] == [1, 2]

    resume = tmp_path / "resume.pt"

    def crash(epoch, loss):
        if epoch == 0:
            raise Interrupted

    with pytest.raises(Interrupted):
        train_classifier(ds, cam, k, torch.device("cpu"), 3, resume_path=resume, on_epoch_end=crash)
    assert resume.is_file()
    resumed, hist2 = train_classifier(ds, cam, k, torch.device("cpu"), 3, resume_path=resume)
    assert [h["epoch"] for h in hist2] == [1, 2]
    for name, v in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], v, msg=name)

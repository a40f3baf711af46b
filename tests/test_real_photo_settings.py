"""The settings that make the pipeline work on photos: frozen backbone levels and BatchNorms, the
published seed merge rules, thresholds and background taken from the CAM sweep, per-class
coverage, the affinity map and its separation diagnostic, and ``wsss params --set``."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import ParamsError, defaults, with_overrides
from pipeline.presets import preset
from pipeline.metrics import ConfusionMatrix
from pipeline.models.affinity import AffinityNet, build_affinity_net
from pipeline.models.pairs import pair_offsets
from pipeline.models.backbones import build_backbone
from pipeline.models.classifier import build_classifier
from pipeline.models.segmenter import Segmenter
from pipeline.labels import with_background
from pipeline.refine.random_walk import background_alpha, pseudo_mask, resolve_background
from pipeline.refine.seeds import merge_seeds, resolve_thresholds

torch.set_num_threads(1)


# ---------------------------------------------------------------- frozen levels and BatchNorms

def test_frozen_levels_stop_gradients_up_to_that_level_only():
    bb = build_backbone("tiny", "none")
    bb.freeze_levels(2)
    assert not any(p.requires_grad for m in (bb.stem, bb.layer1, bb.layer2) for p in m.parameters())
    assert all(p.requires_grad for p in bb.layer3.parameters())


@pytest.mark.parametrize("name", ["tiny", "resnet18", "efficientnet_lite0"])
def test_every_parameter_belongs_to_exactly_one_level(name):
    bb = build_backbone(name, "none")
    owned = [id(p) for level in bb.level_modules() for m in level for p in m.parameters()]
    assert len(owned) == len(set(owned)) == len(list(bb.parameters()))


def test_frozen_levels_out_of_range_name_the_param():
    with pytest.raises(ValueError, match="frozen_levels"):
        build_backbone("tiny", "none").freeze_levels(4)


def test_classifier_with_freeze_bn_keeps_running_statistics_while_training():
    model = build_classifier("tiny", "none", 3, freeze_bn=True).train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [bn.running_mean.clone() for bn in bns]
    model(torch.randn(2, 3, 32, 32) * 5 + 3)
    assert all(not bn.training for bn in bns)
    assert all(torch.equal(b, bn.running_mean) for b, bn in zip(before, bns))


def test_classifier_without_freeze_bn_updates_only_the_trainable_levels_statistics():
    model = build_classifier("tiny", "none", 3, frozen_levels=1).train()
    frozen_bn = model.backbone.stem[0][1]
    live_bn = model.backbone.layer3[0].body[0][1]
    a, b = frozen_bn.running_mean.clone(), live_bn.running_mean.clone()
    model(torch.randn(2, 3, 32, 32) * 5 + 3)
    assert torch.equal(a, frozen_bn.running_mean)
    assert not torch.equal(b, live_bn.running_mean)


def test_segmenter_freeze_bn_leaves_the_head_batchnorms_training():
    model = Segmenter(3, "tiny", "none", rates=[1], channels=8, freeze_bn=True).train()
    assert all(not m.training for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert all(m.training for m in model.head.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_affinity_net_unfreezes_what_the_classifier_froze_then_applies_its_own_levels(tmp_path):
    from pipeline.models.classifier import save_classifier

    clf = build_classifier("tiny", "none", 2, frozen_levels=3)
    ckpt = save_classifier(tmp_path / "c.pt", clf, "tiny", ["background", "a", "b"], {})
    model, _ = build_affinity_net("tiny", "classifier", 4, ckpt, embed_dim=32, frozen_levels=1)
    assert not any(p.requires_grad for p in model.backbone.layer1.parameters())
    assert all(p.requires_grad for p in model.backbone.layer3.parameters())
    assert model.dims == [8, 16, 32]


# ---------------------------------------------------------------- seed merge rules

FG = np.array([[1, 1, 0, 0, 2]])  # foreground-confident labelling (channel indices)
BG = np.array([[1, 0, 0, 1, 1]])  # background-confident labelling


def test_psa_rule_takes_classes_from_the_fg_map_and_background_from_the_bg_map_which_wins():
    # PSA's VOC12AffDataset: label = la; label[la == 0] = 255; label[ha == 0] = 0
    assert merge_seeds(FG, BG, "published", background_wins=True).tolist() == [[1, 0, 0, 255, 2]]


def test_irnet_rule_keeps_foreground_where_the_fg_map_has_a_class():
    # IRNet's cam_to_ir_label: conf = fg; conf[fg == 0] = 255; conf[fg + bg == 0] = 0
    assert merge_seeds(FG, BG, "published", background_wins=False).tolist() == [[1, 1, 0, 255, 2]]


def test_agree_rule_keeps_only_common_labels():
    assert merge_seeds(FG, BG, "agree", background_wins=False).tolist() == [[1, 255, 0, 255, 255]]


def test_unknown_merge_rule_names_the_param():
    with pytest.raises(ValueError, match="crf.merge"):
        merge_seeds(FG, BG, "vote", background_wins=False)


# ---------------------------------------------------------------- thresholds from the CAM sweep

def test_cam_sweep_thresholds_scale_the_best_cam_threshold():
    crf = dict(defaults()["crf"], thresholds="cam_sweep", fg_ratio=1.5, bg_ratio=0.5)
    out = resolve_thresholds(crf, 0.4)
    assert out["fg_threshold"] == pytest.approx(0.6) and out["bg_threshold"] == pytest.approx(0.2)
    assert resolve_thresholds(dict(crf, thresholds="fixed"), 0.4)["fg_threshold"] == crf["fg_threshold"]


def test_cam_sweep_thresholds_without_a_sweep_fail_naming_the_param():
    crf = dict(defaults()["crf"], thresholds="cam_sweep")
    with pytest.raises(ValueError, match="crf.thresholds"):
        resolve_thresholds(crf, None)


@pytest.mark.parametrize("t", [0.05, 0.13, 0.35, 0.6])
def test_background_alpha_puts_the_background_channel_at_the_threshold(t):
    alpha = background_alpha(t)
    assert (1 - t) ** alpha == pytest.approx(t)


def test_psa_alpha_16_is_a_threshold_near_0_12():
    assert background_alpha(0.123) == pytest.approx(16, abs=0.2)


def test_cam_sweep_background_without_the_walk_reproduces_the_thresholded_cam():
    rng = np.random.default_rng(0)
    cams = rng.random((2, 12, 16)).astype(np.float32)
    rw = resolve_background(dict(defaults()["rw"], background="cam_sweep", enabled=False), 0.35)
    mask = pseudo_mask(np.zeros((12, 16, 3), np.uint8), cams, 1, [4, 7], rw, defaults()["crf"])
    top, arg = cams.max(0), cams.argmax(0)
    expected = np.where(top < 0.35, 0, np.array([4, 7])[arg])
    near = np.abs(top - 0.35) < 1e-3  # ties at the threshold itself may go either way
    assert (mask[~near] == expected[~near]).all()


def test_cam_sweep_background_without_a_sweep_fails_naming_the_param():
    with pytest.raises(ValueError, match="rw.background"):
        resolve_background(dict(defaults()["rw"], background="cam_sweep"), None)


# ---------------------------------------------------------------- metrics

def test_per_class_coverage_counts_unlabelled_pixels_by_their_gt_class():
    cm = ConfusionMatrix(3)
    gt = np.array([[0, 0, 0, 0, 1, 1, 2, 255]], np.uint8)
    pred = np.array([[0, 255, 255, 255, 1, 255, 2, 255]], np.uint8)
    cm.update(pred, gt)
    s = cm.summary(["bg", "a", "b"])
    assert s["per_class_coverage"] == {"bg": 25.0, "a": 50.0, "b": 100.0}
    assert s["coverage"] == pytest.approx(100 * 3 / 7, abs=0.01)


# ---------------------------------------------------------------- the affinity map

def test_affinities_match_a_loop_over_pixel_pairs():
    rng = np.random.default_rng(1)
    emb = rng.random((1, 3, 5, 6)).astype(np.float32)
    offsets = pair_offsets(3)
    aff = AffinityNet.affinities(torch.from_numpy(emb), offsets).numpy()[0]
    for p, (dy, dx) in enumerate(offsets):
        for y in range(5):
            for x in range(6):
                y2, x2 = y + dy, x + dx
                if 0 <= y2 < 5 and 0 <= x2 < 6:
                    want = np.exp(-np.abs(emb[0, :, y, x] - emb[0, :, y2, x2]).mean())
                else:
                    want = 0.0
                assert aff[p, y, x] == pytest.approx(want, abs=1e-6), (dy, dx, y, x)


# ---------------------------------------------------------------- params

def test_set_overrides_parse_yaml_values_and_validate():
    p = with_overrides(preset("tiny"), ["data.root=/datasets/VOC2012", "cam.scales=[1.0, 0.5]", "crf.enabled=false"])
    assert p["data"]["root"] == "/datasets/VOC2012" and p["cam"]["scales"] == [1.0, 0.5]
    assert p["crf"]["enabled"] is False
    with pytest.raises(ParamsError, match="cam.epochs"):
        with_overrides(preset("tiny"), ["cam.epochs=many"])
    with pytest.raises(ParamsError, match="NAMESPACE.KEY=VALUE"):
        with_overrides(preset("tiny"), ["epochs=3"])


def test_with_background_is_the_power_of_one_minus_the_max():
    cams = np.array([[[0.2, 0.9]], [[0.5, 0.1]]], np.float32)
    assert np.allclose(with_background(cams, 2.0)[0], [[0.25, 0.01]])

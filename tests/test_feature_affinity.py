"""Training-free affinities (rw.affinity features / mix): the similarity terms by hand, that they
separate regions a walk must not cross, the untrained checkpoint, and the kind checks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.augment import normalise
from pipeline.models.affinity import build_affinity_net, save_affinity_net
from pipeline.models.pairs import pair_offsets
from pipeline.models.backbones import build_backbone
from pipeline.refine.feature_affinity import (FeatureAffinity, MixedAffinity, colour_similarity, feature_similarity,
                                              load_walk_affinity, save_feature_affinity)
from pipeline.refine.random_walk import pseudo_mask
from pipeline.refine.walk_affinity import image_affinities


def test_feature_similarity_is_one_inside_a_region_and_zero_across_orthogonal_features():
    f = torch.zeros(1, 2, 4, 6)
    f[:, 0, :, :3] = 2.0  # left half: feature (1, 0); right half: (0, 1), any length
    f[:, 1, :, 3:] = 0.5
    sim = feature_similarity([f, f], (4, 6), [(0, 1)])[0, 0]
    np.testing.assert_allclose(sim[:, [0, 1, 3, 4]], 1.0, atol=1e-6)
    np.testing.assert_allclose(sim[:, 2], 0.0, atol=1e-6)  # (y, 2) -> (y, 3) crosses the boundary
    np.testing.assert_allclose(sim[:, 5], 0.0, atol=1e-6)  # partner outside the grid


def test_colour_similarity_is_the_gaussian_colour_kernel_on_cell_means():
    image = np.zeros((8, 8, 3), np.uint8)
    image[:, 4:] = (30, 0, 0)  # right half 30 units of red away
    x = normalise(image)[None]
    k = colour_similarity(x, 4, [(0, 1), (1, 0)], sigma=15.0)[0]
    assert k.shape == (2, 2, 2)
    assert k[0, 0, 0].item() == pytest.approx(np.exp(-30.0 ** 2 / (2 * 15.0 ** 2)), rel=1e-3)  # across the halves
    assert k[1, 0, 1].item() == pytest.approx(1.0)  # the cell below: same colour


def _two_region_image():
    image = np.zeros((48, 64, 3), np.uint8)
    image[:, :32] = (200, 60, 60)
    image[:, 32:] = (40, 160, 60)
    return image


def test_feature_affinity_stops_the_walk_at_a_colour_boundary():
    torch.manual_seed(0)
    model = FeatureAffinity(build_backbone("tiny", "none"), stride=4, radius=3, colour_sigma=10.0).eval()
    offsets = pair_offsets(3)
    image = _two_region_image()
    aff = image_affinities(model, image, offsets)
    assert aff.shape == (len(offsets), 12, 16) and 0.0 <= float(aff.min()) and float(aff.max()) <= 1.0 + 1e-6
    right = offsets.index((0, 1))
    assert float(aff[right, 5, 3]) > 0.5 and float(aff[right, 5, 7]) < 1e-3  # inside vs across (cells 7 -> 8)
    # a CAM that leaks over the boundary: the walk keeps the class on its own side
    cam = np.zeros((1, 12, 16), np.float32)
    cam[0, :, :10] = 0.9
    rw = {"beta": 4.0, "logt": 5, "alpha": 1.0, "ignore_below": 0.0, "final_crf": False}
    walked = pseudo_mask(image, cam, 4, [5], rw, {}, aff=aff, offsets=offsets, aff_stride=4)
    assert (walked[:, :28] == 5).mean() > 0.95 and (walked[:, 36:] == 0).mean() > 0.95
    no_walk = pseudo_mask(image, cam, 4, [5], rw, {})
    assert (no_walk[:, 32:40] == 5).mean() > 0.9  # without the walk the leak stays: the walk is not a no-op
    assert (walked[:, 32:40] == 0).mean() > 0.9


def test_features_checkpoint_reloads_and_refuses_another_kind(tmp_path):
    torch.manual_seed(0)
    backbone = build_backbone("tiny", "none")
    save_feature_affinity(tmp_path / "f.pt", backbone, "tiny", stride=4, radius=3)
    rw = {"affinity": "features", "colour_sigma": 10.0}
    model = load_walk_affinity(tmp_path / "f.pt", rw)
    assert isinstance(model, FeatureAffinity) and model.radius == 3 and model.stride == 4
    reference = FeatureAffinity(backbone, 4, 3, 10.0).eval()
    x = normalise(_two_region_image())[None]
    with torch.no_grad():
        assert torch.allclose(model(x, pair_offsets(3)), reference(x, pair_offsets(3)), atol=1e-6)
    with pytest.raises(ValueError, match="f.pt.*'features'.*re-run the train_aff stage"):
        load_walk_affinity(tmp_path / "f.pt", {"affinity": "affinitynet", "colour_sigma": 10.0})
    net, name = build_affinity_net("tiny", "none", 4)
    save_affinity_net(tmp_path / "a.pt", net, name, 3)
    with pytest.raises(ValueError, match="a.pt.*'affinitynet'.*features"):
        load_walk_affinity(tmp_path / "a.pt", rw)


def test_mix_is_the_geometric_mean_of_learnt_and_free_affinities(tmp_path):
    torch.manual_seed(0)
    net, name = build_affinity_net("tiny", "none", 4)
    save_affinity_net(tmp_path / "a.pt", net, name, 3)
    mixed = load_walk_affinity(tmp_path / "a.pt", {"affinity": "mix", "colour_sigma": 10.0})
    learnt = load_walk_affinity(tmp_path / "a.pt", {"affinity": "affinitynet", "colour_sigma": 10.0})
    assert isinstance(mixed, MixedAffinity)
    free = FeatureAffinity(learnt.backbone, 4, 3, 10.0).eval()
    x = normalise(_two_region_image())[None]
    offs = pair_offsets(3)
    with torch.no_grad():
        expected = (learnt(x, offs) * free(x, offs)).sqrt()
        got, disp = mixed.relations(x, offs)
    assert torch.allclose(got, expected, atol=1e-5)
    assert disp.shape == (1, 2, 12, 16)


def test_train_aff_with_features_saves_the_backbone_without_training(tmp_path):
    from pipeline.refine.affinity_training import run_train_aff
    from synthetic import tiny_data_with_gt_seeds

    params, prepared, _ = tiny_data_with_gt_seeds(tmp_path, num_train=3)
    prepared_dir = prepared.dir
    params = dict(params, rw=dict(params["rw"], affinity="features"), affinity=dict(params["affinity"], init="none"))
    result = run_train_aff(prepared_dir, params, tmp_path / "seeds.zarr", tmp_path / "none.pt", tmp_path / "f.pt",
                           device=torch.device("cpu"), resume=tmp_path / "resume.pt")
    assert result["history"] == [] and result["metrics"]["model"] == "features"
    model = load_walk_affinity(tmp_path / "f.pt", {"affinity": "features", "colour_sigma": 12.0})
    assert model.radius == params["affinity"]["radius"] and model.stride == params["affinity"]["stride"]
    assert not (tmp_path / "resume.pt").exists()

"""Random walk: stencil propagation, agreement with the dense reference, the rw.enabled switch, the store."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.datasets import PreparedData
from pipeline.models.affinity import AffinityNet, affinity_checkpoint
from pipeline.models.pairs import pair_offsets
from pipeline.models.backbones import build_backbone
from pipeline.labels import grid_to_image, to_class_labels, with_background
from pipeline.refine.runner import open_store
from pipeline.refine.random_walk import dense_transition, propagate, pseudo_mask, random_walk, random_walk_dense, stencil, transition_weights
from pipeline.refine.walk_store import make_pseudo_store
from synthetic import tiny_demo_with_cams
from pipeline.checkpoint import save_checkpoint


def cut_affinity(h, w, offsets, cut):
    """Affinity 1 everywhere except 0 for every pair that crosses the column boundary ``cut``."""
    aff = np.ones((len(offsets), h, w), np.float32)
    xs = np.arange(w)[None, :].repeat(h, 0)
    for p, (dy, dx) in enumerate(offsets):
        crosses = (xs < cut) != (xs + dx < cut)
        aff[p][crosses] = 0.0
    return aff


def test_walk_spreads_inside_a_region_but_not_across_a_zero_affinity_edge():
    offsets = pair_offsets(3)
    h, w, cut = 10, 16, 7
    aff = cut_affinity(h, w, offsets, cut)
    scores = np.zeros((1, h, w), np.float32)
    scores[0, 5, 2] = 1.0  # a single spike in the left region
    out = random_walk(scores, aff, offsets, beta=8.0, logt=6)[0]
    assert (out[:, :cut] > 0).all()  # reached every cell on its side
    assert (out[:, cut:] == 0).all()  # nothing leaked through the cut
    assert out[:, :cut].max() < 0.5  # and was spread out, not left in place


def test_transition_rows_sum_to_one_and_affinity_is_symmetric():
    offsets = pair_offsets(3)
    g = torch.Generator().manual_seed(0)
    aff = torch.rand(len(offsets), 6, 7, generator=g)
    t = dense_transition(aff.numpy(), offsets, beta=2.0)
    assert np.allclose(t.sum(1), 1.0, atol=1e-5)
    a = t / t.diagonal()[:, None]  # undo D^-1 (the self-affinity is 1)
    assert np.allclose(a, a.T, atol=1e-5)


def test_stencil_walk_matches_dense_matrix_squaring():
    offsets = pair_offsets(4)
    rng = np.random.default_rng(1)
    aff = rng.random((len(offsets), 9, 11)).astype(np.float32)
    scores = rng.random((3, 9, 11)).astype(np.float32)
    ours = random_walk(scores, aff, offsets, beta=8.0, logt=5)
    ref = random_walk_dense(scores, aff, offsets, beta=8.0, logt=5)
    assert np.allclose(ours, ref, atol=1e-5)
    assert (ours.argmax(0) == ref.argmax(0)).all()


def test_zero_steps_leave_scores_unchanged():
    offsets = pair_offsets(2)
    aff = torch.rand(len(offsets), 4, 5)
    scores = torch.rand(2, 4, 5)
    w = transition_weights(aff, offsets, 8.0)
    assert w.shape[0] == len(stencil(offsets))
    assert torch.equal(propagate(scores, w, offsets, 0), scores)


RW = {"enabled": True, "beta": 8.0, "logt": 4, "background": "fixed", "alpha": 16.0, "ignore_below": 0.0, "final_crf": False}


def test_disabled_walk_gives_cam_labels_with_background_channel():
    rng = np.random.default_rng(0)
    cam = rng.random((2, 5, 6)).astype(np.float32)
    image = np.zeros((18, 23, 3), np.uint8)
    got = pseudo_mask(image, cam, 4, [2, 4], dict(RW, enabled=False), {})
    expect = to_class_labels(grid_to_image(with_background(cam, 16.0), (18, 23), 4).argmax(0), [2, 4])
    assert got.dtype == np.uint8 and np.array_equal(got, expect)
    assert set(np.unique(got)) <= {0, 2, 4}


def test_low_confidence_pixels_become_ignore():
    cam = np.zeros((1, 4, 4), np.float32)
    cam[0, :2] = 0.9
    image = np.zeros((8, 8, 3), np.uint8)
    got = pseudo_mask(image, cam, 2, [1], dict(RW, enabled=False, alpha=1.0, ignore_below=0.6), {})
    assert (got[:4] == 1).all()
    assert (got[5:] == 0).all()  # background score (1 - 0)^1 = 1 is confident
    cam[0, 2:] = 0.5  # background 0.5, foreground 0.5: neither reaches 0.6
    got = pseudo_mask(image, cam, 2, [1], dict(RW, enabled=False, alpha=1.0, ignore_below=0.6), {})
    assert (got[5:] == 255).all()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("rwdemo")
    params, prepared_dir, cams = tiny_demo_with_cams(root, num_train=4)
    model = AffinityNet(build_backbone("tiny", "none"), stride=4)
    ck = save_checkpoint(root / "affinity.pt", affinity_checkpoint(model, "tiny", radius=3))
    return params, prepared_dir, cams, ck


def _masks(path):
    s = open_store(path)
    return [s.read("mask", i) for i in s.ids]


def test_pseudo_store_holds_labels_of_each_image(demo, tmp_path):
    params, prepared_dir, cams, ck = demo
    m = make_pseudo_store(prepared_dir, params["data"], cams, ck, tmp_path / "p.zarr", RW, params["crf"],
                          dict(params["compute"], scheduler="synchronous"))
    prepared = PreparedData(params["data"], prepared_dir)
    store = open_store(tmp_path / "p.zarr")
    for image_id in store.ids:
        mask = store.read("mask", image_id)
        assert mask.shape == prepared.size(image_id) and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, *prepared.labels(image_id)}
    assert m["enabled"] is True and m["coverage"] == 100.0 and m["radius"] == 3


@pytest.mark.parametrize("scheduler", ["threads", "local"])
def test_walk_is_identical_across_dask_schedulers(demo, tmp_path, scheduler):
    params, prepared_dir, cams, ck = demo
    make_pseudo_store(prepared_dir, params["data"], cams, ck, tmp_path / "a.zarr", RW, params["crf"],
                      dict(params["compute"], scheduler="synchronous"))
    make_pseudo_store(prepared_dir, params["data"], cams, ck, tmp_path / "b.zarr", RW, params["crf"],
                      dict(params["compute"], scheduler=scheduler, workers=1 if scheduler == "local" else 2))
    assert all(np.array_equal(a, b) for a, b in zip(_masks(tmp_path / "a.zarr"), _masks(tmp_path / "b.zarr")))


def test_disabled_walk_needs_no_model_and_says_so(demo, tmp_path):
    params, prepared_dir, cams, _ = demo
    m = make_pseudo_store(prepared_dir, params["data"], cams, None, tmp_path / "p.zarr", dict(RW, enabled=False),
                          params["crf"], dict(params["compute"], scheduler="synchronous"))
    assert m["enabled"] is False
    assert len(_masks(tmp_path / "p.zarr")) == 4


def test_missing_model_is_a_clear_error(demo, tmp_path):
    params, prepared_dir, cams, _ = demo
    with pytest.raises(FileNotFoundError, match="train_aff"):
        make_pseudo_store(prepared_dir, params["data"], cams, tmp_path / "none.pt", tmp_path / "p.zarr", RW,
                          params["crf"], dict(params["compute"], scheduler="synchronous"))

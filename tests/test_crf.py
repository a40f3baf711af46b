"""CRF seeds: the dense CRF, the seed makers, the crf.enabled switch, dask schedulers and resume."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.refine.runner import open_store
from pipeline.refine.crf import CrfSettings, crf_argmax, label_crf
from pipeline.refine.seeds import (AffinityNetSeeds, SeedMaker, agreeing, make_seed, make_seed_store, seed_maker,
                                   threshold_seeds)
from synthetic import tiny_demo_with_cams
from pipeline.registry import REFINERS

SETTINGS = CrfSettings(iterations=10, bilateral_sxy=20.0)


def two_colour_image(h=40, w=60, edge=30):
    image = np.zeros((h, w, 3), np.uint8)
    image[:, :edge] = (200, 40, 40)
    image[:, edge:] = (40, 40, 200)
    return image


def ramp_probs(h=40, w=60, cross=24, width=8.0):
    """Two-label scores whose 0.5 crossing is at column ``cross`` (off the colour edge)."""
    x = np.arange(w, dtype=np.float32)
    right = 1 / (1 + np.exp(-(x - cross) / width * 4))
    right = np.clip(right, 0.3, 0.7)  # a weak, uncertain unary so the pairwise terms decide
    p = np.stack([1 - right, right])[:, None, :].repeat(h, 1)
    return p.astype(np.float32)


def test_crf_snaps_boundary_to_colour_edge():
    image, probs = two_colour_image(), ramp_probs()
    raw = probs.argmax(0)
    out = crf_argmax(image, probs, SETTINGS)
    truth = np.zeros(raw.shape, int)
    truth[:, 30:] = 1
    assert (raw == truth).mean() < 0.92  # the unary alone puts the edge at x = 24
    assert (out == truth).mean() > 0.98


def test_label_crf_snaps_shifted_labels_to_colour_edge():
    image = two_colour_image()
    labels = np.zeros((40, 60), np.int64)
    labels[:, 25:] = 1
    out = label_crf(image, labels, 2, 0.6, SETTINGS)
    truth = np.zeros((40, 60), int)
    truth[:, 30:] = 1
    assert (out == truth).mean() > 0.98


def test_crf_at_half_scale_agrees_with_full_scale():
    image, probs = two_colour_image(), ramp_probs()
    full = crf_argmax(image, probs, SETTINGS)
    half = crf_argmax(image, probs, CrfSettings(iterations=10, bilateral_sxy=20.0, scale=0.5))
    assert (full == half).mean() > 0.97


def test_disagreeing_labellings_become_ignore():
    a = np.array([[0, 1, 2], [1, 1, 0]])
    b = np.array([[0, 2, 2], [0, 1, 0]])
    assert agreeing(a, b).tolist() == [[0, 255, 2], [255, 1, 0]]


def test_affinitynet_seeds_leave_the_uncertain_band_unlabelled():
    h, w = 40, 60
    image = np.full((h, w, 3), 120, np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    dist = np.hypot(yy - 20, xx - 30)
    cam = np.clip(1 - dist / 25, 0, 1)[None].astype(np.float32)  # one class (index 3), peak at the centre
    crf = {"alpha_fg": 4.0, "alpha_bg": 32.0, "iterations": 5, "gaussian_sxy": 3.0, "gaussian_compat": 3.0,
           "bilateral_sxy": 80.0, "bilateral_srgb": 13.0, "bilateral_compat": 10.0, "merge": "published"}
    seed = AffinityNetSeeds(crf)(image, cam, [3])
    assert set(np.unique(seed)) <= {0, 3, 255}
    assert seed[20, 30] == 3 and seed[0, 0] == 0
    assert (seed == 255).any()  # a band between confident foreground and background stays unsure


def test_threshold_seeds_without_crf():
    cams = np.array([[[0.9, 0.5, 0.2, 0.01]], [[0.1, 0.6, 0.1, 0.02]]], np.float32)  # (2 classes, 1, 4)
    seed = threshold_seeds(cams, [2, 5], fg_threshold=0.3, bg_threshold=0.05)
    assert seed.tolist() == [[2, 5, 255, 0]]


def test_seed_makers_are_registered_and_pluggable():
    assert {"affinitynet", "irnet"} <= set(REFINERS.names())

    @REFINERS.register("test_all_background")
    class AllBackground(SeedMaker):
        def __call__(self, image, cams, classes):
            return np.zeros(image.shape[:2], np.uint8)

    maker = seed_maker({"mode": "test_all_background", **vars(CrfSettings())})
    assert (maker(two_colour_image(), np.zeros((1, 40, 60), np.float32), [1]) == 0).all()


def test_unknown_mode_is_a_clear_error():
    with pytest.raises(KeyError, match="no_such_mode"):
        seed_maker({"mode": "no_such_mode"})


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return tiny_demo_with_cams(tmp_path_factory.mktemp("crfdemo"), num_train=6, crf_iterations=3)


def _seeds(path):
    s = open_store(path)
    return [s.read("seed", i) for i in s.ids]


@pytest.fixture(scope="module")
def reference_seeds(demo, tmp_path_factory):
    params, prepared_dir, cams = demo
    out = tmp_path_factory.mktemp("ref") / "seeds.zarr"
    make_seed_store(prepared_dir, params["data"], cams, out, params["crf"], dict(params["compute"], scheduler="synchronous"))
    return _seeds(out)


@pytest.mark.parametrize("scheduler", ["threads", "processes", "local"])
def test_dask_schedulers_give_identical_seeds(demo, reference_seeds, tmp_path, scheduler):
    params, prepared_dir, cams = demo
    compute = dict(params["compute"], scheduler=scheduler, workers=2)
    make_seed_store(prepared_dir, params["data"], cams, tmp_path / "s.zarr", params["crf"], compute)
    got = _seeds(tmp_path / "s.zarr")
    assert len(got) == len(reference_seeds)
    assert all(np.array_equal(a, b) for a, b in zip(got, reference_seeds))


def test_seed_store_resumes_after_interruption(demo, reference_seeds, tmp_path, monkeypatch):
    import pipeline.refine.seeds as seeds_module

    params, prepared_dir, cams = demo
    compute = dict(params["compute"], scheduler="synchronous")
    out = tmp_path / "seeds.zarr"
    calls = []

    def dies_on_third_image(task):
        calls.append(task.image_id)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return make_seed(task)

    monkeypatch.setattr(seeds_module, "make_seed", dies_on_third_image)
    with pytest.raises(KeyboardInterrupt):
        make_seed_store(prepared_dir, params["data"], cams, out, params["crf"], compute)
    assert not out.exists() and out.with_name("seeds.zarr.partial").exists()  # nothing looks complete
    monkeypatch.undo()
    resumed = make_seed_store(prepared_dir, params["data"], cams, out, params["crf"], compute)
    assert resumed["resumed_shards"] == 1  # the first shard (2 images) was not recomputed
    assert all(np.array_equal(a, b) for a, b in zip(_seeds(out), reference_seeds))


def test_disabled_crf_passes_thresholded_cams_through(demo, tmp_path):
    params, prepared_dir, cams = demo
    crf = dict(params["crf"], enabled=False)
    m = make_seed_store(prepared_dir, params["data"], cams, tmp_path / "s.zarr", crf,
                        dict(params["compute"], scheduler="synchronous"))
    assert m["enabled"] is False and m["mode"] == "threshold"
    assert 0 < m["coverage"] <= 100
    seeds = _seeds(tmp_path / "s.zarr")
    assert all(s.dtype == np.uint8 for s in seeds)

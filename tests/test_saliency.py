"""Saliency as the background cue: the built-in spectral residual, maps read from a folder (and
their errors), the seed and walk rules by hand, and that switching the cue changes the stores."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from pipeline.config import ParamsError, defaults, preset, validate
from pipeline.datasets import PreparedData
from pipeline.labels import IGNORE_INDEX
from pipeline.refine.random_walk import make_pseudo_store, pseudo_mask
from pipeline.refine.runner import open_store
from pipeline.refine.seeds import make_seed_store
from pipeline.saliency import (SaliencyError, background_score, read_saliency_png, saliency_digest, saliency_map,
                               seeds_with_saliency, spectral_residual)
from synthetic import tiny_demo, write_fake_cams

SAL = dict(defaults()["saliency"])


def test_spectral_residual_marks_the_odd_object_on_a_plain_background():
    rng = np.random.default_rng(0)
    image = np.clip(rng.normal(120, 4, (96, 128, 3)), 0, 255).astype(np.uint8)
    image[40:56, 80:96] = (230, 40, 40)
    sal = spectral_residual(image)
    assert sal.shape == (96, 128) and sal.dtype == np.float32
    assert sal.min() == pytest.approx(0.0) and sal.max() == pytest.approx(1.0)
    assert sal[40:56, 80:96].mean() > 3 * sal[:, :40].mean()


def test_folder_maps_are_read_scaled_and_resized(tmp_path):
    cv2.imwrite(str(tmp_path / "a.png"), np.full((10, 20), 255, np.uint8))
    cv2.imwrite(str(tmp_path / "b.png"), np.full((10, 20), 32768, np.uint16))
    a = read_saliency_png(tmp_path / "a.png", (20, 40))
    assert a.shape == (20, 40) and np.allclose(a, 1.0)
    assert np.allclose(read_saliency_png(tmp_path / "b.png", (10, 20)), 32768 / 65535)


def test_bad_or_missing_maps_name_the_file_or_are_skipped(tmp_path):
    (tmp_path / "corrupt.png").write_bytes(b"not a png")
    cv2.imwrite(str(tmp_path / "colour.png"), np.dstack([np.zeros((4, 4), np.uint8), np.full((4, 4), 9, np.uint8),
                                                         np.zeros((4, 4), np.uint8)]))
    with pytest.raises(SaliencyError, match="missing.png"):
        read_saliency_png(tmp_path / "missing.png", (4, 4))
    with pytest.raises(SaliencyError, match="corrupt.png"):
        read_saliency_png(tmp_path / "corrupt.png", (4, 4))
    with pytest.raises(SaliencyError, match="colour.png.*not a grey"):
        read_saliency_png(tmp_path / "colour.png", (4, 4))
    image = np.zeros((4, 4, 3), np.uint8)
    folder = dict(SAL, source="folder", folder=str(tmp_path))
    with pytest.raises(SaliencyError, match="missing.png"):
        saliency_map("missing", image, folder)
    assert saliency_map("missing", image, dict(folder, on_missing="skip")) is None


def test_seed_rule_by_hand():
    seeds = np.array([[0, 0, 3, 3, IGNORE_INDEX]], np.uint8)
    sal = np.array([[0.05, 0.9, 0.05, 0.9, 0.1]], np.float32)
    out = seeds_with_saliency(seeds, sal, dict(SAL, bg_threshold=0.15, fg_threshold=0.5))
    # low saliency -> background whatever the CAM said; CAM background that is salient -> unsure
    np.testing.assert_array_equal(out, [[0, IGNORE_INDEX, 0, 3, 0]])


def test_walk_background_channel_comes_from_saliency():
    image = np.zeros((4, 8, 3), np.uint8)
    cam_grid = np.full((1, 4, 8), 0.4, np.float32)  # one class, the same score everywhere, stride 1
    rw = {"enabled": False, "alpha": 1.0, "ignore_below": 0.0, "final_crf": False}
    sal = np.zeros((4, 8), np.float32)
    sal[:, 4:] = 1.0
    out = pseudo_mask(image, cam_grid, 1, [7], rw, {}, background=background_score(sal))
    np.testing.assert_array_equal(out[:, :4], 0)
    np.testing.assert_array_equal(out[:, 4:], 7)
    # the CAM cue: (1 - 0.4)^1 = 0.6 > 0.4 everywhere -> all background
    np.testing.assert_array_equal(pseudo_mask(image, cam_grid, 1, [7], rw, {}), 0)


def test_params_name_the_saliency_folder(tmp_path):
    params = preset("tiny")
    params["crf"]["background_cue"] = "saliency"
    params["saliency"]["source"] = "folder"
    with pytest.raises(ParamsError, match="saliency.folder"):
        validate(params)
    params["saliency"]["folder"] = str(tmp_path / "nowhere")
    with pytest.raises(ParamsError, match="saliency.folder.*nowhere"):
        validate(params)
    params["saliency"]["folder"] = str(tmp_path)
    validate(params)
    params["saliency"].update(bg_threshold=0.6, fg_threshold=0.5)
    with pytest.raises(ParamsError, match="saliency.bg_threshold"):
        validate(params)


def test_folder_digest_changes_when_a_map_changes(tmp_path):
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((4, 4), np.uint8))
    sal = dict(SAL, source="folder", folder=str(tmp_path))
    first = saliency_digest(sal)["digest"]
    cv2.imwrite(str(tmp_path / "a.png"), np.full((4, 4), 7, np.uint8))
    assert saliency_digest(sal)["digest"] != first
    assert saliency_digest(SAL)["digest"] == "spectral"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("saldemo")
    params, prepared_dir = tiny_demo(root, num_train=4, num_val=1)
    prepared = PreparedData(params["data"], prepared_dir)
    cams = write_fake_cams(prepared, prepared.ids("train"), root / "cams.zarr", stride=4)
    params["crf"]["iterations"] = 2
    params["compute"].update(shard_images=2, scheduler="synchronous")
    folders = {}
    for name, value in (("black", 0), ("white", 255)):
        folders[name] = root / name
        folders[name].mkdir()
        for i in prepared.ids("train"):
            h, w = prepared.size(i)
            cv2.imwrite(str(folders[name] / f"{i}.png"), np.full((h, w), value, np.uint8))
    return params, prepared_dir, cams, folders


def _labels(path, array):
    s = open_store(path)
    return np.concatenate([s.read(array, i).ravel() for i in s.ids])


def test_saliency_decides_the_seeds_background(demo, tmp_path):
    params, prepared_dir, cams, folders = demo
    crf = dict(params["crf"], background_cue="saliency")
    for name in ("black", "white"):
        sal = dict(SAL, source="folder", folder=str(folders[name]))
        m = make_seed_store(prepared_dir, params["data"], cams, tmp_path / f"{name}.zarr", crf, params["compute"],
                            saliency=sal)
        assert m["background_cue"] == "saliency"
    cam_cue = make_seed_store(prepared_dir, params["data"], cams, tmp_path / "cam.zarr", params["crf"], params["compute"],
                              saliency=SAL)
    assert cam_cue["background_cue"] == "cam"
    assert (_labels(tmp_path / "cam.zarr", "seed") == 0).any()
    assert (_labels(tmp_path / "black.zarr", "seed") == 0).all()  # nothing salient: all background
    assert not (_labels(tmp_path / "white.zarr", "seed") == 0).any()  # everything salient: no background


def test_saliency_decides_the_walks_background(demo, tmp_path):
    params, prepared_dir, cams, folders = demo
    rw = {"enabled": False, "beta": 8.0, "logt": 4, "background": "fixed", "alpha": 16.0, "ignore_below": 0.0,
          "final_crf": False, "background_cue": "saliency"}
    for name in ("black", "white"):
        m = make_pseudo_store(prepared_dir, params["data"], cams, None, tmp_path / f"{name}.zarr", rw, params["crf"],
                              params["compute"], saliency=dict(SAL, source="folder", folder=str(folders[name])))
        assert m["background_cue"] == "saliency"
    assert (_labels(tmp_path / "black.zarr", "mask") == 0).all()  # background score 1 beats every CAM
    assert not (_labels(tmp_path / "white.zarr", "mask") == 0).any()  # background score 0: always a class

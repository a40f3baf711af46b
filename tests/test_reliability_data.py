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

from pipeline.config import render_params
from pipeline.presets import preset
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


# ------------------------------------------------------------------ B: messages name the file / param

def test_non_utf8_labels_csv_names_the_file_and_line(tmp_path):
    root = make_folder(tmp_path / "ds", n=3)
    csv_path = root / "labels.csv"
    lines = csv_path.read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b".png", "_caf\u00e9.png".encode("latin-1"))  # line 3: Latin-1, not UTF-8
    csv_path.write_bytes(b"\n".join(lines))
    with pytest.raises(DatasetError, match=r"labels\.csv:3: .*UTF-8") as err:
        FolderDataset(root, csv=csv_path, classes=root / "classes.txt", images=root / "images")
    assert str(csv_path) in str(err.value)


def test_non_utf8_class_list_names_the_file_and_line(tmp_path):
    root = make_folder(tmp_path / "ds", n=3)
    (root / "classes.txt").write_bytes(b"disk\nsquare\ncaf\xe9\n")
    with pytest.raises(DatasetError, match=r"classes\.txt:3: .*UTF-8"):
        FolderDataset(root, csv=root / "labels.csv", classes=root / "classes.txt", images=root / "images")


@pytest.fixture
def broken_plugin(tmp_path, monkeypatch):
    """A CAM method plugin whose module raises at import, importable and advertised by an entry point."""
    (tmp_path / "wsss_broken_plugin.py").write_text("raise RuntimeError('plugin blew up at import')\n")
    dist = tmp_path / "wsss_broken_plugin-0.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: wsss-broken-plugin\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text("[wsss.plugins]\ncam_method.brokencam = wsss_broken_plugin:BrokenCAM\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("wsss_broken_plugin", None)


@pytest.mark.parametrize("name", ["brokencam", "wsss_broken_plugin:BrokenCAM", "wsss_broken_plugin.BrokenCAM"])
def test_plugin_that_raises_at_import_names_the_param_and_plugin(broken_plugin, name):
    from pipeline.cam.methods import build_method
    from pipeline.registry import RegistryError

    with pytest.raises(RegistryError) as err:
        build_method(name, model=None)
    msg = str(err.value)
    assert "cam.method" in msg and name in msg and "plugin blew up at import" in msg, msg
    cause = err.value.__cause__
    while cause is not None and not isinstance(cause, RuntimeError):
        cause = cause.__cause__
    assert isinstance(cause, RuntimeError) and "plugin blew up" in str(cause)


def test_plugin_missing_dependency_names_the_param(tmp_path, monkeypatch):
    from pipeline.registry import CAM_METHODS, RegistryError

    (tmp_path / "wsss_needs_dep.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RegistryError, match=r"cam\.method.*wsss_needs_dep:X.*no_such_dependency_xyz") as err:
        CAM_METHODS.get("wsss_needs_dep:X")
    assert isinstance(err.value.__cause__, ImportError)
    sys.modules.pop("wsss_needs_dep", None)


# ------------------------------------------------------------------ C: bit depth and EXIF orientation

def test_16bit_images_scale_by_bit_depth_not_by_their_own_max(tmp_path):
    from pipeline.datasets.imageio import read_rgb

    a = np.full((6, 8), 200, np.uint16)  # a dark 16-bit image: 200 / 65535 of full scale
    a[0, 0] = 255
    b = a.copy()
    b[0, 0] = 256  # near-identical: one pixel one grey level brighter, just past 8-bit range
    Image.fromarray(a).save(tmp_path / "a.png")
    Image.fromarray(b).save(tmp_path / "b.png")
    ra, rb = read_rgb(tmp_path / "a.png"), read_rgb(tmp_path / "b.png")
    assert ra.dtype == np.uint8 and ra.shape == (6, 8, 3)
    assert np.abs(ra.astype(int) - rb.astype(int)).max() <= 1
    assert (ra[1:] == 1).all() and (rb[1:] == 1).all()  # round(200 / 257): it stays dark
    full = np.array([[0, 257, 128 * 257, 65535]], np.uint16)
    Image.fromarray(full).save(tmp_path / "full.png")
    assert read_rgb(tmp_path / "full.png")[0, :, 0].tolist() == [0, 1, 128, 255]


ORIENT_W, ORIENT_H = 40, 24  # stored size; EXIF orientation 6 displays it rotated 90° clockwise (24 wide, 40 tall)


def save_with_orientation(path: Path, orientation: int = 6) -> np.ndarray:
    """An image whose stored top-left quarter is red, saved with an EXIF orientation tag; returns the stored pixels."""
    img = np.zeros((ORIENT_H, ORIENT_W, 3), np.uint8)
    img[: ORIENT_H // 2, : ORIENT_W // 2] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(img).save(path, exif=exif, **({"quality": 95} if path.suffix == ".jpg" else {}))
    return img


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_exif_orientation_is_applied_when_reading(tmp_path, suffix):
    from pipeline.datasets.imageio import image_size, read_rgb

    p = tmp_path / f"rot{suffix}"
    stored = save_with_orientation(p, 6)
    out = read_rgb(p)
    assert out.shape == (ORIENT_W, ORIENT_H, 3)  # displayed: portrait
    assert image_size(p) == (ORIENT_W, ORIENT_H)
    expected = np.rot90(stored, k=-1)  # orientation 6: rotate 90° clockwise to display
    assert np.abs(out.astype(int) - expected.astype(int)).mean() < 4
    assert out[2, -3, 0] > 200 and out[-3, 2, 0] < 60  # the red quarter is now at the top right


def test_mask_of_stored_size_is_refused_naming_image_and_mask(tmp_path):
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("disk\n")
    (root / "labels.csv").write_text("image,labels\nrot.jpg,disk\nok.jpg,disk\n")
    save_with_orientation(root / "images" / "rot.jpg", 6)
    save_with_orientation(root / "images" / "ok.jpg", 6)
    Image.fromarray(np.ones((ORIENT_H, ORIENT_W), np.uint8), mode="L").save(root / "masks" / "rot.png")  # stored size
    Image.fromarray(np.ones((ORIENT_W, ORIENT_H), np.uint8), mode="L").save(root / "masks" / "ok.png")  # displayed
    ds = FolderDataset(root, csv=root / "labels.csv", classes=root / "classes.txt", images=root / "images",
                       val_fraction=0.0)
    assert ds.check_item("ok").size == (ORIENT_W, ORIENT_H)
    with pytest.raises(DatasetError) as err:
        ds.check_item("rot")
    msg = str(err.value)
    assert str(root / "masks" / "rot.png") in msg and str(root / "images" / "rot.jpg") in msg, msg
    assert "EXIF orientation" in msg and f"{ORIENT_W}x{ORIENT_H}" in msg and f"{ORIENT_H}x{ORIENT_W}" in msg, msg


# ------------------------------------------------------------------ D: metrics JSON never holds NaN

def _strict_load(text: str):
    def refuse(token):
        raise AssertionError(f"invalid JSON token {token} written")

    return json.loads(text, parse_constant=refuse)


def test_write_json_writes_null_for_nan_and_inf(tmp_path):
    from pipeline.metrics import update_metrics_file, write_json

    data = {"miou": float("nan"), "curve": [{"t": 0.1, "miou": np.float32("nan")}, {"t": 0.2, "miou": np.float64(0.5)}],
            "pair": (np.float16("inf"), -float("inf")), "n": np.int64(3), "ok": np.bool_(True),
            "arr": np.array([1.0, np.nan]), "nested": {"deep": [[np.float64("-inf")]]}}
    path = tmp_path / "m.json"
    write_json(path, data)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    out = _strict_load(text)
    assert out == {"miou": None, "curve": [{"t": 0.1, "miou": None}, {"t": 0.2, "miou": 0.5}], "pair": [None, None],
                   "n": 3, "ok": True, "arr": [1.0, None], "nested": {"deep": [[None]]}}
    update_metrics_file(path, "extra", {"x": float("nan")})
    assert _strict_load(path.read_text())["extra"] == {"x": None}


def test_dataset_digest_follows_symlinked_and_absolute_image_folders(tmp_path):
    """An edit to an image (same size) must change the dataset digest (and so re-run prepare and what
    follows) when images/ is a symlink to a folder elsewhere or data.folder_images is an absolute path
    outside data.root."""
    from pipeline.config import defaults
    from pipeline.provenance import dataset_digest

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    image = elsewhere / "a.png"
    image.write_bytes(b"\x00" * 64)
    root = tmp_path / "linked"
    root.mkdir()
    (root / "labels.csv").write_text("image,labels\na.png,cat\n")
    (root / "classes.txt").write_text("cat\n")
    (root / "images").symlink_to(elsewhere, target_is_directory=True)
    data = dict(defaults()["data"], dataset="folder", root=str(root))
    linked = dataset_digest(data)
    assert linked["files"] == 3
    image.write_bytes(b"\x01" * 64)  # same size, other content
    assert dataset_digest(data)["digest"] != linked["digest"]

    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "labels.csv").write_text("image,labels\na.png,cat\n")
    (plain / "classes.txt").write_text("cat\n")
    data = dict(data, root=str(plain), folder_images=str(elsewhere))  # absolute, outside data.root
    before = dataset_digest(data, cache_file=tmp_path / "cache.json")
    assert before["outside_root"] == [str(elsewhere.resolve())] and before["files"] == 3
    image.write_bytes(b"\x02" * 64)
    assert dataset_digest(data, cache_file=tmp_path / "cache.json")["digest"] != before["digest"]


def test_an_input_store_with_other_image_ids_is_an_error_naming_the_id(tmp_path):
    """CAMs made for another dataset (other ids) reach the crf stage: a clear error naming the id and
    the prepared data, not a bare KeyError."""
    from pipeline.datasets import PreparedData
    from pipeline.refine.seeds import make_seed_store
    from pipeline.store import ArraySpec, write_store
    from synthetic import tiny_demo

    params, prepared_dir = tiny_demo(tmp_path, num_train=2, num_val=1)
    prepared = PreparedData(params["data"], prepared_dir)
    ids = ["train_00024"]  # not in this dataset
    cams = write_store(tmp_path / "cams.zarr", ids, [[48, 64]], {"cam": ArraySpec("float16", stride=4, channels=3)},
                       {"class_names": prepared.class_names, "stride": 4, "split": "train"},
                       lambda idx: {"cam": [np.zeros((3, 12, 16), np.float16)]}, shard_images=2)
    params["compute"]["scheduler"] = "synchronous"
    with pytest.raises(DatasetError, match=r"image 'train_00024' is not in the prepared dataset"):
        make_seed_store(prepared_dir, params["data"], cams, tmp_path / "seeds.zarr", params["crf"], params["compute"])

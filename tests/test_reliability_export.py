"""Issue 11 "Reliability" (export and ablate): ``--force`` replaces only a previous export, an
unwritable target is one line without a traceback, export errors are not swallowed (COCO file
names, manifest provenance say why they are missing), and ``wsss ablate`` validates every
setting before it queues or runs any experiment."""
from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import ParamsError, dump_params
from pipeline.presets import preset
from pipeline.datasets import DatasetError, PreparedData
from pipeline.export import ExportError, read_export, run_export
from pipeline.prepare import prepare_dataset
from pipeline.labels import IGNORE_INDEX
from pipeline.store import ArraySpec, write_store

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A tiny prepared demo, its GT as the pseudo store, and a params.yaml for the CLI."""
    root = tmp_path_factory.mktemp("relexport")
    params = preset("tiny")
    params["data"]["demo_num_train"] = 6
    params["data"]["demo_num_val"] = 2
    prepare_dataset(params["data"], root / "prepared", shard_images=8)
    prepared = PreparedData(params["data"], root / "prepared")
    ids = prepared.ids("train")
    write_store(root / "pseudo.zarr", ids, prepared.sizes(ids), {"mask": ArraySpec("uint8", fill=IGNORE_INDEX)},
                {"class_names": prepared.class_names, "split": "train", "method": "test"},
                lambda idx: {"mask": [prepared.gt(ids[i]) for i in idx]}, shard_images=8)
    dump_params(params, root / "params.yaml")
    return {"root": root, "params": params, "prepared": prepared, "store": root / "pseudo.zarr", "ids": ids}


def _export(demo, out, formats, **kw):
    return run_export(demo["store"], demo["root"] / "prepared", demo["params"]["data"], formats, out,
                      params=demo["params"], progress=False, **kw)


def _cli(demo, *args) -> SystemExit | None:
    """Run ``wsss export`` in-process; the SystemExit it ended with (None on success)."""
    from pipeline.cli import main

    argv = ["export", "--store", str(demo["store"]), "--prepared", str(demo["root"] / "prepared"),
            "--params", str(demo["root"] / "params.yaml"), "--metrics", str(demo["root"] / "none.json"), *args]
    try:
        main(argv)
    except SystemExit as e:
        return e
    return None


def _one_line_error(exc: SystemExit | None, *needles: str) -> str:
    assert exc is not None, "the command succeeded"
    msg = exc.code
    assert isinstance(msg, str), f"exit code {msg!r} instead of a message"
    assert msg.startswith("wsss export: error: ") and "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


# --- 1. --force replaces only an empty folder or a previous export ----------------------------

def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def test_force_refuses_a_dataset_folder(demo, tmp_path):
    data = tmp_path / "VOC2012"
    (data / "JPEGImages").mkdir(parents=True)
    (data / "JPEGImages" / "a.jpg").write_bytes(b"jpeg")
    (data / "labels.csv").write_text("image,labels\n")
    before = _tree(data)
    with pytest.raises(ExportError, match="not a previous export") as e:
        _export(demo, data, ["voc"], force=True)
    assert str(data) in str(e.value) and "\n" not in str(e.value)
    assert _tree(data) == before


def test_force_refuses_a_git_repository_from_the_cli(demo, tmp_path):
    repo = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "file.txt").write_text("keep")
    before = _tree(repo / ".git")
    _one_line_error(_cli(demo, "--format", "voc", "--out", str(repo / ".git"), "--force"),
                    str(repo / ".git"), "not a previous export")
    assert _tree(repo / ".git") == before
    assert subprocess.run(["git", "status"], cwd=repo, capture_output=True).returncode == 0
    _one_line_error(_cli(demo, "--format", "voc", "--out", str(repo), "--force"), str(repo))
    assert (repo / "file.txt").read_text() == "keep"


def test_force_refuses_a_folder_whose_manifest_is_not_an_export(demo, tmp_path):
    out = tmp_path / "other"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"name": "someone else's tool"}))
    (out / "data.bin").write_bytes(b"x")
    with pytest.raises(ExportError, match="not a previous export"):
        _export(demo, out, ["voc"], force=True)
    assert (out / "data.bin").exists()


def test_force_refuses_a_nested_export_with_foreign_files(demo, tmp_path):
    out = tmp_path / "exports"
    _export(demo, out, ["voc", "zarr"])
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not a previous export"):
        _export(demo, out, ["voc", "zarr"], force=True)
    assert (out / "notes.txt").read_text() == "mine"


def test_force_replaces_an_empty_folder_or_a_previous_export(demo, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    _export(demo, empty, ["voc"])
    assert (empty / "manifest.json").is_file()
    single = tmp_path / "single"
    _export(demo, single, ["coco"])
    with pytest.raises(ExportError, match="not empty"):  # no --force: never replaced
        _export(demo, single, ["voc"])
    _export(demo, single, ["voc"], force=True)
    assert json.loads((single / "manifest.json").read_text())["format"] == "voc"
    nested = tmp_path / "nested"
    _export(demo, nested, ["voc", "coco", "zarr"])
    _export(demo, nested, ["voc", "zarr"], force=True)
    assert sorted(p.name for p in nested.iterdir()) == ["voc", "zarr"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "nested", "single"]


def test_export_stage_replaces_a_leftover_previous_export(demo, tmp_path, monkeypatch):
    import stages.export as stage

    exports = tmp_path / "exports" / "pseudo_masks"
    monkeypatch.setattr(stage, "EXPORTS", exports)
    monkeypatch.setattr(stage, "PSEUDO", demo["store"])
    monkeypatch.setattr(stage, "PREPARED", demo["root"] / "prepared")
    monkeypatch.setattr(stage, "LABEL_METRICS", tmp_path / "labels.json")
    params = {**demo["params"], "export": {"formats": ["voc", "coco", "zarr"]}}  # no instance store here
    monkeypatch.setattr(stage, "start", lambda name: params)
    stage.main()
    first = json.loads((exports / "voc" / "manifest.json").read_text())["created"]
    assert sorted(p.name for p in exports.iterdir()) == ["coco", "voc", "zarr"]
    stage.main()  # DVC removes the out first; a leftover previous export is replaced all the same
    assert sorted(p.name for p in exports.iterdir()) == ["coco", "voc", "zarr"]
    assert sorted(read_export(exports / "zarr")) == sorted(demo["ids"])
    assert json.loads((exports / "voc" / "manifest.json").read_text())["created"] >= first
    (exports / "keep.txt").write_text("x")  # not part of an export: the stage refuses to delete it
    with pytest.raises(ExportError, match="not a previous export"):
        stage.main()
    assert (exports / "keep.txt").exists()


# --- 2. unwritable / busy targets: one line, no traceback --------------------------------------

def test_target_under_a_file_is_one_line_from_the_cli(demo, tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    _one_line_error(_cli(demo, "--format", "voc", "--out", str(blocker / "out")), str(blocker))
    assert blocker.read_text() == "x"


def test_target_that_is_a_file_is_one_line_from_the_cli(demo, tmp_path):
    target = tmp_path / "afile"
    target.write_text("x")
    _one_line_error(_cli(demo, "--format", "voc", "--out", str(target), "--force"), str(target))
    assert target.read_text() == "x"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes through chmod")
def test_read_only_parent_is_one_line_from_the_cli(demo, tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        _one_line_error(_cli(demo, "--format", "voc", "--out", str(parent / "out")), str(parent))
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o755)


def test_busy_target_is_an_export_error_naming_it(demo, tmp_path, monkeypatch):
    import pipeline.export.run as export

    out = tmp_path / "out"
    _export(demo, out, ["voc"])

    def busy(tmp, target):
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(target))

    monkeypatch.setattr(export, "_publish", busy)
    with pytest.raises(ExportError) as e:
        _export(demo, out, ["voc"], force=True)
    assert str(out) in str(e.value) and "busy" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the partial folder is gone
    _one_line_error(_cli(demo, "--format", "voc", "--out", str(out), "--force"), str(out), "busy")


def test_cli_error_has_no_traceback_and_a_non_zero_exit(demo, tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "export", "--format", "voc", "--out",
                          str(blocker / "out"), "--store", str(demo["store"]), "--prepared",
                          str(demo["root"] / "prepared"), "--params", str(demo["root"] / "params.yaml")],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wsss export: error: ") and str(blocker) in lines[0], res.stderr


# --- 3. errors are not swallowed --------------------------------------------------------------

def _coco_images(out: Path) -> dict:
    doc = json.loads((out / "annotations" / "instances_train.json").read_text())
    return {im["image_key"]: im["file_name"] for im in doc["images"]}


def test_coco_file_name_falls_back_only_for_a_dataset_error_and_says_so(demo, tmp_path, monkeypatch, caplog):
    from pipeline.datasets.demo import DemoDataset

    real = DemoDataset.image_path
    missing = demo["ids"][1]

    def image_path(self, image_id):
        if image_id == missing:
            raise DatasetError(f"no file for {image_id}")
        return real(self, image_id)

    monkeypatch.setattr(DemoDataset, "image_path", image_path)
    with caplog.at_level(logging.WARNING, logger="wsss"):
        _export(demo, tmp_path / "out", ["coco"])
    names = _coco_images(tmp_path / "out")
    assert names[missing] == f"{missing}.jpg"
    assert names[demo["ids"][0]] == real(demo["prepared"].dataset, demo["ids"][0]).name
    assert any(missing in r.getMessage() and "file_name" in r.getMessage() for r in caplog.records), caplog.text


def test_coco_file_name_does_not_hide_a_bug(demo, tmp_path, monkeypatch):
    from pipeline.datasets.demo import DemoDataset

    def image_path(self, image_id):
        raise ZeroDivisionError("a bug in the adapter")

    monkeypatch.setattr(DemoDataset, "image_path", image_path)
    with pytest.raises(ZeroDivisionError, match="a bug in the adapter"):
        _export(demo, tmp_path / "out", ["coco"])
    assert not (tmp_path / "out").exists()


def test_manifest_says_why_revision_and_input_hashes_are_missing(demo, tmp_path):
    not_git = tmp_path / "plain"
    not_git.mkdir()
    _export(demo, tmp_path / "a", ["voc"], repo_dir=not_git, lock_path=tmp_path / "dvc.lock")
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert m["code_revision"] is None
    assert "not a git" in m["code_revision_unavailable"]
    assert set(m["inputs"]) == {str(demo["store"]), str(demo["root"] / "prepared")}
    assert all(v is None for v in m["inputs"].values())
    reasons = m["inputs_unavailable"]
    assert set(reasons) == set(m["inputs"]) and all("dvc.lock" in r and "no " in r for r in reasons.values()), reasons
    readme = (tmp_path / "a" / "README.md").read_text()
    assert "not a git" in readme and reasons[str(demo["store"])] in readme

    lock = tmp_path / "dvc.lock"
    lock.write_text(": not yaml: [")
    _export(demo, tmp_path / "b", ["voc"], repo_dir=not_git, lock_path=lock)
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert all("not valid YAML" in r for r in m["inputs_unavailable"].values()), m["inputs_unavailable"]

    lock.write_text(yaml.safe_dump({"schema": "2.0", "stages": {"random_walk": {"cmd": "x", "outs": [
        {"path": str(demo["store"]), "md5": "abc.dir"}]}}}))
    _export(demo, tmp_path / "c", ["voc"], repo_dir=not_git, lock_path=lock)
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert m["inputs"][str(demo["store"])]["md5"] == "abc.dir"
    assert list(m["inputs_unavailable"]) == [str(demo["root"] / "prepared")]
    assert "no stage" in m["inputs_unavailable"][str(demo["root"] / "prepared")]


def test_manifest_of_a_git_checkout_has_no_reason_field(demo, tmp_path):
    _export(demo, tmp_path / "out", ["voc"], repo_dir=ROOT)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert len(m["code_revision"]["commit"]) == 40
    assert "code_revision_unavailable" not in m


# --- 4. wsss ablate validates every setting before queueing / running any ----------------------

def _git(repo, *args):
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


@pytest.fixture()
def repo(tmp_path, monkeypatch):
    """A git repo with a commit; dvc exp run replaced by a recorder."""
    import pipeline.ablation as ablation

    _git(tmp_path, "init", "-q")
    _git(tmp_path, "config", "user.email", "t@example.com")
    _git(tmp_path, "config", "user.name", "t")
    (tmp_path / "README").write_text("x")
    _git(tmp_path, "add", "README")
    _git(tmp_path, "commit", "-qm", "baseline")
    calls = []
    monkeypatch.setattr(ablation, "run_experiment", lambda setting, name, queue=False, repo=".", until=None: calls.append(
        (name, queue)) or "")
    return tmp_path, calls


@pytest.mark.parametrize("mode", ["queue", "run"])
@pytest.mark.parametrize("grid, key", [
    (["cam.epochs=2,0"], "cam.epochs"),
    (["rw.enabled=true,maybe"], "rw.enabled"),
    (["cam.method=cam,gradcam", "crf.fg_threshold=0.3,1.5"], "crf.fg_threshold"),
    (["crf.merge=published,nope"], "crf.merge"),
])
def test_ablate_queues_and_runs_nothing_when_a_setting_is_invalid(repo, mode, grid, key):
    from pipeline.ablation import ablate

    path, calls = repo
    with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
        ablate(grid, repo=path, mode=mode)
    assert calls == []


def test_ablate_validates_against_the_repos_params(repo):
    from pipeline.ablation import ablate

    path, calls = repo
    params = preset("tiny")
    params["cam"]["scale_max"] = 1.0
    dump_params(params, path / "params.yaml")
    with pytest.raises(ParamsError, match=r"cam\.scale_min"):
        ablate(["cam.scale_min=0.5,2.0"], repo=path, mode="queue")
    assert calls == []
    ablate(["cam.scale_min=0.5,0.9"], repo=path, mode="queue")
    assert calls == [("abl-cam_scale_min_0_5", True), ("abl-cam_scale_min_0_9", True)]


def test_ablate_cli_bad_value_is_one_line(repo, monkeypatch):
    from pipeline.cli import main

    path, calls = repo
    monkeypatch.chdir(path)
    with pytest.raises(SystemExit) as e:
        main(["ablate", "--grid", "cam.epochs=3,0", "--queue"])
    assert isinstance(e.value.code, str) and e.value.code.startswith("wsss ablate: error: "), e.value.code
    assert "cam.epochs" in e.value.code and "\n" not in e.value.code
    assert calls == []


def test_ablate_accepts_values_dvc_accepts(repo):
    from pipeline.ablation import ablate

    path, calls = repo
    ablate(["cam.lr=1e-3,0.02", "rw.enabled=true,false"], repo=path, mode="queue")  # 1e-3: a str to PyYAML
    assert [c[0] for c in calls] == ["abl-cam_lr_1e-3-rw_enabled_true", "abl-cam_lr_1e-3-rw_enabled_false",
                                     "abl-cam_lr_0_02-rw_enabled_true", "abl-cam_lr_0_02-rw_enabled_false"]


def test_ids_with_spaces_and_tabs_round_trip_through_the_voc_list_and_line_breaks_are_refused(tmp_path):
    import numpy as np

    from pipeline.datasets.base import check_id
    from pipeline.export.formats import read_voc, write_voc

    masks = {"a b": np.zeros((4, 5), np.uint8), "tab\tid": np.ones((4, 5), np.uint8), " lead": np.ones((4, 5), np.uint8)}
    out = tmp_path / "voc"
    out.mkdir()
    write_voc(out, iter(masks.items()), "train", ["background", "cat"], np.zeros((2, 3), np.uint8))
    back = read_voc(out, "train")
    assert set(back) == set(masks)
    for image_id, mask in masks.items():
        np.testing.assert_array_equal(back[image_id], mask)
    with pytest.raises(ExportError, match="line break"):
        write_voc(tmp_path / "bad", iter([("two\nlines", masks["a b"])]), "train", ["background", "cat"],
                  np.zeros((2, 3), np.uint8))
    with pytest.raises(DatasetError, match=r"labels.csv: unsafe image id 'two\\nlines'"):
        check_id("two\nlines", "labels.csv")


def test_force_refuses_a_one_format_export_holding_a_users_file(demo, tmp_path):
    out = tmp_path / "single"
    _export(demo, out, ["voc"])
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="notes.txt, which no export wrote"):
        _export(demo, out, ["voc"], force=True)
    assert (out / "notes.txt").read_text() == "mine"


def test_leftovers_of_a_killed_export_are_removed_or_recovered(demo, tmp_path):
    """A kill leaves the hidden work folder; a kill between the two renames leaves the target absent
    and the previous export in a hidden .old folder: the next export removes the first and renames
    the second back (folders of processes still alive are left alone)."""
    from pipeline.export.target import clean_killed_exports

    out = tmp_path / "exp"
    _export(demo, out, ["voc"])
    before = _tree(out)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out.rename(tmp_path / f".exp.{dead.pid}.k1k2k3k4.old")  # killed between the two renames
    (tmp_path / f".exp.{dead.pid}.a1b2c3d4.partial").mkdir()
    alive = tmp_path / f".exp.{os.getpid()}.zzzzzzzz.partial"  # an export running now
    alive.mkdir()
    actions = clean_killed_exports(out)
    assert len(actions) == 2 and _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["exp", alive.name])
    alive.rmdir()
    _export(demo, out, ["voc"], force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]

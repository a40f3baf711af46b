"""Issue 11, resume and stores: a partial result is reused only when everything it was made from is
the same (code, checkpoints, data, input stores); stores are replaced atomically; a missing or
corrupt shard is an error; params are checked at load; dataset edits reach DVC."""
import json
import re
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import pipeline.provenance as provenance
from pipeline.checkpoint import save_checkpoint
from pipeline.config import ParamsError, defaults, render_params, validate, with_overrides
from pipeline.presets import preset
from pipeline.datasets import PreparedData
from pipeline.models.affinity import AffinityNet, affinity_checkpoint
from pipeline.models.backbones import build_backbone
from pipeline.refine.runner import open_store
from pipeline.refine.walk_store import make_pseudo_mask, make_pseudo_store
from pipeline.refine.seeds import make_seed, make_seed_store
from synthetic import tiny_demo, tiny_demo_with_cams
from pipeline.store import ArraySpec, Store, StoreError, StoreWriter, write_store
from pipeline.training import ResumePoint

REPO = Path(__file__).resolve().parents[1]
RW = {"enabled": True, "beta": 8.0, "logt": 3, "background": "fixed", "alpha": 4.0, "ignore_below": 0.0,
      "final_crf": False}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    torch.manual_seed(0)
    return tiny_demo_with_cams(tmp_path_factory.mktemp("resumedemo"), num_train=6, crf_iterations=2,
                               scheduler="synchronous")


def _read_all(path, array):
    s = open_store(path)
    return [s.read(array, i) for i in s.ids]


def _kill_on_call(n, fn):
    calls = []

    def dies(task):
        calls.append(task)
        if len(calls) == n:
            raise KeyboardInterrupt("killed")
        return fn(task)

    return dies


# ---------------------------------------------------------------- 1. stores: code and model in the fingerprint

def test_crf_resume_discards_seeds_made_by_other_code(demo, tmp_path, monkeypatch, caplog):
    import pipeline.refine.seeds as seeds_module

    params, prepared_dir, cams = demo
    out = tmp_path / "seeds.zarr"
    monkeypatch.setattr(seeds_module, "make_seed", _kill_on_call(5, make_seed))
    with pytest.raises(KeyboardInterrupt):
        make_seed_store(prepared_dir, params["data"], cams, out, params["crf"], params["compute"])
    monkeypatch.undo()
    # same code: resumes past the two finished shards
    monkeypatch.setattr(seeds_module, "make_seed", _kill_on_call(2, make_seed))
    with pytest.raises(KeyboardInterrupt):
        make_seed_store(prepared_dir, params["data"], cams, out, params["crf"], params["compute"])
    monkeypatch.undo()
    # the code changed in between: every shard is recomputed, and the log says why
    monkeypatch.setattr(provenance, "code_digest", lambda: "edited-code")
    with caplog.at_level(logging.INFO, logger="wsss"):
        m = make_seed_store(prepared_dir, params["data"], cams, out, params["crf"], params["compute"])
    assert m["resumed_shards"] == 0 and m["computed_shards"] == 3
    assert "discarding the partial result" in caplog.text and "inputs.code" in caplog.text
    assert open_store(out).attrs["inputs"]["code"] == "edited-code"


def test_random_walk_resume_discards_masks_of_an_older_affinity_model(demo, tmp_path, monkeypatch, caplog):
    import pipeline.refine.walk_store as rw_module

    params, prepared_dir, cams = demo
    ck = tmp_path / "affinity.pt"

    def save_model(seed):
        torch.manual_seed(seed)
        save_checkpoint(ck, affinity_checkpoint(AffinityNet(build_backbone("tiny", "none"), stride=4), "tiny", radius=2))

    run = lambda out: make_pseudo_store(prepared_dir, params["data"], cams, ck, out, RW, params["crf"],  # noqa: E731
                                        params["compute"])
    save_model(1)
    monkeypatch.setattr(rw_module, "make_pseudo_mask", _kill_on_call(5, make_pseudo_mask))
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "pseudo.zarr")
    monkeypatch.undo()
    save_model(2)  # AffinityNet retrained between the kill and the re-run
    with caplog.at_level(logging.INFO, logger="wsss"):
        m = run(tmp_path / "pseudo.zarr")
    assert m["resumed_shards"] == 0 and "inputs.affinity_model" in caplog.text
    clean = run(tmp_path / "clean.zarr")
    assert clean["resumed_shards"] == 0
    for a, b in zip(_read_all(tmp_path / "pseudo.zarr", "mask"), _read_all(tmp_path / "clean.zarr", "mask")):
        np.testing.assert_array_equal(a, b)


def test_resume_point_names_what_changed(tmp_path, caplog):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "resume.pt"
    ResumePoint(path, "s", "train_x", inputs={"prepared": "a", "labels": "l"}).save(model, opt, [{"epoch": 1}], 1)
    assert ResumePoint(path, "s", "train_x", inputs={"prepared": "a", "labels": "l"}).restore(model, opt)[1] == 1
    with caplog.at_level(logging.INFO, logger="wsss"):
        assert ResumePoint(path, "s", "train_x", inputs={"prepared": "b", "labels": "l"}).restore(model, opt) == ([], 0)
    assert "made from other prepared" in caplog.text


# ---------------------------------------------------------------- 2. train_cam: the data it trained on

def test_train_cam_resume_ignores_a_checkpoint_of_other_data(tmp_path, monkeypatch, caplog):
    import pipeline.training as training
    from pipeline.cam.run import run_train_cam

    def prepared_from(seed):
        params, d = tiny_demo(tmp_path / f"data{seed}", num_train=8, num_val=1, seed=seed)
        params["cam"].update(epochs=2, batch_size=4, crop_size=32, num_workers=0)
        return params, PreparedData(params["data"], d)

    params_a, data_a = prepared_from(0)
    params_b, data_b = prepared_from(1)  # same image count, other images
    assert data_a.ids("train") == data_b.ids("train")
    resume = tmp_path / "resume" / "resume.pt"
    real_save = training.ResumePoint.save

    def killed_after_first_epoch(self, *args):
        real_save(self, *args)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(training.ResumePoint, "save", killed_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        run_train_cam(data_a, params_a, tmp_path / "a.pt", device=torch.device("cpu"), resume=resume)
    monkeypatch.undo()
    assert resume.is_file()
    with caplog.at_level(logging.INFO, logger="wsss"):
        run_train_cam(data_b, params_b, tmp_path / "b.pt", device=torch.device("cpu"), resume=resume)
    assert "made from other prepared" in caplog.text and "resuming" not in caplog.text
    run_train_cam(data_b, params_b, tmp_path / "clean.pt", device=torch.device("cpu"), resume=tmp_path / "r2" / "resume.pt")
    got = torch.load(tmp_path / "b.pt", weights_only=True)["state_dict"]
    want = torch.load(tmp_path / "clean.pt", weights_only=True)["state_dict"]
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, msg=name)


# ---------------------------------------------------------------- 5. dataset edits reach DVC

def _folder_dataset(root: Path) -> Path:
    import cv2

    (root / "images").mkdir(parents=True)
    (root / "classes.txt").write_text("cat\ndog\n")
    rows = ["image,labels"]
    rng = np.random.default_rng(0)
    for i in range(12):
        cv2.imwrite(str(root / "images" / f"im{i}.png"), rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
        rows.append(f"im{i}.png,{'cat' if i % 2 else 'dog'}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def test_dataset_digest_follows_file_contents(tmp_path):
    root = _folder_dataset(tmp_path / "ds")
    data = dict(defaults()["data"], dataset="folder", root=str(root))
    cache = tmp_path / "cache.json"
    first = provenance.dataset_digest(data, cache)
    assert first["files"] == 14 and provenance.dataset_digest(data, cache)["digest"] == first["digest"]
    os.utime(root / "labels.csv")  # touched, same content: same digest
    assert provenance.dataset_digest(data, cache)["digest"] == first["digest"]
    with open(root / "labels.csv", "a") as f:
        f.write("im0.png,cat\n")
    assert provenance.dataset_digest(data, cache)["digest"] != first["digest"]
    edited = provenance.dataset_digest(data, cache)["digest"]
    import cv2

    img = cv2.imread(str(root / "images/im3.png"))
    img[0, 0] = 255 - img[0, 0]
    cv2.imwrite(str(root / "images/im3.png"), img)
    assert provenance.dataset_digest(data, cache)["digest"] != edited


def _run(cmd, cwd):
    env = dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"], DVC_NO_ANALYTICS="1")
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout + res.stderr


@pytest.mark.slow
def test_editing_labels_csv_or_an_image_reruns_prepare_under_dvc(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("pipeline", "stages"):
        shutil.copytree(REPO / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", repo / "dvc.yaml")
    shutil.copy(REPO / ".gitignore", repo / ".gitignore")
    root = _folder_dataset(tmp_path / "ds")
    params = preset("tiny")
    params["data"].update(dataset="folder", root=str(root), folder_val_fraction=0.5)
    (repo / "params.yaml").write_text(render_params(params))
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "ci@example.com"],
                ["git", "config", "user.name", "ci"], ["dvc", "init", "-q"]):
        _run(cmd, repo)
    out = _run(["dvc", "repro", "prepare"], repo)
    assert "Running stage 'prepare'" in out
    out = _run(["dvc", "repro", "prepare"], repo)
    assert "Running stage 'digest_data'" in out and "Running stage 'prepare'" not in out
    csv_path = root / "labels.csv"
    csv_path.write_text(csv_path.read_text().replace("im0.png,dog", "im0.png,dog;cat"))  # a label edit
    assert "Running stage 'prepare'" in _run(["dvc", "repro", "prepare"], repo)
    import cv2

    img = cv2.imread(str(root / "images/im2.png"))
    cv2.imwrite(str(root / "images/im2.png"), 255 - img)
    assert "Running stage 'prepare'" in _run(["dvc", "repro", "prepare"], repo)
    index = json.loads((repo / "data/prepared/index.json").read_text())
    assert index["source_digest"] == json.loads((repo / "data/dataset_digest.json").read_text())["digest"]


# ---------------------------------------------------------------- 6. a missing or corrupt shard is an error

def _small_store(path, n=6, shard=2):
    ids = [f"im{i}" for i in range(n)]
    rng = np.random.default_rng(0)
    return write_store(path, ids, [[8, 10]] * n, {"mask": ArraySpec("uint8", fill=255)}, {"kind": "t"},
                       lambda idx: {"mask": [rng.integers(0, 3, (8, 10), dtype=np.uint8) for _ in idx]},
                       shard_images=shard)


def test_missing_shard_names_the_store_and_the_images(tmp_path):
    path = _small_store(tmp_path / "s.zarr")
    Store(path).read("mask", "im3")
    os.remove(path / "mask" / "c" / "1" / "0" / "0")
    with pytest.raises(StoreError, match=r"s\.zarr.*missing.*'im2', 'im3'"):
        Store(path).read("mask", "im3")
    Store(path).read("mask", "im4")  # other shards still read


def test_corrupt_shard_names_the_store_and_the_image(tmp_path):
    path = _small_store(tmp_path / "s.zarr")
    (path / "mask" / "c" / "2" / "0" / "0").write_bytes(b"not a shard" * 7)
    with pytest.raises(StoreError, match=r"s\.zarr.*images \['im5'\]"):
        Store(path).read("mask", "im5")


def test_a_shard_that_is_all_fill_is_not_missing(tmp_path):
    ids = ["a", "b", "c"]
    path = write_store(tmp_path / "s.zarr", ids, [[4, 4]] * 3, {"mask": ArraySpec("uint8", fill=255)}, {},
                       lambda idx: {"mask": [np.full((4, 4), 255 if i == 0 else 1, np.uint8) for i in idx]},
                       shard_images=1)
    assert (Store(path).read("mask", "a") == 255).all() and (Store(path).read("mask", "b") == 1).all()


def test_export_cli_fails_on_a_missing_shard(tmp_path, demo):
    params, prepared_dir, cams = demo
    out = tmp_path / "pseudo.zarr"
    make_pseudo_store(prepared_dir, params["data"], cams, None, out, dict(RW, enabled=False), params["crf"],
                      params["compute"])
    os.remove(out / "mask" / "c" / "0" / "0" / "0")
    pfile = tmp_path / "params.yaml"
    pfile.write_text(render_params(params))
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "export", "--store", str(out), "--prepared",
                          str(prepared_dir), "--params", str(pfile), "--out", str(tmp_path / "exp"),
                          "--format", "voc"], capture_output=True, text=True, cwd=REPO)
    assert res.returncode != 0
    assert "pseudo.zarr" in res.stderr and "missing" in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr


# ---------------------------------------------------------------- 7. replacing a finished store is atomic

def test_replacing_a_store_never_leaves_it_half_deleted(tmp_path, monkeypatch):
    import pipeline.store as store_module

    path = _small_store(tmp_path / "s.zarr")
    old = [Store(path).read("mask", i) for i in range(6)]
    real_rmtree = shutil.rmtree

    def killed_while_deleting(p, *a, **k):
        raise KeyboardInterrupt("killed while deleting the old store")

    ids = [f"im{i}" for i in range(6)]
    w = StoreWriter(path, ids, [[8, 10]] * 6, {"mask": ArraySpec("uint8", fill=255)}, {"kind": "t2"}, shard_images=2)
    for s in w.pending_shards():
        w.write_shard(s, {"mask": [np.full((8, 10), 7, np.uint8)] * len(w.shard_indices(s))})
    monkeypatch.setattr(store_module.shutil, "rmtree", killed_while_deleting)
    with pytest.raises(KeyboardInterrupt):
        w.commit()
    monkeypatch.setattr(store_module.shutil, "rmtree", real_rmtree)
    # the final name holds the complete new store; the old one sits aside, whole
    new = Store(path)
    assert new.attrs["kind"] == "t2" and all((new.read("mask", i) == 7).all() for i in range(6))
    aside = list(tmp_path.glob("s.zarr.old-wsss-*"))
    assert len(aside) == 1 and np.array_equal(Store(aside[0]).read("mask", 0), old[0])
    mine = tmp_path / "s.zarr.old-run1"  # a user's folder with a similar name
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    _small_store(tmp_path / "s.zarr")  # the next replacement clears what the killed one left, nothing else
    assert not list(tmp_path.glob("s.zarr.old-wsss-*"))
    assert (mine / "notes.txt").read_text() == "keep me"


def test_checkpoint_on_a_full_disk_names_the_path_and_leaves_no_tmp(tmp_path, monkeypatch):
    import errno

    def full(obj, f, *a, **k):
        Path(f).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match=r"model\.pt.*No space left"):
        save_checkpoint(tmp_path / "model.pt", {"x": 1})
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- 8. params checked at load, naming the key

@pytest.mark.parametrize("assignment,key", [
    ("cam.lr=.nan", "cam.lr"), ("rw.beta=.inf", "rw.beta"), ("crf.bg_threshold=.nan", "crf.bg_threshold"),
    ("seg.eval_scales=[1.0, .nan]", "seg.eval_scales"), ("cam.scales=[-1]", "cam.scales"),
    ("cam.scales=[0.0]", "cam.scales"), ("cam.method=no_such_cam", "cam.method"),
    ("cam.backbone=resnet19", "cam.backbone"), ("seg.backbone=resnet19", "seg.backbone"),
    ("crf.mode=crfnet", "crf.mode"), ("cam.method=no.such.module:Cam", "cam.method"),
])
def test_bad_params_fail_at_load_naming_the_key(assignment, key):
    with pytest.raises(ParamsError, match=rf"param {key}"):
        with_overrides(defaults(), [assignment])


def test_load_accepts_registered_names_and_dotted_paths():
    p = validate({"cam": {"method": "gradcampp", "backbone": "resnet18"}, "crf": {"mode": "irnet"}})
    assert p["cam"]["method"] == "gradcampp"
    assert validate({"cam": {"method": "pipeline.cam.methods:GradCAM"}})["cam"]["method"].endswith("GradCAM")


def test_per_image_tasks_carry_absolute_paths_so_a_worker_elsewhere_reads_this_run(demo, tmp_path, monkeypatch):
    """A dask worker whose working directory is another folder (another workspace with the same layout)
    must read this run's prepared data, CAMs and model: every ImageTask's paths are absolute."""
    from pipeline.refine.instances import InstanceTask
    from pipeline.refine.seeds import SeedTask
    from pipeline.refine.walk_store import WalkTask

    params, prepared_dir, cams = demo
    ck = tmp_path / "run" / "models" / "affinity.pt"
    ck.parent.mkdir(parents=True)
    torch.manual_seed(3)
    save_checkpoint(ck, affinity_checkpoint(AffinityNet(build_backbone("tiny", "none"), stride=4), "tiny", radius=2))
    image_id = PreparedData(params["data"], prepared_dir).ids("train")[0]
    monkeypatch.chdir(tmp_path / "run")
    rel = lambda p: os.path.relpath(p, tmp_path / "run")  # noqa: E731
    data = dict(params["data"], root=rel(params["data"]["root"]))
    task = WalkTask(image_id, rel(prepared_dir), data, rel(cams), "models/affinity.pt", RW, params["crf"])
    seed_task = SeedTask(image_id, rel(prepared_dir), data, rel(cams), params["crf"])
    inst_task = InstanceTask(image_id, rel(prepared_dir), data, rel(cams), "models/affinity.pt", RW, {})
    for t in (task, seed_task, inst_task):
        assert Path(t.prepared_dir).is_absolute() and Path(t.cams_path).is_absolute()
        assert Path(t.data["root"]).is_absolute()
    assert task.model_path == str(ck.resolve())
    here = make_pseudo_mask(task)
    elsewhere = tmp_path / "other_workspace"
    (elsewhere / "models").mkdir(parents=True)
    (elsewhere / "models" / "affinity.pt").write_bytes(b"another workspace's model")
    monkeypatch.chdir(elsewhere)  # the worker's folder: same relative layout, other files
    np.testing.assert_array_equal(make_pseudo_mask(task), here)


def test_a_second_run_in_the_same_workspace_is_refused_naming_the_first(tmp_path, monkeypatch):
    """Two direct runs of a stage at once (`wsss stage random_walk` twice) would write into one .partial
    store: the second refuses before it reads anything, naming the first; a killed holder frees it."""
    from pipeline.workspace_lock import WorkspaceBusy, hold_workspace_lock, release_workspace_lock

    monkeypatch.chdir(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, %r)\n"
        "from pipeline.workspace_lock import hold_workspace_lock\n"
        "hold_workspace_lock('random_walk'); print('held', flush=True); time.sleep(60)") % str(REPO)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WorkspaceBusy, match=rf"stage random_walk, pid {holder.pid}"):
            hold_workspace_lock("random_walk")
        import stages.common as common  # what every stage calls first

        with pytest.raises(WorkspaceBusy):
            common.start("crf", str(REPO / "params.yaml"))
    finally:
        holder.kill()
        holder.wait()
    hold_workspace_lock("crf")  # the kernel released the killed holder's lock; the stale text does not block
    assert "stage crf" in (tmp_path / ".wsss.lock").read_text()
    hold_workspace_lock("random_walk")  # the same process may run another stage after the first
    release_workspace_lock()


def test_plugin_code_is_part_of_what_a_partial_result_was_made_from(tmp_path, monkeypatch):
    """A plugin named in params (cam.method: myplug:MyCAM) is code the result depends on: editing it
    between a killed run and its re-run must discard the partial result, as a library edit does."""
    import pipeline.registry as registry
    from pipeline.provenance import code_digest

    monkeypatch.setattr(registry, "_LOADED_PLUGINS", {})
    plugin = tmp_path / "myplug_digest.py"
    plugin.write_text("from pipeline.refine.seeds import SeedMaker\n\n\nclass Maker(SeedMaker):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    library_only = code_digest()
    validate(with_overrides(defaults(), ["crf.mode=myplug_digest:Maker"]))  # loading params resolves the plugin
    assert registry.plugin_source_files() == [plugin.resolve()]
    with_plugin = code_digest()
    assert with_plugin != library_only
    plugin.write_text(plugin.read_text() + "\n# edited\n")
    assert code_digest() != with_plugin


def test_a_corrupt_checkpoint_names_the_file_and_the_cause(tmp_path):
    from pipeline.checkpoint import CheckpointError, load_checkpoint

    ck = save_checkpoint(tmp_path / "affinity.pt", {"w": torch.zeros(3)})
    ck.write_bytes(ck.read_bytes()[:40])  # truncated (a copy that stopped half-way)
    with pytest.raises(CheckpointError, match=rf"checkpoint {re.escape(str(ck))} cannot be read .*re-run the stage"):
        load_checkpoint(ck)
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="notes.pt cannot be read"):
        load_checkpoint(tmp_path / "notes.pt")


def test_a_full_disk_while_writing_a_store_names_the_store_and_the_cause(tmp_path, monkeypatch):
    import errno

    import zarr

    ids = [f"im{i}" for i in range(4)]
    w = StoreWriter(tmp_path / "s.zarr", ids, [[8, 10]] * 4, {"mask": ArraySpec("uint8", fill=255)}, {}, shard_images=2)

    def full(self, key, value):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(zarr.Array, "__setitem__", full)
    with pytest.raises(StoreError, match=r"s\.zarr: cannot write array 'mask' of shard 0 in .*s\.zarr\.partial: "
                                         r"No space left on device"):
        w.write_shard(0, {"mask": [np.zeros((8, 10), np.uint8)] * 2})


def test_a_symlinked_store_is_named_with_its_target(tmp_path):
    elsewhere = tmp_path / "other_disk" / "cams.zarr"
    _small_store(elsewhere)
    link = tmp_path / "cams.zarr"
    link.symlink_to(elsewhere, target_is_directory=True)
    assert Store(link).ids  # reading through a link works
    with pytest.raises(StoreError, match=r"cams\.zarr is a symbolic link to .*other_disk/cams\.zarr: .*Remove the link"):
        StoreWriter(link, ["a"], [[8, 10]], {"mask": ArraySpec("uint8", fill=255)}, {})
    shutil.rmtree(elsewhere)  # the disk it pointed to is gone
    with pytest.raises(StoreError, match=r"cams\.zarr: a symbolic link to .*, which does not exist"):
        Store(link)

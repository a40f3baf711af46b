"""The whole DVC graph on the tiny preset, in a throw-away git + DVC repository.

Checks what users rely on: `dvc repro` runs everything, `dvc exp run -S crf.enabled=false`
re-runs crf and what follows (never train_cam or make_cam) and changes the metrics, and a
second `dvc repro` re-runs nothing.
"""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import render_params
from pipeline.presets import preset

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(cmd, cwd):
    env_bin = str(Path(sys.executable).parent)
    import os

    env = dict(os.environ, PATH=env_bin + os.pathsep + os.environ["PATH"], DVC_NO_ANALYTICS="1")
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    return res.stdout + res.stderr


def _ran(output: str) -> set[str]:
    """The stages a dvc command re-ran, leaving out digest_data (always_changed: it runs every time, in
    seconds, and what follows it re-runs only when the digest it writes changes)."""
    return set(re.findall(r"Running stage '([a-z_]+)'", output)) - {"digest_data"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    d = tmp_path_factory.mktemp("dvcrepo")
    for name in ("pipeline", "stages"):
        shutil.copytree(REPO / name, d / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", d / "dvc.yaml")
    shutil.copy(REPO / ".gitignore", d / ".gitignore")
    (d / "params.yaml").write_text(render_params(preset("tiny")))
    _run(["git", "init", "-q"], d)
    _run(["git", "config", "user.email", "ci@example.com"], d)
    _run(["git", "config", "user.name", "ci"], d)
    _run(["dvc", "init", "-q"], d)
    _run(["dvc", "config", "core.autostage", "true"], d)
    _run(["git", "add", "-A"], d)
    _run(["git", "commit", "-qm", "init"], d)
    return d


def test_repro_runs_every_stage_then_crf_ablation_reruns_only_downstream(repo):
    out = _run(["dvc", "repro"], repo)
    assert _ran(out) == {"prepare", "saliency", "train_cam", "make_cam", "crf", "train_aff", "random_walk", "instances",
                         "train_seg", "upper_bound", "evaluate", "export"}
    inst = json.loads((repo / "metrics/instances.json").read_text())
    assert inst["instances"] > 0 and inst["images"] > 0
    coco = repo / "exports/pseudo_masks/coco_instances"
    assert json.loads((coco / "manifest.json").read_text())["format"] == "coco_instances"
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "baseline"], repo)
    before = json.loads((repo / "metrics/labels.json").read_text())
    assert before["crf"].get("enabled", True) is True

    out = _run(["dvc", "exp", "run", "-S", "crf.enabled=false"], repo)
    ran = _ran(out)
    assert {"crf", "train_aff", "random_walk"} <= ran
    assert not ran & {"prepare", "train_cam", "make_cam"}
    after = json.loads((repo / "metrics/labels.json").read_text())
    assert after["crf"]["enabled"] is False
    assert after["crf"] != before["crf"]

    out = _run(["dvc", "repro"], repo)
    assert _ran(out) == set()


def test_ablate_runs_a_grid_as_named_experiments_and_collects_the_table(repo):
    # follows the test above: the crf.enabled=false results are in the workspace and DVC's run cache; that
    # experiment's params are too, and wsss ablate refuses uncommitted params edits: put the baseline back
    _run(["git", "checkout", "params.yaml"], repo)
    cmd = [sys.executable, "-m", "pipeline.cli", "ablate", "--grid", "crf.enabled=true,false"]
    out = _run(cmd, repo)
    table = (repo / "reports/ablation.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| True") or line.startswith("| False")]
    assert len(rows) == 2, table
    on, off = rows
    assert "(off)" in off.split("|")[3] and "(off)" not in on.split("|")[3]  # the CRF seeds column
    assert on.split("|")[3] != off.split("|")[3]
    assert "exists on this baseline" not in out
    # a second call reuses both experiments (nothing re-runs) and writes the same table
    out = _run(cmd + ["--collect"], repo)
    assert (repo / "reports/ablation.md").read_text() == table
    assert _ran(out) == set()


# Each switch of the real-photo settings re-runs its own stage and what follows, nothing before it.
# (stacked on the workspace the tests above leave; each run changes one key)
SWITCHES = [
    ("cam.freeze_bn=true", {"train_cam", "make_cam", "crf"}, {"prepare"}),
    ("cam.frozen_levels=1", {"train_cam", "make_cam"}, {"prepare"}),
    ("crf.thresholds=cam_sweep", {"crf", "train_aff", "random_walk"}, {"prepare", "train_cam", "make_cam"}),
    ("crf.merge=agree", {"crf"}, {"prepare", "train_cam", "make_cam"}),
    ("affinity.frozen_levels=1", {"train_aff", "random_walk"}, {"prepare", "train_cam", "make_cam", "crf"}),
    ("affinity.embed_dim=32", {"train_aff", "random_walk"}, {"prepare", "train_cam", "make_cam", "crf"}),
    ("rw.background=cam_sweep", {"random_walk", "train_seg", "evaluate"},
     {"prepare", "train_cam", "make_cam", "crf", "train_aff"}),
    ("seg.freeze_bn=true", {"train_seg", "evaluate"}, {"prepare", "train_cam", "make_cam", "crf", "train_aff", "random_walk"}),
    ("seg.decoder=true", {"train_seg", "evaluate"},
     {"prepare", "saliency", "train_cam", "make_cam", "crf", "train_aff", "random_walk"}),
    ("seg.saliency_weight=0.5", {"train_seg", "evaluate"},
     {"prepare", "saliency", "train_cam", "make_cam", "crf", "train_aff", "random_walk"}),
    ("crf.background_cue=saliency", {"crf", "train_aff", "random_walk"}, {"prepare", "train_cam", "make_cam"}),
    ("rw.background_cue=saliency", {"random_walk", "train_seg", "evaluate"},
     {"prepare", "train_cam", "make_cam", "crf", "train_aff"}),
    ("saliency.source=u2netp", {"saliency", "crf", "random_walk"}, {"prepare", "train_cam", "make_cam"}),
    ("saliency.seed_rule=guided", {"crf", "train_aff", "random_walk"}, {"prepare", "saliency", "train_cam", "make_cam"}),
    ("rw.background_cue=saliency_cam", {"random_walk", "train_seg"},
     {"prepare", "saliency", "train_cam", "make_cam", "crf", "train_aff"}),
    ("rw.affinity=features", {"train_aff", "random_walk", "instances"}, {"prepare", "saliency", "train_cam", "make_cam", "crf"}),
    ("rw.colour_sigma=20", {"random_walk"}, {"prepare", "saliency", "train_cam", "make_cam", "crf", "train_aff"}),
    ("rw.affinity=mix", {"train_aff", "random_walk"}, {"prepare", "saliency", "train_cam", "make_cam", "crf"}),
    ("cam.training=seam", {"train_cam", "make_cam", "crf"}, {"prepare"}),
    ("rw.affinity=irn", {"train_aff", "random_walk"}, {"prepare", "train_cam", "make_cam", "crf"}),
    ("seg.weights=classifier", {"train_seg", "evaluate"},
     {"prepare", "train_cam", "make_cam", "crf", "train_aff", "random_walk", "instances"}),
    ("instances.merge_radius=4", {"instances", "export"},
     {"prepare", "train_cam", "make_cam", "crf", "train_aff", "random_walk", "train_seg"}),
    ("seg.upper_bound=true", {"upper_bound", "evaluate"},
     {"prepare", "train_cam", "make_cam", "crf", "train_aff", "random_walk", "instances", "train_seg"}),
]


@pytest.mark.parametrize("setting,must_run,must_not_run", SWITCHES, ids=[s[0] for s in SWITCHES])
def test_each_real_photo_switch_reruns_only_its_stage_and_downstream(repo, setting, must_run, must_not_run):
    out = _run(["dvc", "exp", "run", "-S", setting], repo)
    ran = _ran(out)
    assert must_run <= ran, (setting, ran)
    assert not ran & must_not_run, (setting, ran)


def test_editing_a_stage_library_file_reruns_that_stage_and_what_follows(repo):
    """train_aff's trainer (pipeline/refine/affinity_training.py) is one of its deps: an edit there is
    seen by `dvc status`, and `dvc repro` re-runs train_aff, nothing upstream. (A comment leaves the
    seeded model byte-identical, so DVC rightly skips what follows; a change to the weights re-runs it.)"""
    _run(["dvc", "repro"], repo)
    trainer = repo / "pipeline/refine/affinity_training.py"
    original = trainer.read_text()
    try:
        trainer.write_text(original + "\n# an edit\n")
        status = _run(["dvc", "status"], repo)
        changed = set(re.findall(r"(?m)^([a-z_]+):\s*$", status))
        assert "train_aff" in changed and "pipeline/refine/affinity_training.py" in status, status
        assert not changed & {"prepare", "saliency", "train_cam", "make_cam", "crf"}, status
        ran = _ran(_run(["dvc", "repro"], repo))
        assert "train_aff" in ran, ran
        assert not ran & {"prepare", "saliency", "train_cam", "make_cam", "crf"}, ran
    finally:
        trainer.write_text(original)

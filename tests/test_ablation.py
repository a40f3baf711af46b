import json
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline.ablation import (_number, ablate, combinations, experiment_name, experiment_ref, markdown_table, parse_grid,
                               read_row)
from pipeline.config import ParamsError

REPO = Path(__file__).resolve().parents[1]


def test_grid_values_are_parsed_as_yaml_and_expanded_to_every_combination():
    grid = parse_grid(["cam.method=cam,gradcam", "rw.enabled=true,false"])
    assert grid == {"cam.method": ["cam", "gradcam"], "rw.enabled": [True, False]}
    assert len(combinations(grid)) == 4
    assert {"cam.method": "gradcam", "rw.enabled": False} in combinations(grid)


def test_unknown_param_and_bad_spec_are_named():
    with pytest.raises(ParamsError, match="cam.nope"):
        parse_grid(["cam.nope=1,2"])
    with pytest.raises(ParamsError, match="key=value1,value2"):
        parse_grid(["cam.method"])


def _write_metrics(root, cam, crf, rw, seg, rw_enabled=True):
    (root / "metrics").mkdir(exist_ok=True)
    (root / "metrics/cam.json").write_text(json.dumps({"miou": cam}))
    (root / "metrics/crf.json").write_text(json.dumps({"miou": crf, "precision": 85.0, "coverage": 60.0, "enabled": True}))
    (root / "metrics/rw.json").write_text(json.dumps({"miou": rw, "enabled": rw_enabled}))
    (root / "metrics/segmenter.json").write_text(json.dumps({"miou": seg}))


def test_row_reads_stage_metrics_and_marks_disabled_stages(tmp_path):
    _write_metrics(tmp_path, 28.9, 39.2, 30.0, 22.4, rw_enabled=False)
    row = read_row({"rw.enabled": False}, tmp_path)
    assert row == {"rw.enabled": False, "CAM": 28.9, "CRF seeds": 39.2, "seeds precision / coverage": "85.0 / 60.0",
                   "random walk": "30.0 (off)", "instance AP50": None, "segmenter (val)": 22.4}
    (tmp_path / "metrics/instances.json").write_text(json.dumps({"instance_quality": {"ap50": 12.5}}))
    row = read_row({"rw.enabled": False}, tmp_path)
    table = markdown_table([row])
    assert table.splitlines()[0] == ("| rw.enabled | CAM | CRF seeds | seeds precision / coverage | random walk | "
                                     "instance AP50 | segmenter (val) |")
    assert "| False | 28.9 | 39.2 | 85.0 / 60.0 | 30.0 (off) | 12.5 | 22.4 |" in table
    assert _number(row["random walk"]) == (30.0, True) and _number(row["CAM"]) == (28.9, False)


def test_until_runs_the_graph_to_a_stage_and_shows_only_the_stages_it_ran(tmp_path, monkeypatch):
    import pipeline.ablation as ablation

    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")  # the columns follow the stage graph
    _write_metrics(tmp_path, 28.9, 39.2, 30.0, 22.4)
    assert list(read_row({}, tmp_path, until="random_walk")) == ["CAM", "CRF seeds", "seeds precision / coverage",
                                                                "random walk"]
    assert list(read_row({}, tmp_path, until="make_cam")) == ["CAM"]
    # instances does not read the pseudo masks: dvc exp run instances never runs random_walk
    assert list(read_row({}, tmp_path, until="instances")) == ["CAM", "CRF seeds", "seeds precision / coverage",
                                                              "instance AP50"]
    with pytest.raises(ParamsError, match="measure nothing"):
        ablate(["cam.training=plain,seam"], repo=tmp_path, mode="collect", until="train_cam")
    assert experiment_name({"cam.training": "seam"}, "random_walk") == "abl-training_seam-until_random_walk"
    assert experiment_name({"cam.training_options": "x" * 100}, "make_cam").endswith("-until_make_cam")
    # the same key name in two namespaces: two experiments, never one reused for the other
    assert experiment_name({"crf.background_cue": "cam"}) == "abl-crf_background_cue_cam"
    assert experiment_name({"rw.background_cue": "cam"}) == "abl-rw_background_cue_cam"
    seen = []

    class Done:
        returncode, stdout, stderr = 0, "", ""

    monkeypatch.setattr(ablation.subprocess, "run", lambda cmd, **kw: seen.append(cmd) or Done())
    ablation.run_experiment({"cam.training": "seam"}, "x", until="make_cam")
    assert seen[-1] == ["dvc", "exp", "run", "-n", "x", "-S", "cam.training=seam", "make_cam"]
    with pytest.raises(ParamsError, match="unknown stage 'nope'"):
        ablate(["cam.training=plain,seam"], repo=tmp_path, mode="collect", until="nope")


def _git(repo, *args):
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


def test_experiments_are_found_by_name_on_the_current_baseline_and_read_from_git(tmp_path):
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "config", "user.email", "t@example.com")
    _git(tmp_path, "config", "user.name", "t")
    _write_metrics(tmp_path, 1.0, 1.5, 1.7, 2.0)
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-qm", "baseline")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    setting = {"cam.method": "gradcam", "rw.enabled": False}
    name = experiment_name(setting)
    assert name == "abl-method_gradcam-rw_enabled_false"
    assert experiment_ref(name, tmp_path) is None

    # an experiment commit, kept where DVC keeps it: refs/exps/<baseline[:2]>/<baseline[2:]>/<name>
    _write_metrics(tmp_path, 5.0, 5.5, 6.0, 7.0, rw_enabled=False)
    _git(tmp_path, "commit", "-qam", "experiment")
    _git(tmp_path, "update-ref", f"refs/exps/{head[:2]}/{head[2:]}/{name}", "HEAD")
    _git(tmp_path, "reset", "-q", "--hard", head)  # back on the baseline, workspace metrics as before

    ref = experiment_ref(name, tmp_path)
    assert ref is not None
    row = read_row(setting, tmp_path, ref)
    assert row["CAM"] == 5.0 and row["random walk"] == "6.0 (off)" and row["segmenter (val)"] == 7.0
    assert read_row(setting, tmp_path)["CAM"] == 1.0  # the workspace still has the baseline's metrics

    table = ablate(["cam.method=gradcam", "rw.enabled=false"], repo=tmp_path, mode="collect")
    assert "| gradcam | False | 5.0 |" in table
    assert (tmp_path / "reports/ablation.md").read_text().count("| gradcam |") == 1
    assert (tmp_path / "reports/ablation.png").stat().st_size > 0
    with pytest.raises(RuntimeError, match="abl-method_cam-rw_enabled_false.*not found"):
        ablate(["cam.method=cam", "rw.enabled=false"], repo=tmp_path, mode="collect")


def _baseline_repo(root) -> str:
    """A git repository at ``root`` whose commit holds the demo params.yaml and some metrics; returns the params text."""
    _git(root, "init", "-q")
    _git(root, "config", "user.email", "t@example.com")
    _git(root, "config", "user.name", "t")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    _write_metrics(root, 1.0, 1.5, 1.7, 2.0)
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "baseline")
    return (root / "params.yaml").read_text()


def test_each_experiment_starts_from_the_baseline_commits_params(tmp_path, monkeypatch):
    import pipeline.ablation as ablation

    baseline = _baseline_repo(tmp_path)
    seen = []

    def fake_run(setting, name, queue=False, repo=".", until=None):
        seen.append((tmp_path / "params.yaml").read_text())
        # what dvc exp run does: the experiment's params stay in the workspace
        (tmp_path / "params.yaml").write_text(baseline.replace("training: plain", "training: sccam"))
        return ""

    monkeypatch.setattr(ablation, "run_experiment", fake_run)
    ablation.ablate(["crf.background_cue=cam,saliency"], repo=tmp_path, mode="run")
    assert len(seen) == 2 and all(text == baseline for text in seen)
    assert (tmp_path / "params.yaml").read_text() == baseline  # the last experiment's params are not left behind


def test_uncommitted_params_edits_are_refused_not_overwritten(tmp_path, monkeypatch):
    import pipeline.ablation as ablation

    baseline = _baseline_repo(tmp_path)
    monkeypatch.setattr(ablation, "run_experiment", lambda *a, **k: pytest.fail("nothing may run"))
    edited = baseline.replace("  epochs: 10\n", "  epochs: 12\n", 1) + "# my note\n"
    assert edited.count("epochs: 12") == 1
    (tmp_path / "params.yaml").write_text(edited)
    with pytest.raises(RuntimeError, match=r"not committed \(seg.epochs: 10 -> 12\)"):
        ablation.ablate(["crf.background_cue=cam,saliency"], repo=tmp_path, mode="run")
    assert (tmp_path / "params.yaml").read_text() == edited  # the user's edit and comment are kept
    (tmp_path / "params.yaml").write_text(baseline + "# only a comment\n")
    with pytest.raises(RuntimeError, match="comments or layout"):
        ablation.ablate(["crf.background_cue=cam,saliency"], repo=tmp_path, mode="queue")

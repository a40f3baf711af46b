"""Issue 24: the training stages under torch.distributed.run on the CPU (gloo), two processes against
one with the same global batch and seed: the global batch order, the per-rank slices, the gradient
average, the losses averaged over the global count of pixels and pairs, and BatchNorm over the global
batch (on CPU our all-reduced BatchNorm: torch's SyncBatchNorm needs CUDA) must give the one-process
weights. Dropout draws different masks on each rank, so the segmenter's is off here."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.config import render_params
from pipeline.distributed import FAIL_ENV, DistributedError
from pipeline.presets import preset
from synthetic import run_stages

UPSTREAM = ("prepare", "train_cam", "make_cam", "crf", "train_aff", "random_walk")


def _params(procs: int) -> dict:
    p = preset("tiny")
    p["seg"]["dropout"] = 0.0
    p["compute"].update(procs_per_node=procs, torch_threads=1)
    return p


def _stage(work: Path, name: str, params: dict, env: dict | None = None) -> None:
    run_stages(work, params, (name,), env)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """A tiny workspace with everything the three training stages read (one process)."""
    work = tmp_path_factory.mktemp("ddp_base")
    for name in UPSTREAM:
        _stage(work, name, _params(1))
    return work


def _copy(upstream: Path, dest: Path) -> Path:
    shutil.copytree(upstream, dest, ignore=shutil.ignore_patterns(".wsss.lock"))
    return dest


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].is_floating_point())


@pytest.mark.parametrize("stage, model", [("train_cam", "models/cam/classifier.pt"),
                                          ("train_aff", "models/affinity/affinity.pt"),
                                          ("train_seg", "models/seg/segmenter.pt")])
def test_two_processes_end_with_the_weights_of_one(upstream, tmp_path, stage, model):
    one, two = _copy(upstream, tmp_path / "one"), _copy(upstream, tmp_path / "two")
    _stage(one, stage, _params(1))
    _stage(two, stage, _params(2))
    a, b = _state(one / model), _state(two / model)
    assert _max_diff(a, b) < 1e-3
    if stage != "train_seg":  # upstream trained the same model in one process: a run is deterministic
        assert _max_diff(a, _state(upstream / model)) == 0.0


def test_metrics_record_the_world_size(upstream, tmp_path):
    two = _copy(upstream, tmp_path / "two")
    _stage(two, "train_cam", _params(2))
    m = json.loads((two / "metrics/train_cam.json").read_text())
    assert m["world_size"] == 2
    assert json.loads((upstream / "metrics/train_cam.json").read_text())["world_size"] == 1


def test_a_rank_that_raises_fails_the_stage_naming_it_and_leaves_no_model(upstream, tmp_path):
    work = _copy(upstream, tmp_path / "w")
    shutil.rmtree(work / "models/cam")
    with pytest.raises(DistributedError, match=r"rank 1: RuntimeError: injected failure on rank 1"):
        _stage(work, "train_cam", _params(2), {FAIL_ENV: "1:1:raise"})
    assert not (work / "models/cam/classifier.pt").exists()


def test_a_killed_rank_fails_the_stage_and_a_rerun_resumes_to_the_uninterrupted_weights(upstream, tmp_path):
    whole, killed = _copy(upstream, tmp_path / "whole"), _copy(upstream, tmp_path / "killed")
    _stage(whole, "train_cam", _params(2))
    shutil.rmtree(killed / "models/cam")
    with pytest.raises(DistributedError, match="killed by a signal"):
        _stage(killed, "train_cam", _params(2), {FAIL_ENV: "1:1"})
    assert not (killed / "models/cam/classifier.pt").exists()
    assert (killed / "models/cam.partial/resume.pt").is_file()  # rank 0 saved epoch 1 before rank 1 died
    _stage(killed, "train_cam", _params(2))
    assert _max_diff(_state(whole / "models/cam/classifier.pt"), _state(killed / "models/cam/classifier.pt")) < 1e-6
    assert not (killed / "models/cam.partial/resume.pt").exists()


def test_a_global_batch_that_does_not_split_is_refused_naming_the_param(upstream, tmp_path):
    work = _copy(upstream, tmp_path / "w")
    params = _params(3)  # the tiny preset's cam.batch_size 8 does not split over 3
    with pytest.raises(DistributedError, match=r"param cam.batch_size: 8 does not split over 3 processes"):
        _stage(work, "train_cam", params)


def test_two_nodes_meet_at_the_rendezvous_and_train_like_one_process(upstream, tmp_path):
    """Two 'nodes' on this machine: each starts the stage itself (as one SLURM task per node would),
    compute.nodes 2 and the same compute.rdzv_endpoint; they meet there and end with the weights of
    one process."""
    import socket
    import subprocess
    import sys

    one, two = _copy(upstream, tmp_path / "one"), _copy(upstream, tmp_path / "two")
    _stage(one, "train_cam", _params(1))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    params = _params(1)
    params["compute"].update(nodes=2, rdzv_endpoint=f"127.0.0.1:{port}")
    (two / "params.yaml").write_text(render_params(params))
    root = Path(__file__).resolve().parents[1]
    env = {**__import__("os").environ, "PYTHONPATH": str(root)}
    nodes = [subprocess.Popen([sys.executable, "-m", "stages.train_cam"], cwd=two, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [n.communicate(timeout=300) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], [err[-2000:] for _, err in outs]
    a, b = _state(one / "models/cam/classifier.pt"), _state(two / "models/cam/classifier.pt")
    assert _max_diff(a, b) < 1e-3
    assert json.loads((two / "metrics/train_cam.json").read_text())["world_size"] == 2

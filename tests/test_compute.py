import numpy as np
import pytest

from pipeline.compute import dask_client, default_workers, resolve_device, set_torch_threads


def _square_sum(x):
    return int(np.square(np.arange(x)).sum())


@pytest.mark.parametrize("scheduler", ["synchronous", "threads", "processes"])
def test_every_scheduler_returns_results_in_order(scheduler):
    with dask_client(scheduler, workers=2) as run:
        assert run(_square_sum, [3, 1, 4, 1, 5]) == [_square_sum(x) for x in [3, 1, 4, 1, 5]]


def test_unknown_scheduler_names_the_param():
    with pytest.raises(ValueError, match="compute.scheduler"):
        with dask_client("mpi"):
            pass


def test_cuda_without_gpu_is_a_clear_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="compute.device"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


def test_torch_threads_param_wins_and_zero_leaves_cores_for_loader_workers():
    import torch

    before = torch.get_num_threads()
    try:
        assert set_torch_threads({"torch_threads": 1}, torch.device("cpu"), loader_workers=3) == 1
        assert torch.get_num_threads() == 1
        expected = max(1, default_workers() - 1)
        assert set_torch_threads({"torch_threads": 0}, torch.device("cpu"), loader_workers=1) == expected
        assert torch.get_num_threads() == expected
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------ one dask worker per GPU (issue 24)

def test_gpu_workers_are_one_per_gpu_each_pinned_to_its_own():
    from distributed import Nanny

    from pipeline.compute import gpu_worker_specs

    specs = gpu_worker_specs([0, 1])
    assert list(specs) == ["gpu-0", "gpu-1"]
    for g, spec in zip((0, 1), specs.values()):
        assert spec["cls"] is Nanny
        assert spec["options"]["env"] == {"CUDA_VISIBLE_DEVICES": str(g)}
        assert spec["options"]["resources"] == {"GPU": 1} and spec["options"]["nthreads"] == 1


def test_each_gpu_worker_process_sees_only_its_gpu():
    """The cluster the `gpus` scheduler builds (without dask-cuda), started here on the CPU: every
    worker process is started with CUDA_VISIBLE_DEVICES naming one GPU, a different one each."""
    import os

    from distributed import Client, Scheduler, SpecCluster

    from pipeline.compute import gpu_worker_specs

    with SpecCluster(workers=gpu_worker_specs([0, 1]), scheduler={"cls": Scheduler, "options": {"dashboard_address": None}},
                     silence_logs=40) as cluster, Client(cluster) as client:
        client.wait_for_workers(2)
        seen = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
        assert sorted(seen.values()) == ["0", "1"]
        resources = {w["resources"].get("GPU") for w in client.scheduler_info()["workers"].values()}
        assert resources == {1}


def test_per_image_torch_work_runs_on_the_workers_gpu_with_the_gpus_scheduler():
    from pipeline.compute import per_image_torch

    assert per_image_torch({"scheduler": "gpus", "device": "auto", "torch_threads": 0}) == ("cuda", 1)
    assert per_image_torch({"scheduler": "local", "device": "auto", "torch_threads": 0}) == ("cpu", 1)


def test_the_gpus_scheduler_without_a_gpu_says_so():
    import torch

    from pipeline.compute import dask_client

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    with pytest.raises(RuntimeError, match=r"param compute.scheduler: 'gpus' .* no CUDA GPU is visible"):
        with dask_client("gpus"):
            pass


def test_a_gpu_workers_cam_chunk_equals_what_make_cam_stored(tmp_path, monkeypatch):
    """make_cam on the gpus scheduler sends chunks of images to the GPU workers (cam_chunk); run here on
    the CPU, a chunk's CAMs equal the ones make_cam computed in its own process."""
    import importlib

    from pipeline.cam.run import CamChunk, cam_chunk
    from pipeline.config import render_params
    from pipeline.presets import preset
    from pipeline.store import Store

    params = preset("tiny")
    (tmp_path / "params.yaml").write_text(render_params(params))
    monkeypatch.chdir(tmp_path)
    for stage in ("prepare", "train_cam", "make_cam"):
        importlib.import_module(f"stages.{stage}").main()
    store = Store(tmp_path / "data/cams.zarr")
    keys = tuple(store.ids[:3])
    got = cam_chunk(CamChunk(str(tmp_path / "data/prepared"), params["data"], str(tmp_path / "models/cam/classifier.pt"),
                             params["cam"], keys, device="cpu"))
    assert list(got) == list(keys)
    for k in keys:
        cam, logits = got[k]
        np.testing.assert_array_equal(cam, store.read("cam", k))
        assert logits.shape == (cam.shape[0],)  # one logit per label class

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

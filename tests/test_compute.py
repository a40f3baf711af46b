import numpy as np
import pytest

from pipeline.compute import dask_client, resolve_device


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

"""Devices, seeds and the dask helper for CPU-bound per-image work."""
from __future__ import annotations

import contextlib
import os
import random
from typing import Sequence

import numpy as np


def resolve_device(name: str = "auto"):
    """``auto`` -> cuda when available, else cpu. ``cuda`` without a GPU is an error."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("param compute.device: 'cuda' asked for but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def set_torch_threads(compute: dict, device, loader_workers: int = 0) -> int:
    """Set torch's intra-op threads for a stage on CPU; returns the count (no-op on CUDA).

    ``compute.torch_threads`` > 0 sets it; 0 leaves one core per DataLoader worker and uses the
    rest (oversubscribed OpenMP threads spin and can run 10x slower on a busy machine)."""
    import torch

    if getattr(device, "type", str(device)) != "cpu":
        return torch.get_num_threads()
    n = int(compute.get("torch_threads") or 0) or max(1, default_workers() - int(loader_workers))
    torch.set_num_threads(n)
    return n


def per_image_torch(compute: dict) -> tuple[str, int]:
    """(device, torch threads) for torch work mapped over images through :func:`dask_client`: in
    the stage's own process (``synchronous``) the stage's device and ``compute.torch_threads``; on
    the ``gpus`` cluster the worker's own GPU (it sees only that one, as ``cuda``); in other dask
    workers the CPU with one thread each (the workers are the parallelism, and a GPU is not shared
    between worker processes)."""
    if compute["scheduler"] == "gpus":
        return "cuda", int(compute.get("torch_threads") or 1)
    if compute["scheduler"] != "synchronous":
        return "cpu", 1
    return str(resolve_device(compute["device"])), int(compute.get("torch_threads") or 0)


def gpu_worker_specs(gpus: Sequence[int]) -> dict:
    """distributed.SpecCluster worker specs: one single-threaded worker per GPU, each started (by its
    Nanny) with ``CUDA_VISIBLE_DEVICES`` set to its GPU alone and a ``GPU`` resource of 1."""
    from distributed import Nanny

    return {f"gpu-{g}": {"cls": Nanny, "options": {"nthreads": 1, "env": {"CUDA_VISIBLE_DEVICES": str(g)},
                                                   "resources": {"GPU": 1}, "silence_logs": 40}}
            for g in gpus}


def gpu_cluster(workers: int = 0):
    """A local cluster of one worker per GPU (``compute.scheduler: gpus``): dask-cuda's
    LocalCUDACluster when installed, else :func:`gpu_worker_specs` on a SpecCluster. ``workers`` > 0
    uses the first that many GPUs."""
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        raise RuntimeError("param compute.scheduler: 'gpus' runs one dask worker per GPU, but no CUDA GPU is visible")
    gpus = list(range(min(workers, count) if workers else count))
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        from distributed import Scheduler, SpecCluster

        return SpecCluster(workers=gpu_worker_specs(gpus), scheduler={"cls": Scheduler,
                                                                      "options": {"dashboard_address": None}},
                           silence_logs=40)
    return LocalCUDACluster(CUDA_VISIBLE_DEVICES=gpus, threads_per_worker=1, dashboard_address=None, silence_logs=40)


@contextlib.contextmanager
def dask_client(scheduler: str = "local", workers: int = 0):
    """Yields a callable ``run(fn, items) -> list`` that maps ``fn`` over ``items`` in order.

    scheduler: ``synchronous`` (in-process loop), ``threads`` (dask threaded scheduler),
    ``processes`` or ``local`` (a distributed LocalCluster of worker processes, one thread
    each, sized to the machine unless ``workers`` > 0), ``gpus`` (one worker per GPU,
    :func:`gpu_cluster`), or ``tcp://host:port`` (an existing dask scheduler; every worker must see
    the same data paths).
    """
    n = workers or default_workers()
    if scheduler == "synchronous":
        yield lambda fn, items: [fn(x) for x in items]
        return
    if scheduler == "threads":
        import dask

        def run_threads(fn, items):
            tasks = [dask.delayed(fn)(x) for x in items]
            return list(dask.compute(*tasks, scheduler="threads", num_workers=n))

        yield run_threads
        return
    from distributed import Client, LocalCluster

    if scheduler in ("local", "processes"):
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                               silence_logs=40)
        client = Client(cluster)
    elif scheduler == "gpus":
        cluster = gpu_cluster(workers)
        client = Client(cluster)
    elif scheduler.startswith("tcp://"):
        cluster = None
        client = Client(scheduler)
    else:
        raise ValueError(f"param compute.scheduler: {scheduler!r} is not "
                         "synchronous|threads|processes|local|gpus|tcp://host:port")
    try:
        def run_client(fn, items):
            futures = client.map(fn, list(items), pure=False)
            return client.gather(futures)

        yield run_client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()

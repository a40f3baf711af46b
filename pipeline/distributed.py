"""Training past one process: the three training stages under torch.distributed.

``compute.procs_per_node`` x ``compute.nodes`` > 1 makes a training stage a *launcher*: it starts
its workers with torch's elastic launcher (``python -m torch.distributed.run``, what ``torchrun``
runs; ``--standalone`` on one node, ``compute.rdzv_endpoint`` host:port to join several) and waits.
Each worker runs the same stage module; :func:`init_worker` joins the process group (NCCL on CUDA,
each worker on GPU ``LOCAL_RANK``; gloo on CPU).

What keeps a run's hyper-parameters meaning the same at any scale:

- the global batch stays ``batch_size``: every rank draws the same global batches (the sampler the
  one-process run uses, seeded alike) and takes its ``batch_size / world`` slice
  (:func:`rank_loader`); augmentation seeds depend on (seed, epoch, image), never on the rank;
- after each backward the gradients are averaged over ranks (:func:`average_gradients`, one
  all-reduce over a flat buffer: what DistributedDataParallel does, without its bucketed overlap;
  a step function may call any method of the model, which DDP's forward-only hook would not see);
  losses that average over pixels or pixel pairs use the global count (:func:`global_count`), so
  the averaged gradient is the one-process gradient;
- BatchNorm normalises over the global batch (:func:`sync_batchnorm`): torch's SyncBatchNorm on
  CUDA; on CPU, where torch has none, a BatchNorm whose statistics are summed over ranks with a
  differentiable all-reduce;
- rank 0 alone writes checkpoints, resume files, metrics, plots and logs (:func:`is_main`;
  :func:`pipeline.checkpoint.save_checkpoint` is a no-op elsewhere). A rank that fails fails the
  stage: the launcher stops the others and :func:`launch` raises with that rank's error; the final
  checkpoint is written only after the last epoch, so nothing looks complete.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

log = logging.getLogger("wsss")

WORKER_ENV = "WSSS_DDP_WORKER"  # set by launch() for its workers (they skip the launcher's workspace lock)
FAIL_ENV = "WSSS_FAIL_AT"  # test hook: "RANK:EPOCH" kills that rank (SIGKILL) when that epoch starts


class DistributedError(RuntimeError):
    """A distributed training run failed; the message names the rank and its error."""


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Whether this process writes the stage's files (rank 0, or the only process)."""
    return rank() == 0


def is_worker() -> bool:
    """Whether this process is a worker that :func:`launch` started."""
    return os.environ.get(WORKER_ENV) == "1"


def requested_world(compute: dict) -> int:
    return int(compute["procs_per_node"]) * int(compute["nodes"])


def check_global_batch(batch_size: int, images: int, world: int, param: str) -> None:
    """A clear error naming ``param`` when a global batch ``batch_size`` does not split evenly over
    ``world`` ranks or ``images`` leave no full batch."""
    if world <= 1:
        return
    if batch_size % world:
        raise ValueError(f"param {param}: {batch_size} does not split over {world} processes "
                         f"(compute.procs_per_node x compute.nodes); use a multiple of {world}")
    if images < batch_size:
        raise ValueError(f"param {param}: {batch_size} is more than the {images} training images; under "
                         f"distributed training every step needs a full global batch")


def launch(stage: str, compute: dict, project_root: str | Path | None = None) -> bool:
    """When ``compute`` asks for more than one process and this is not already a worker: run the
    stage module ``stages.<stage>`` under ``torch.distributed.run`` and return True once every
    worker finished (raise :class:`DistributedError` naming the failed rank otherwise). False: run
    the stage here, as one process or as a worker."""
    world = requested_world(compute)
    if world <= 1 or is_worker():
        return False
    root = Path(project_root or Path(__file__).resolve().parents[1])
    logs = Path(tempfile.mkdtemp(prefix=f"wsss-{stage}-ranks-"))
    args = [f"--nproc-per-node={compute['procs_per_node']}", f"--nnodes={compute['nodes']}",
            f"--log-dir={logs}", "--redirects=2", "--tee=2"]
    if int(compute["nodes"]) == 1 and not compute["rdzv_endpoint"]:
        args.append("--standalone")
    else:
        if not compute["rdzv_endpoint"]:
            raise ValueError(f"param compute.rdzv_endpoint: {compute['nodes']} nodes need a host:port that every node "
                             "reaches (the rendezvous), e.g. the first node's name and a free port")
        args += ["--rdzv-backend=c10d", f"--rdzv-endpoint={compute['rdzv_endpoint']}", f"--rdzv-id=wsss-{stage}"]
    env = {**os.environ, WORKER_ENV: "1",
           "PYTHONPATH": os.pathsep.join([str(Path.cwd()), str(root)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    log.info("%s: starting %d processes on this node (%s x %s in all) with torch.distributed.run", stage,
             compute["procs_per_node"], compute["procs_per_node"], compute["nodes"])
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", *args, "-m", f"stages.{stage}"], env=env)
    if done.returncode != 0:  # the ranks' logs stay for reading
        raise DistributedError(f"{stage}: distributed training failed (exit {done.returncode}): {failed_rank(logs)}")
    shutil.rmtree(logs, ignore_errors=True)
    return True


# what a rank reports when another rank died first (not the cause)
_CONSEQUENCE = re.compile(r"Connection closed by peer|Connection reset by peer|remote worker crash|peer process|"
                          r"NCCL communicator was aborted|Broken pipe")


def failed_rank(log_dir: Path) -> str:
    """The rank whose error caused the failure: 'rank N: <error>' from the ranks' stderr
    (torch.distributed.run --log-dir), preferring a rank's own error over the connection errors the
    others see once it has gone; or what is known when no rank left a Python error (e.g. a rank
    killed by a signal)."""
    errors = []
    for path in sorted(log_dir.rglob("stderr.log")):
        text = path.read_text(errors="replace")
        if "Traceback" not in text:
            continue
        lines = [re.sub(r"^\[rank\d+\]:\s?", "", ln) for ln in text.strip().splitlines() if ln.strip()]
        error = next((ln for ln in reversed(lines) if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b", ln.split(":")[0])),
                     lines[-1])
        errors.append((bool(_CONSEQUENCE.search(error)), path.parent.name, error.strip(), path))
    if not errors:
        return "a rank exited without a Python error (killed by a signal or out of memory?)"
    consequence, rank_, error, path = sorted(errors, key=lambda e: e[0])[0]
    if consequence:
        return (f"a rank exited without a Python error (killed by a signal or out of memory?); rank {rank_} then "
                f"reported: {error} (log {path})")
    return f"rank {rank_}: {error} (log {path})"


def init_worker(device) -> None:
    """Join the process group when started by the launcher: NCCL on CUDA (this worker's GPU is
    ``LOCAL_RANK``), gloo on CPU. Logging below WARNING is silenced on ranks other than 0."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    cuda = getattr(device, "type", str(device)) == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    if not is_main():
        logging.getLogger("wsss").setLevel(logging.WARNING)
    log.info("distributed training: rank %d of %d (%s)", rank(), world_size(), "nccl" if cuda else "gloo")


def worker_device(device):
    """The device of this worker: its own GPU under the launcher on CUDA, else ``device``."""
    import torch

    if getattr(device, "type", str(device)) == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def finish() -> None:
    """Wait for every rank, then leave the process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class RankBatches:
    """A batch sampler: this rank's slice of each global batch of ``batches`` (a BatchSampler every
    rank builds alike, so all ranks see the same global batches in the same order)."""

    def __init__(self, batches, rank_: int, world: int):
        self.batches, self.rank, self.world = batches, rank_, world

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            per = len(batch) // self.world
            yield batch[self.rank * per:(self.rank + 1) * per]


def rank_loader(dataset, sampler, batch_size: int, param: str, **loader_kw):
    """A DataLoader over ``dataset`` drawing ``sampler``'s order in global batches of ``batch_size``
    (the param ``param``; the last, partial batch is dropped unless it is the only one); under
    distributed training each rank loads its slice (:func:`check_global_batch` first). One process:
    the loader a plain ``DataLoader(dataset, batch_size, sampler=sampler, drop_last=...)`` would be. Pass the
    sampler's ``generator`` in ``loader_kw`` too when it has one: a DataLoader draws its workers'
    base seed from it (from torch's global RNG without one), as ``shuffle=True`` loaders do."""
    import torch

    world = world_size()
    check_global_batch(batch_size, len(dataset), world, param)
    if world <= 1:
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                           drop_last=len(dataset) > batch_size, **loader_kw)
    batches = torch.utils.data.BatchSampler(sampler, batch_size, drop_last=True)
    return torch.utils.data.DataLoader(dataset, batch_sampler=RankBatches(batches, rank(), world), **loader_kw)


def global_count(n):
    """A count to divide a rank's loss sum by so that averaging gradients over ranks gives the
    gradient of the global mean: the count itself on one process, else the all-ranks total / world."""
    import torch
    import torch.distributed as dist

    world = world_size()
    if world <= 1:
        return n
    total = torch.as_tensor(n, dtype=torch.float64).detach().clone()
    dist.all_reduce(total)
    return (total / world).to(torch.float32)


def broadcast_model(model) -> None:
    """Every rank starts from rank 0's parameters and buffers."""
    import torch.distributed as dist

    if world_size() <= 1:
        return
    for t in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(t.data, 0)


def _cpu_sync_batchnorm_class():
    import torch
    import torch.nn.functional as F
    from torch.distributed.nn.functional import all_reduce

    class CpuSyncBatchNorm(torch.nn.BatchNorm2d):
        """BatchNorm over the global batch on CPU (gloo), where torch has no SyncBatchNorm: the
        per-channel sum, sum of squares and count are summed over ranks with a differentiable
        all-reduce, so forward statistics, running statistics and gradients are the one-process ones."""

        def forward(self, x):
            if not self.training:
                return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
            c = x.shape[1]
            xf = x.float()
            local = torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)),
                               xf.new_tensor([x.numel() / c])])
            total = all_reduce(local)
            n = total[-1]
            mean = total[:c] / n
            var = (total[c:2 * c] / n - mean * mean).clamp(min=0)
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                self.running_var.mul_(1 - m).add_(m * var.detach() * n / (n - 1).clamp(min=1))
                self.num_batches_tracked += 1
            shape = (1, c, 1, 1)
            y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
            if self.affine:
                y = y * self.weight.view(shape) + self.bias.view(shape)
            return y.to(x.dtype)

    return CpuSyncBatchNorm


def _convert_cpu(module, cls):
    import torch

    if isinstance(module, torch.nn.BatchNorm2d) and not isinstance(module, cls):
        new = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        new.weight, new.bias = module.weight, module.bias  # the same parameters: optimizers keep them
        new.running_mean, new.running_var = module.running_mean, module.running_var
        new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, _convert_cpu(child, cls))
    return module


def sync_batchnorm(model, device):
    """BatchNorm over the global batch under distributed training, in place (same parameters and
    buffers): torch's SyncBatchNorm on CUDA, :func:`_cpu_sync_batchnorm_class`'s on CPU. Unchanged on
    one process."""
    import torch

    if world_size() <= 1:
        return model
    if getattr(device, "type", str(device)) == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _convert_cpu(model, _cpu_sync_batchnorm_class())


def average_gradients(model) -> None:
    """Average the gradients of ``model``'s trainable parameters over ranks: one all-reduce over a flat
    buffer (a parameter without a gradient on this rank counts as zeros, so every rank sends the same)."""
    import torch
    import torch.distributed as dist

    world = world_size()
    if world <= 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over ranks (the epoch's loss and image counts for the log)."""
    import torch
    import torch.distributed as dist

    if world_size() <= 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def maybe_fail(epoch: int) -> None:
    """Test hook: ``WSSS_FAIL_AT=RANK:EPOCH`` kills this process (SIGKILL, as a crashed node would be)
    when it is that rank and that epoch (0-based) starts; ``RANK:EPOCH:raise`` raises a Python error
    there instead."""
    spec = os.environ.get(FAIL_ENV)
    if not spec:
        return
    parts = spec.split(":")
    if rank() == int(parts[0]) and epoch == int(parts[1]):
        if parts[2:] == ["raise"]:
            raise RuntimeError(f"injected failure on rank {rank()} at epoch {epoch} ({FAIL_ENV})")
        import signal

        os.kill(os.getpid(), signal.SIGKILL)

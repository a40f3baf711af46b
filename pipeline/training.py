"""Shared training loop pieces: poly schedule, 10x head lr, AMP on CUDA, channels_last, logging, and a
per-epoch resume checkpoint so an interrupted training stage continues where it stopped.

All three training stages (train_cam, train_aff, train_seg) run :func:`train_loop`. With a
:class:`ResumePoint` it writes model, optimizer, RNG states and history after every epoch; a re-run
with the same fingerprint restores them and finishes with the same weights as an uninterrupted run.
The fingerprint covers the settings that shape the result, the code (``provenance.code_digest``)
and the ``inputs`` (prepared data, initial weights, training labels); a file made from anything
else is ignored, with a log line naming what changed. The stage deletes the resume file once the
final checkpoint is saved.
"""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

from pipeline.checkpoint import save_checkpoint
from pipeline.distributed import average_gradients, broadcast_model, is_main, maybe_fail, reduce_sum, sync_batchnorm
from pipeline.progress import progress_bar

log = logging.getLogger("wsss")


def param_groups(backbone: torch.nn.Module, head: torch.nn.Module | Iterable, lr: float, weight_decay: float,
                 head_lr_mult: float = 10.0) -> list[dict]:
    head_params = head.parameters() if isinstance(head, torch.nn.Module) else head
    return [
        {"params": [p for p in backbone.parameters() if p.requires_grad], "lr": lr, "base_lr": lr, "weight_decay": weight_decay},
        {"params": [p for p in head_params if p.requires_grad], "lr": lr * head_lr_mult, "base_lr": lr * head_lr_mult,
         "weight_decay": weight_decay},
    ]


def poly_lr(optimizer: torch.optim.Optimizer, step: int, total: int, power: float = 0.9) -> None:
    """Set each group's lr to base_lr * (1 - step/total)^power."""
    f = (1 - min(step, total) / max(total, 1)) ** power
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * f


def autocast(device: torch.device):
    """bf16 autocast on CUDA, nothing on CPU (fp32 there keeps CPU results exact)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move to ``device`` in channels_last: faster convs on CUDA, and on CPU too (oneDNN; 1.8-2x for
    EfficientNet-Lite0 training on a 2-core CPU, measured)."""
    return model.to(device).to(memory_format=torch.channels_last)


def images_to(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


class ResumePoint:
    """The per-epoch resume checkpoint of one training run (see the module docstring).

    ``settings``: a digest of the params that shape the result.
    ``inputs``: name -> digest of everything else the run reads (``prepared`` data, initial
    ``weights``, training ``labels``, ...); the code's digest is added here.
    ``generator``: the DataLoader's shuffling generator, whose state is saved and restored too.
    """

    def __init__(self, path: str | Path, settings: str, desc: str, generator: torch.Generator | None = None,
                 inputs: dict[str, str] | None = None):
        from pipeline.provenance import code_digest
        from pipeline.store import fingerprint

        self.path, self.desc, self.generator = Path(path), desc, generator
        self.basis = {"settings": settings, **(inputs or {}), "code": code_digest()}
        self.fingerprint = fingerprint(self.basis)

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[list[dict], int]:
        """Load a matching checkpoint into ``model`` and ``optimizer``; return (history so far, epochs done)."""
        from pipeline.provenance import describe_change

        if not self.path.is_file():
            return [], 0
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated by a full disk or a kill outside save_checkpoint's rename
            log.warning("%s: cannot read %s (%s: %s); starting over", self.desc, self.path, type(e).__name__, e)
            return [], 0
        if state.get("fingerprint") != self.fingerprint:
            log.info("%s: discarding %s: made from other %s; starting over", self.desc, self.path,
                     describe_change(state.get("basis") or {}, self.basis))
            return [], 0
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        if self.generator is not None and state.get("generator_rng") is not None:
            self.generator.set_state(state["generator_rng"])
        log.info("%s: resuming after epoch %d from %s", self.desc, state["epoch"], self.path)
        return list(state["history"]), int(state["epoch"])

    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, history: list[dict], epoch: int) -> None:
        save_checkpoint(self.path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "history": history, "epoch": epoch,
            "fingerprint": self.fingerprint, "basis": self.basis, "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "generator_rng": self.generator.get_state() if self.generator is not None else None})

    def clear(self) -> None:
        clear_resume(self.path)


def clear_resume(path: str | Path) -> None:
    """Remove a resume file (and its folder when that is left empty): the final checkpoint is saved.
    Under distributed training only rank 0, which wrote it, removes it."""
    if not is_main():
        return
    path = Path(path)
    path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        path.parent.rmdir()


def train_loop(model: torch.nn.Module, loader, step_fn: Callable[[dict], torch.Tensor], optimizer, epochs: int,
               device: torch.device, desc: str, on_epoch_start: Callable[[int], None] | None = None,
               on_epoch_end: Callable[[int, float], None] | None = None,
               resume: ResumePoint | None = None) -> list[dict]:
    """Run ``epochs`` epochs; ``step_fn(batch) -> loss``. Poly lr per step. Returns the per-epoch history.

    Logs one line per epoch: loss and images/s. ``on_epoch_start(epoch)`` runs before each epoch
    (datasets use it to pick the epoch's augmentation seeds). With ``resume``, a matching checkpoint
    is restored first (the poly schedule continues where it stopped) and one is written after every
    epoch, before ``on_epoch_end(epoch, loss)``.
    """
    sync_batchnorm(model, device)  # under distributed training on CUDA (in place: the step functions hold the model)
    history, start_epoch = resume.restore(model, optimizer) if resume else ([], 0)
    broadcast_model(model)  # every rank from rank 0's weights
    total = epochs * max(1, len(loader))
    step = start_epoch * max(1, len(loader))
    for epoch in range(start_epoch, epochs):
        maybe_fail(epoch)
        if on_epoch_start:
            on_epoch_start(epoch)
        model.train()
        t0, seen, loss_sum = time.perf_counter(), 0, 0.0
        with progress_bar(total=len(loader), desc=f"{desc} {epoch + 1}/{epochs}", unit="batch") as bar:
            for batch in loader:
                poly_lr(optimizer, step, total)
                with autocast(device):
                    loss = step_fn(batch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{desc}: loss became {loss.item()} at epoch {epoch + 1}; lower the lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                average_gradients(model)  # distributed training: the mean over ranks (no-op on one process)
                optimizer.step()
                n = len(next(iter(batch.values()))) if isinstance(batch, dict) else len(batch[0])
                seen += n
                loss_sum += loss.item() * n
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}")
        dt = time.perf_counter() - t0
        loss_sum, seen = reduce_sum([loss_sum, seen])  # over every rank (unchanged on one process)
        rec = {"epoch": epoch + 1, "loss": loss_sum / max(seen, 1), "images_per_s": seen / dt if dt else 0.0}
        history.append(rec)
        log.info("%s epoch %d/%d: loss %.4f, %.1f img/s", desc, epoch + 1, epochs, rec["loss"], rec["images_per_s"])
        if resume:
            resume.save(model, optimizer, history, epoch + 1)
        if on_epoch_end:
            on_epoch_end(epoch, rec["loss"])
    return history

"""Shared training loop pieces: poly schedule, 10x head lr, AMP/channels_last on CUDA, logging."""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

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
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def images_to(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" and x.dim() == 4 else x


def train_loop(model: torch.nn.Module, loader, step_fn: Callable[[dict], torch.Tensor], optimizer, epochs: int,
               device: torch.device, desc: str, on_epoch_end: Callable[[int, float], None] | None = None,
               start_epoch: int = 0) -> list[dict]:
    """Run ``epochs`` epochs; ``step_fn(batch) -> loss``. Poly lr per step. Returns per-epoch history.

    Logs one line per epoch: loss and images/s. ``start_epoch`` > 0 resumes (the poly schedule
    continues where it stopped; the caller restores model and optimizer state).
    """
    total = epochs * max(1, len(loader))
    step = start_epoch * max(1, len(loader))
    history = []
    for epoch in range(start_epoch, epochs):
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
                optimizer.step()
                n = len(next(iter(batch.values()))) if isinstance(batch, dict) else len(batch[0])
                seen += n
                loss_sum += loss.item() * n
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}")
        dt = time.perf_counter() - t0
        rec = {"epoch": epoch + 1, "loss": loss_sum / max(seen, 1), "images_per_s": seen / dt if dt else 0.0}
        history.append(rec)
        log.info("%s epoch %d/%d: loss %.4f, %.1f img/s", desc, epoch + 1, epochs, rec["loss"], rec["images_per_s"])
        if on_epoch_end:
            on_epoch_end(epoch, rec["loss"])
    return history


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """torch.save to a temp name, then rename (a killed run never leaves a truncated checkpoint)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    return path


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}; run the stage that trains it (see dvc.yaml)")
    return torch.load(path, map_location=map_location, weights_only=True)

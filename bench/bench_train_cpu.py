"""Training speed on the CPU: what the photos preset changes, each against its reference in one run.

    python bench/bench_train_cpu.py [--threads 2] [--repeats 5]

1. One EfficientNet-Lite0 CAM-classifier training step (ImageNet weights, batch 16, 320x320 crops,
   forward + backward + SGD step). Reference: NCHW tensors, every level trained, BatchNorm in
   training mode (how the pipeline trained before the photos preset). Variants: channels_last;
   channels_last + the first two levels frozen + frozen BatchNorm (``cam.frozen_levels: 2``,
   ``cam.freeze_bn: true``).
2. The AffinityNet affinity map, forward + backward, embedding (8, 120, 64, 64), radius 5.
   Reference: PSA's formulation, built here independently: flatten the embedding, gather the two
   ends of every pixel pair with ``index_select``, exp(-mean |f_i - f_j|). Ours:
   ``AffinityNet.affinities`` (one padded copy, one view per offset). Same pairs, values compared.

Every variant runs --repeats timed steps after one warm-up; min / median / max are printed with
the load average, and the ratio uses the medians. Same thread count for every variant.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed(step, repeats):
    step()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return min(times), statistics.median(times), max(times)


def classifier_step(channels_last: bool, frozen: bool):
    from pipeline.models.classifier import build_classifier

    model = build_classifier("efficientnet_lite0", "imagenet", 20, frozen_levels=2 if frozen else 0,
                             freeze_bn=frozen).train()
    torch.manual_seed(0)
    x, y = torch.randn(16, 3, 320, 320), (torch.rand(16, 20) < 0.1).float()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)

    def step():
        loss = F.multilabel_soft_margin_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def psa_pairs(h: int, w: int, offsets):
    """(from, to) flat indices of every in-grid pair, ordered offset by offset (as our maps are)."""
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ind_from, ind_to, keep = [], [], []
    for dy, dx in offsets:
        ok = (ys + dy >= 0) & (ys + dy < h) & (xs + dx >= 0) & (xs + dx < w)
        ind_from.append((ys * w + xs)[ok])
        ind_to.append(((ys + dy) * w + xs + dx)[ok])
        keep.append(ok.flatten())
    return torch.cat(ind_from), torch.cat(ind_to), torch.stack(keep)


def psa_affinities(emb: torch.Tensor, ind_from: torch.Tensor, ind_to: torch.Tensor) -> torch.Tensor:
    flat = emb.flatten(2)
    ff = torch.index_select(flat, 2, ind_from)
    ft = torch.index_select(flat, 2, ind_to)
    return torch.exp(-torch.mean(torch.abs(ft - ff), dim=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.repeats} timed runs each, "
          f"load average before: {os.getloadavg()[0]:.2f}")

    print("\n1. CAM classifier training step (EfficientNet-Lite0, batch 16, 320x320), seconds per step")
    print("| variant | min | median | max | speed-up |\n|---|---|---|---|---|")
    ref = None
    for name, cl, frozen in (("reference: NCHW, all levels trained, BN training", False, False),
                             ("channels_last", True, False),
                             ("channels_last + frozen_levels 2 + freeze_bn", True, True)):
        lo, med, hi = timed(classifier_step(cl, frozen), args.repeats)
        ref = ref or med
        print(f"| {name} | {lo:.2f} | {med:.2f} | {hi:.2f} | {ref / med:.2f}x |", flush=True)

    from pipeline.models.affinity import AffinityNet
    from pipeline.models.pairs import pair_offsets

    offsets = pair_offsets(5)
    torch.manual_seed(0)
    emb0 = torch.randn(8, 120, 64, 64)
    ind_from, ind_to, keep = psa_pairs(64, 64, offsets)
    ours = AffinityNet.affinities(emb0, offsets)
    theirs = psa_affinities(emb0, ind_from, ind_to)
    diff = (ours.flatten(2).transpose(0, 1).reshape(len(offsets), 8, -1).permute(1, 0, 2)[:, keep] - theirs).abs().max()

    def backward_of(fn):
        emb = emb0.clone().requires_grad_(True)
        return lambda: fn(emb).sum().backward()

    print(f"\n2. Affinity map forward + backward, embedding (8, 120, 64, 64), radius 5 ({len(offsets)} offsets); "
          f"max |ours - PSA| = {float(diff):.1e}")
    print("| variant | min | median | max | speed-up |\n|---|---|---|---|---|")
    lo, ref, hi = timed(backward_of(lambda e: psa_affinities(e, ind_from, ind_to)), args.repeats)
    print(f"| reference: PSA index_select pairs | {lo:.2f} | {ref:.2f} | {hi:.2f} | 1.00x |", flush=True)
    lo, med, hi = timed(backward_of(lambda e: AffinityNet.affinities(e, offsets)), args.repeats)
    print(f"| ours: padded views | {lo:.2f} | {med:.2f} | {hi:.2f} | {ref / med:.2f}x |")
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

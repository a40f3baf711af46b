"""Random walk: our fixed-stencil propagation vs the published dense N x N squaring, full work both sides.

    python bench/bench_rw.py [--strides 8 4] [--threads 2] [--repeats 5] [--repeats-s4 3] [--no-ftz-row]

Input: one synthetic 500x375 image (coloured discs + noise) and 3 CAM channels + background
(1 - max)^16, reduced to the stride grid (INTER_AREA). Affinity of a pair of grid cells:
exp(-mean_c |f_i - f_j| / 20) on the reduced colours, for every pair within radius 5.

Reference, built here independently, the way PSA (infer_aff.py) and IRNet (indexing.py) build it:
(from, to) index pairs of the half-plane offsets within the radius on the stride grid, the pair
affinities gathered from the flattened features, A = sparse(pairs, their transposes, identity)
made dense, A = A^beta, T = A / column sums (D^-1 normalisation), ``torch.matmul`` squaring T
logt times, then cam (C, N) @ T. Flush-to-zero on (``torch.set_flush_denormal(True)``): without
it the tiny entries of the higher powers are subnormal floats that stall some squarings (the
``--no-ftz-row`` is skipped, otherwise one extra dense row at stride 8 shows that cost).
Ours: ``pipeline.refine.random_walk.random_walk`` on the (P, h, w) affinities that our
helpers (``pair_offsets``, ``shifted``) compute from the same features.

Timed: from the affinities to the walked scores, the whole 2^logt walk (nothing extrapolated);
building the affinities is not timed on either side. Each method runs in its own process with
the same ``torch.set_num_threads`` and the same FTZ setting; one untimed warm-up on an 8x8 grid,
then --repeats timed runs (--repeats-s4 at stride 4), min / median / max and the load average
before and after each run. Peak RSS: the growth of the process's peak resident set (VmHWM, reset
before each run through /proc/self/clear_refs) over its resident set after loading the inputs.
Agreement: argmax over the 4 channels and max |ours - reference| at the full t = 2^logt.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

H, W = 375, 500
RADIUS, BETA, LOGT, ALPHA = 5, 8.0, 8, 16.0


# ------------------------------------------------------------------ inputs (shared, written once)

def synthetic_inputs(stride: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(grid colours (gh, gw, 3) float32, scores (4, gh, gw) float32: background then 3 CAMs)."""
    import cv2

    rng = np.random.default_rng(seed)
    image = np.full((H, W, 3), 90, np.uint8)
    cams = np.zeros((3, H, W), np.float32)
    for k in range(6):
        c = tuple(int(v) for v in rng.integers(0, 256, 3))
        cx, cy, r = int(rng.integers(60, W - 60)), int(rng.integers(60, H - 60)), int(rng.integers(30, 80))
        cv2.circle(image, (cx, cy), r, c, -1)
        blob = np.zeros((H, W), np.float32)
        cv2.circle(blob, (cx + int(rng.integers(-15, 16)), cy), int(r * 0.7), 1.0, -1)
        cams[k % 3] = np.maximum(cams[k % 3], cv2.GaussianBlur(blob, (0, 0), 12))
    image = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
    gh, gw = -(-H // stride), -(-W // stride)
    colours = cv2.resize(image, (gw, gh), interpolation=cv2.INTER_AREA).astype(np.float32)
    cg = np.stack([cv2.resize(c, (gw, gh), interpolation=cv2.INTER_AREA) for c in cams])
    cg /= cg.max(axis=(1, 2), keepdims=True)
    bg = np.power(np.clip(1.0 - cg.max(0), 0.0, 1.0), ALPHA)
    return colours, np.concatenate([bg[None], cg]).astype(np.float32)


# ------------------------------------------------------------------ reference (PSA / IRNet style)

def reference_pairs(h: int, w: int, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat (from, to) indices of every in-grid pair whose offset lies in the half plane within the
    radius: (0, dx) for 0 < dx < r, and (dy, dx) for 0 < dy < r, |dx| < r, dy^2 + dx^2 < r^2."""
    offs = [(0, dx) for dx in range(1, radius)]
    offs += [(dy, dx) for dy in range(1, radius) for dx in range(-radius + 1, radius) if dy * dy + dx * dx < radius ** 2]
    ys, xs = np.mgrid[0:h, 0:w]
    src, dst = [], []
    for dy, dx in offs:
        ok = (ys + dy < h) & (xs + dx >= 0) & (xs + dx < w)
        src.append((ys * w + xs)[ok])
        dst.append(((ys + dy) * w + xs + dx)[ok])
    return np.concatenate(src), np.concatenate(dst)


def reference_affinities(colours: np.ndarray, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    flat = colours.reshape(-1, 3)
    return np.exp(-np.abs(flat[src] - flat[dst]).mean(1) / 20.0).astype(np.float32)


def reference_walk(aff, src, dst, scores, beta: float, logt: int, squaring_times: list | None = None):
    """aff (M,) pair affinities, src/dst (M,) flat indices, scores (C, N) -> (C, N) walked scores."""
    import torch

    n = scores.shape[1]
    ident = torch.arange(n)
    idx = torch.cat([torch.stack([src, dst]), torch.stack([dst, src]), torch.stack([ident, ident])], 1)
    a = torch.sparse_coo_tensor(idx, torch.cat([aff, aff, torch.ones(n)]), (n, n),
                                check_invariants=False).to_dense()
    a = torch.pow(a, beta)
    trans = a / torch.sum(a, dim=0, keepdim=True)
    del a
    for _ in range(logt):
        t0 = time.perf_counter()
        trans = torch.matmul(trans, trans)
        if squaring_times is not None:
            squaring_times.append(time.perf_counter() - t0)
    return torch.matmul(scores, trans)


# ------------------------------------------------------------------ measurement (one process per method)

def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1]) / 1024.0
    return float("nan")


def _reset_peak() -> tuple[float, bool]:
    """Reset the kernel's peak-RSS mark; returns (current RSS MB, whether the reset worked)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        ok = True
    except OSError:
        ok = False
    return _status_mb("VmRSS"), ok


def child(method: str, inputs: str, out: str, threads: int, ftz: bool, repeats: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    ftz_ok = torch.set_flush_denormal(ftz)
    z = np.load(inputs)
    colours, scores = z["colours"], z["scores"]
    gh, gw = colours.shape[:2]
    c = scores.shape[0]
    if method == "ours":
        from pipeline.models.pairs import pair_offsets, shifted
        from pipeline.refine.random_walk import random_walk

        offsets = pair_offsets(RADIUS)

        def our_aff(col):
            f = torch.from_numpy(np.ascontiguousarray(col)).permute(2, 0, 1)
            return torch.stack([torch.exp(-(f - shifted(f, dy, dx)).abs().mean(0) / 20.0) for dy, dx in offsets])

        aff = our_aff(colours)
        random_walk(scores[:, :8, :8], our_aff(colours[:8, :8]), offsets, BETA, LOGT)  # warm-up, untimed

        def run():
            return random_walk(scores, aff, offsets, BETA, LOGT), {}
    else:
        src, dst = reference_pairs(gh, gw, RADIUS)
        aff = torch.from_numpy(reference_affinities(colours, src, dst))
        src_t, dst_t = torch.from_numpy(src), torch.from_numpy(dst)
        cam_vec = torch.from_numpy(scores.reshape(c, -1))
        s8, d8 = (torch.from_numpy(v) for v in reference_pairs(8, 8, RADIUS))
        reference_walk(torch.from_numpy(reference_affinities(colours[:8, :8], s8.numpy(), d8.numpy())), s8, d8,
                       torch.from_numpy(np.ascontiguousarray(scores[:, :8, :8]).reshape(c, -1)), BETA, LOGT)  # warm-up

        def run():
            sq: list[float] = []
            res = reference_walk(aff, src_t, dst_t, cam_vec, BETA, LOGT, sq)
            return res.numpy().reshape(c, gh, gw), {"squaring_min": min(sq), "squaring_max": max(sq)}

    runs = []
    result = None
    for _ in range(repeats):
        base, reset_ok = _reset_peak()
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        result, parts = run()
        dt = time.perf_counter() - t0
        load1 = os.getloadavg()[0]
        runs.append({"seconds": dt, "peak_mb": _status_mb("VmHWM") - base if reset_ok else float("nan"),
                     "load_before": load0, "load_after": load1, **parts})
        print(f"  {method}: {dt:.3f} s, load {load0:.2f} -> {load1:.2f}", file=sys.stderr, flush=True)
    np.save(out, np.asarray(result, np.float32))
    return {"runs": runs, "threads": torch.get_num_threads(), "ftz": bool(ftz_ok and ftz),
            "peak_process_mb": _status_mb("VmHWM")}


def run_child(method: str, inputs: str, threads: int, ftz: bool, repeats: int) -> tuple[dict, np.ndarray]:
    out = inputs.replace(".npz", f"_{method}_{int(ftz)}.npy")
    cmd = [sys.executable, __file__, "--child", method, "--inputs", inputs, "--out", out, "--threads", str(threads),
           "--repeats", str(repeats)] + ([] if ftz else ["--no-ftz"])
    proc = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1]), np.load(out)


def summary(runs: list[dict], key: str = "seconds") -> tuple[float, float, float]:
    v = [r[key] for r in runs]
    return min(v), statistics.median(v), max(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--strides", type=int, nargs="+", default=[8, 4])
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per method (stride 8 and ours)")
    ap.add_argument("--repeats-s4", type=int, default=3, help="timed runs of the dense reference at stride 4")
    ap.add_argument("--no-ftz-row", action="store_true", help="skip the dense run without flush-to-zero at stride 8")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--inputs", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--no-ftz", dest="ftz", action="store_false", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.inputs, args.out, args.threads, args.ftz, args.repeats)))
        return
    import platform

    import torch

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; torch {torch.__version__}; "
          f"torch.set_num_threads({args.threads}) in every process; load average at start "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    tmp = tempfile.mkdtemp(prefix="bench_rw_")
    rows = []
    for stride in args.strides:
        colours, scores = synthetic_inputs(stride)
        inputs = os.path.join(tmp, f"s{stride}.npz")
        np.savez(inputs, colours=colours, scores=scores)
        n = colours.shape[0] * colours.shape[1]
        print(f"stride {stride}: grid {colours.shape[0]}x{colours.shape[1]}, N = {n}", file=sys.stderr, flush=True)
        ours, ours_res = run_child("ours", inputs, args.threads, True, args.repeats)
        dense_reps = args.repeats_s4 if stride == 4 else args.repeats
        dense, dense_res = run_child("dense", inputs, args.threads, True, dense_reps)
        agree = float((ours_res.argmax(0) == dense_res.argmax(0)).mean())
        diff = float(np.abs(ours_res.astype(np.float64) - dense_res).max())
        rows.append((stride, n, "dense, FTZ on", dense, ours, agree, diff))
        if stride == 8 and not args.no_ftz_row:
            slow, slow_res = run_child("dense", inputs, args.threads, False, min(3, args.repeats))
            rows.append((stride, n, "dense, FTZ off", slow, ours, float((ours_res.argmax(0) == slow_res.argmax(0)).mean()),
                         float(np.abs(ours_res.astype(np.float64) - slow_res).max())))
        ours_plain, _ = run_child("ours", inputs, args.threads, False, args.repeats)
        rows.append((stride, n, "(ours with FTZ off, as the pipeline runs)", None, ours_plain, None, None))

    print(f"\n500x375 image, radius {RADIUS} (34 pairs each way + self), beta {BETA}, logt {LOGT} (t = {2 ** LOGT}), "
          f"4 channels; seconds min / median / max; speed-up = median / median\n")
    print("| stride | N | variant | runs | reference s (min / med / max) | ref. peak RSS MB | ours s (min / med / max) "
          "| ours peak RSS MB | speed-up | argmax agreement | max abs diff | load before → after (range) | threads |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for stride, n, name, ref, our, agree, diff in rows:
        o = summary(our["runs"])
        loads = [r["load_before"] for r in our["runs"]] + [r["load_after"] for r in our["runs"]]
        if ref is None:
            print(f"| {stride} | {n} | {name} | {len(our['runs'])} | | | {o[0]:.3f} / {o[1]:.3f} / {o[2]:.3f} | "
                  f"{max(r['peak_mb'] for r in our['runs']):.1f} | | | | {min(loads):.2f}–{max(loads):.2f} | "
                  f"{our['threads']} (walk: 1) |")
            continue
        d = summary(ref["runs"])
        loads += [r["load_before"] for r in ref["runs"]] + [r["load_after"] for r in ref["runs"]]
        sq = f"; squaring {min(r['squaring_min'] for r in ref['runs']):.2f}–{max(r['squaring_max'] for r in ref['runs']):.2f} s"
        print(f"| {stride} | {n} | {name}{sq} | {len(ref['runs'])} / {len(our['runs'])} | {d[0]:.2f} / {d[1]:.2f} / "
              f"{d[2]:.2f} | {max(r['peak_mb'] for r in ref['runs']):.0f} | {o[0]:.3f} / {o[1]:.3f} / {o[2]:.3f} | "
              f"{max(r['peak_mb'] for r in our['runs']):.1f} | {d[1] / o[1]:.0f}× (range {d[0] / o[2]:.0f}–"
              f"{d[2] / o[0]:.0f}×) | {100 * agree:.3f}% | {diff:.1e} | {min(loads):.2f}–{max(loads):.2f} | "
              f"{ref['threads']} / {our['threads']} (walk: 1) |")
    print(f"\nload average at end {' '.join(f'{v:.2f}' for v in os.getloadavg())}. Ours sets 1 intra-op thread inside "
          "random_walk (more threads cost it time); the reference keeps all the threads given.")


if __name__ == "__main__":
    main()

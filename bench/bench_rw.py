"""Random walk: our fixed-stencil propagation vs the published dense N x N squaring, same affinities.

    python bench/bench_rw.py [--strides 8 4] [--dense-squarings-s4 1] [--full-dense-s4]

A 500x375 synthetic image; affinities exp(-|colour difference| / 20) on the stride grid within
radius 5 (34 half-plane offsets); 3 CAM channels + background. Each method runs in its own
process so its peak RSS (above the process's state after loading inputs) is its own.
The dense reference squares T logt = 8 times (as the published code). At stride 4 the dense
matrix is 11750^2; by default only ``--dense-squarings-s4`` squarings are timed and the total is
extrapolated (build + 8 x squaring + product); argmax agreement at stride 4 is then checked on
T^(2^k) for both methods (same k).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

H, W = 375, 500
RADIUS, BETA, LOGT, ALPHA = 5, 8.0, 8, 16.0


def synthetic_inputs(stride: int, seed: int = 0):
    """(image (H, W, 3) uint8, aff (P, h, w) float32, scores (4, h, w) float32) on the stride grid."""
    import cv2

    from pipeline.models.affinity import pair_offsets, shifted
    import torch

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
    small = cv2.resize(image, (gw, gh), interpolation=cv2.INTER_AREA).astype(np.float32)
    f = torch.from_numpy(small).permute(2, 0, 1)
    offsets = pair_offsets(RADIUS)
    aff = torch.stack([torch.exp(-(f - shifted(f, dy, dx)).abs().mean(0) / 20.0) for dy, dx in offsets]).numpy()
    cg = np.stack([cv2.resize(c, (gw, gh), interpolation=cv2.INTER_AREA) for c in cams])
    cg /= cg.max(axis=(1, 2), keepdims=True)
    from pipeline.refine.common import with_background

    return image, aff.astype(np.float32), with_background(cg, ALPHA)


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1]) / 1024.0
    return float("nan")


def _reset_peak() -> float:
    """Reset the kernel's peak-RSS mark (Linux: write 5 to clear_refs); return the current RSS in MB."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status_mb("VmRSS")


def _peak_mb() -> float:
    hwm = _status_mb("VmHWM")
    return hwm if hwm == hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _child(method: str, inputs: str, out: str, squarings: int | None, q):
    from pipeline.models.affinity import pair_offsets
    from pipeline.refine.random_walk import random_walk, random_walk_dense

    z = np.load(inputs)
    aff, scores = z["aff"], z["scores"]
    offsets = pair_offsets(RADIUS)
    if method == "ours":  # warm-up on a tiny input (first-call dispatch), not counted
        random_walk(scores[:, :8, :8], aff[:, :8, :8], offsets, BETA, 1)
    base = _reset_peak()
    t0 = time.perf_counter()
    if method == "ours":
        logt = LOGT if squarings is None else squarings
        res = random_walk(scores, aff, offsets, BETA, logt)
        parts = {}
    else:
        import numpy as _np

        from pipeline.refine.random_walk import dense_transition

        tb = time.perf_counter()
        t = dense_transition(aff, offsets, BETA)
        build = time.perf_counter() - tb
        sq_times = []
        for _ in range(LOGT if squarings is None else squarings):
            ts = time.perf_counter()
            t = t @ t
            sq_times.append(time.perf_counter() - ts)
        tp = time.perf_counter()
        c = scores.shape[0]
        res = (t @ scores.reshape(c, -1).T).T.reshape(scores.shape)
        parts = {"build": build, "squaring": float(_np.median(sq_times)), "product": time.perf_counter() - tp,
                 "n_squarings": len(sq_times)}
        del t
    dt = time.perf_counter() - t0
    np.save(out, res)
    q.put({"seconds": dt, "peak_mb": _peak_mb() - base, **parts})


def run_in_child(method, inputs, squarings=None):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    out = inputs.replace(".npz", f"_{method}_{squarings}.npy")
    p = ctx.Process(target=_child, args=(method, inputs, out, squarings, q))
    p.start()
    res = q.get()
    p.join()
    res["result"] = np.load(out)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--strides", type=int, nargs="+", default=[8, 4])
    ap.add_argument("--dense-squarings-s4", type=int, default=1, help="squarings timed for the dense reference at stride 4")
    ap.add_argument("--full-dense-s4", action="store_true", help="run all 8 dense squarings at stride 4 (minutes, ~2 GB)")
    args = ap.parse_args()
    import torch

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f}; torch threads {torch.get_num_threads()}; numpy BLAS threads default\n")
    rows = []
    tmp = tempfile.mkdtemp(prefix="bench_rw_")
    for stride in args.strides:
        image, aff, scores = synthetic_inputs(stride)
        inputs = os.path.join(tmp, f"s{stride}.npz")
        np.savez(inputs, aff=aff, scores=scores)
        n = aff.shape[1] * aff.shape[2]
        ours = run_in_child("ours", inputs)
        full = stride != 4 or args.full_dense_s4
        dense = run_in_child("dense", inputs, None if full else args.dense_squarings_s4)
        if full:
            dense_s, note = dense["seconds"], "measured"
            agree = float((ours["result"].argmax(0) == dense["result"].argmax(0)).mean())
            agree_note = f"t = 2^{LOGT}"
        else:
            dense_s = dense["build"] + LOGT * dense["squaring"] + dense["product"]
            note = f"extrapolated from {dense['n_squarings']} squaring(s) of {dense['squaring']:.1f} s"
            k = dense["n_squarings"]
            short = run_in_child("ours", inputs, k)
            agree = float((short["result"].argmax(0) == dense["result"].argmax(0)).mean())
            agree_note = f"t = 2^{k} (both)"
        rows.append((stride, n, dense_s, note, dense["peak_mb"], ours["seconds"], ours["peak_mb"], agree, agree_note))
    print("| stride | grid cells N | dense N×N squaring (s) | dense peak RSS (MB) | ours, stencil (s) | ours peak RSS (MB) "
          "| speed-up | argmax agreement |")
    print("|---|---|---|---|---|---|---|---|")
    for stride, n, ds, note, dm, os_, om, agree, an in rows:
        print(f"| {stride} | {n} | {ds:.2f} ({note}) | {dm:.0f} | {os_:.3f} | {om:.1f} | {ds / os_:.0f}× | "
              f"{100 * agree:.3f}% ({an}) |")
    print(f"\n500×375 image, radius {RADIUS} (69-entry stencil), beta {BETA}, logt {LOGT}, 4 channels. "
          "Peak RSS is the growth over the process's state after loading the inputs.")


if __name__ == "__main__":
    main()

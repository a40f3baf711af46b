"""CRF seeds: our CRF wrapper vs a direct pydensecrf call, and dask throughput with 1 vs 2 workers.

    python bench/bench_crf.py [--repeats 5] [--images 16]

1. Per image at 500x375, 3 labels (background + 2 classes), AffinityNet settings (10 iterations):
   ``crf_marginals`` (ours) against the plain pydensecrf sequence (DenseCRF2D, unary_from_softmax,
   addPairwiseGaussian, addPairwiseBilateral, inference) on the same scores, median of --repeats;
   also a whole AffinityNet seed (two CRFs + CAM upsampling + labels) against two direct calls.
2. Throughput of the seed maker through ``dask_client("local", n)`` over --images demo images of
   375-500 px, n = 1 and 2 worker processes (cluster start-up and a warm-up map excluded).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CRF = {"enabled": True, "mode": "affinitynet", "iterations": 10, "gaussian_sxy": 3.0, "gaussian_compat": 3.0,
       "bilateral_sxy": 80.0, "bilateral_srgb": 13.0, "bilateral_compat": 10.0, "alpha_fg": 4.0, "alpha_bg": 32.0,
       "fg_threshold": 0.3, "bg_threshold": 0.05, "gt_prob": 0.7, "scale": 1.0, "merge": "published",
       "thresholds": "fixed", "fg_ratio": 2.0, "bg_ratio": 0.33}


def direct_crf(image, probs, iterations=10):
    """The reference: pydensecrf called directly, as the published code does."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    h, w = image.shape[:2]
    n = probs.shape[0]
    d = dcrf.DenseCRF2D(w, h, n)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    d.addPairwiseGaussian(sxy=3, compat=3)
    d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=np.ascontiguousarray(image), compat=10)
    return np.array(d.inference(iterations)).reshape(n, h, w)


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def single_image(repeats: int):
    import cv2

    from pipeline.labels import grid_to_image, with_background
    from pipeline.refine.crf import CrfSettings, crf_marginals
    from pipeline.refine.seeds import seeds_for_image

    rng = np.random.default_rng(0)
    h, w = 375, 500
    image = np.clip(rng.normal(110, 25, (h, w, 3)), 0, 255).astype(np.uint8)
    cv2.circle(image, (180, 190), 90, (200, 60, 60), -1)
    cv2.rectangle(image, (300, 80), (460, 300), (60, 60, 200), -1)
    grid = np.zeros((2, -(-h // 4), -(-w // 4)), np.float32)
    cv2.circle(grid[0], (45, 47), 18, 1.0, -1)
    cv2.rectangle(grid[1], (80, 25), (110, 70), 1.0, -1)
    grid = np.stack([cv2.GaussianBlur(g, (0, 0), 6) for g in grid])
    grid /= grid.max(axis=(1, 2), keepdims=True)
    cams = grid_to_image(grid, (h, w), 4)
    probs = with_background(cams, 4.0)
    settings = CrfSettings.from_params(CRF)
    q_ours, q_ref = crf_marginals(image, probs, settings), direct_crf(image, probs)
    agree = float((q_ours.argmax(0) == q_ref.argmax(0)).mean())
    t_ref = median_time(lambda: direct_crf(image, probs), repeats)
    t_ours = median_time(lambda: crf_marginals(image, probs, settings), repeats)
    t_seed_ref = median_time(lambda: (direct_crf(image, with_background(cams, 4.0)),
                                      direct_crf(image, with_background(cams, 32.0))), repeats)
    t_seed = median_time(lambda: seeds_for_image(image, grid, 4, [1, 2], CRF), repeats)
    half = CrfSettings.from_params(dict(CRF, scale=0.5))
    t_half = median_time(lambda: crf_marginals(image, probs, half), repeats)
    agree_half = float((crf_marginals(image, probs, half).argmax(0) == q_ref.argmax(0)).mean())
    print("| per image, 500×375, 3 labels, 10 it. | direct pydensecrf (s) | ours (s) | overhead | argmax agreement |")
    print("|---|---|---|---|---|")
    print(f"| one CRF (`crf_marginals`) | {t_ref:.3f} | {t_ours:.3f} | {100 * (t_ours / t_ref - 1):+.1f}% | {100 * agree:.2f}% |")
    print(f"| AffinityNet seed (2 CRFs + CAM upsampling + labels) | {t_seed_ref:.3f} | {t_seed:.3f} | "
          f"{100 * (t_seed / t_seed_ref - 1):+.1f}% | |")
    print(f"| one CRF at `crf.scale: 0.5` | {t_ref:.3f} | {t_half:.3f} | {100 * (t_half / t_ref - 1):+.1f}% | "
          f"{100 * agree_half:.2f}% |")


def throughput(n_images: int):
    from pipeline.compute import dask_client
    from pipeline.datasets import PreparedData
    from pipeline.refine.seeds import SeedTask, make_seed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test fixtures make the tiny demo
    from synthetic import tiny_demo, write_fake_cams

    root = Path(tempfile.mkdtemp(prefix="bench_crf_"))
    params, prepared_dir = tiny_demo(root, num_train=n_images, num_val=1, side=(375, 500))
    prepared = PreparedData(params["data"], prepared_dir)
    ids = prepared.ids("train")
    cams = write_fake_cams(prepared, ids, root / "cams.zarr", stride=4)
    tasks = [SeedTask(i, str(prepared_dir), params["data"], str(cams), CRF) for i in ids]
    rates = {}
    for workers in (1, 2):
        with dask_client("local", workers) as run:
            run(make_seed, tasks[:workers])  # warm-up: imports, opened stores
            t = time.perf_counter()
            run(make_seed, tasks)
            rates[workers] = len(tasks) / (time.perf_counter() - t)
    print(f"\n| dask LocalCluster, {len(tasks)} images 375–500 px, AffinityNet seeds | images/s |")
    print("|---|---|")
    for k, v in rates.items():
        print(f"| {k} worker{'s' if k > 1 else ''} | {v:.2f} |")
    print(f"| scaling 2 vs 1 | {rates[2] / rates[1]:.2f}× |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--images", type=int, default=16)
    args = ap.parse_args()
    print(f"{os.cpu_count()} CPUs, load average before: {os.getloadavg()[0]:.2f}\n")
    single_image(args.repeats)
    throughput(args.images)
    print(f"\nload average after: {os.getloadavg()[0]:.2f} (other processes share this machine)")


if __name__ == "__main__":
    main()

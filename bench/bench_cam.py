"""Benchmark: multi-scale + flip CAM inference, ours vs the straightforward loop.

Reference = one image at a time, each scale and its flip as separate forward passes under
torch.no_grad (the usual research code). Ours = pipeline.cam.compute_cams: images of one size
batched, each scale with its flip in one pass, torch.inference_mode, BatchNorm folded into the
convs, channels_last, a DataLoader worker decoding/rescaling ahead; bf16 autocast where asked
(the default on CUDA). Same model (ResNet-50, output stride 16, random init), same inputs
(500×375). Maps must agree within 1e-3 (max abs diff) in fp32.

    python bench/bench_cam.py [--images 3] [--scales 1.0,0.5,1.5,2.0] [--threads 2] [--no-bf16]

Each variant runs in its own process so its peak RSS is its own. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NUM_CLASSES = 20


def make_inputs(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        # smooth random colour fields + noise: a 500×375 image (W×H) with structure at several scales
        small = rng.integers(0, 256, (12, 16, 3)).astype(np.uint8)
        import cv2

        im = cv2.resize(small, (500, 375), interpolation=cv2.INTER_CUBIC).astype(np.int16)
        im = np.clip(im + rng.integers(-20, 21, im.shape), 0, 255).astype(np.uint8)
        images.append(im)
    labels = []
    for _ in range(n):
        v = np.zeros(NUM_CLASSES, np.float32)
        v[rng.choice(NUM_CLASSES, size=int(rng.integers(1, 4)), replace=False)] = 1
        labels.append(v)
    return images, labels


def build_model():
    import torch

    from pipeline.models.classifier import build_classifier

    torch.manual_seed(0)
    return build_classifier("resnet50", "none", NUM_CLASSES).eval()


def reference(model, images, labels, scales, stride):
    """The straightforward loop: per image, per scale, per flip, one forward pass."""
    import cv2
    import torch

    from pipeline.augment import normalise
    from pipeline.cam.infer import normalise_cams, sample_to_grid, scaled_size

    out = []
    for image, lab in zip(images, labels):
        size = image.shape[:2]
        total = None
        for s in scales:
            h, w = scaled_size(size, s)
            im = image if (h, w) == size else cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
            x = normalise(im)[None]
            for flip in (False, True):
                with torch.no_grad():
                    maps = model.cam(model.features(x.flip(-1) if flip else x))[0]
                part = sample_to_grid(maps, size, (h, w), model.stride, stride, flip)
                total = part if total is None else total + part
        out.append(normalise_cams(total, torch.as_tensor(lab > 0)).numpy())
    return out


def ours(model, images, labels, scales, stride, dtype):
    from pipeline.cam import CamInference, build_method, compute_cams

    inf = CamInference(build_method("cam", model), scales, True, stride, "cpu" if dtype != "cuda" else "cuda",
                       dtype=dtype if dtype != "cuda" else "auto")
    keys = list(range(len(images)))
    res = compute_cams(inf, lambda k: images[k], keys, [im.shape[:2] for im in images], labels, num_workers=1,
                       max_batch=8)
    return [res[k][0] for k in keys]


def run_variant(variant: str, args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    scales = [float(s) for s in args.scales.split(",")]
    images, labels = make_inputs(args.images)
    model = build_model()
    if variant.startswith("ours"):
        dtype = {"ours_fp32": "float32", "ours_bf16": "bfloat16"}[variant]
        fn = lambda: ours(model, images, labels, scales, args.stride, dtype)  # noqa: E731
    else:
        fn = lambda: reference(model, images, labels, scales, args.stride)  # noqa: E731
    warm_images, warm_labels = images[:1], labels[:1]
    if variant.startswith("ours"):
        ours(model, warm_images, warm_labels, [scales[0]], args.stride, dtype)
    else:
        reference(model, warm_images, warm_labels, [scales[0]], args.stride)
    t0 = time.perf_counter()
    maps = fn()
    dt = time.perf_counter() - t0
    np.savez(args.dump, *maps)
    return {"seconds": dt, "images_per_s": len(images) / dt,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--scales", default="1.0,0.5,1.5,2.0")
    ap.add_argument("--stride", type=int, default=4)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--no-bf16", dest="bf16", action="store_false", help="skip the bf16 row")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--dump", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args)))
        return
    variants = ["reference", "ours_fp32"] + (["ours_bf16"] if args.bf16 else [])
    results, maps = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for v in variants:
            dump = Path(tmp) / f"{v}.npz"
            cmd = [sys.executable, __file__, "--variant", v, "--dump", str(dump), "--images", str(args.images),
                   "--scales", args.scales, "--stride", str(args.stride), "--threads", str(args.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=dict(os.environ, TQDM_DISABLE="1"))
            results[v] = json.loads(out.stdout.strip().splitlines()[-1])
            with np.load(dump) as z:
                maps[v] = [z[k] for k in sorted(z.files, key=lambda s: int(s.split("_")[1]))]
    ref = results["reference"]
    print(f"\nCAM inference, ResNet-50 OS16 (random init), {args.images} images 500×375, scales {args.scales} + flip, "
          f"stride {args.stride}, {args.threads} CPU threads\n")
    print("| variant | images/s | s/image | speed-up | peak RSS (MB) | max abs diff vs reference |")
    print("|---|---|---|---|---|---|")
    for v in variants:
        r = results[v]
        diff = max(float(np.abs(a.astype(np.float64) - b).max()) for a, b in zip(maps[v], maps["reference"]))
        print(f"| {v} | {r['images_per_s']:.3f} | {r['seconds'] / args.images:.2f} | "
              f"{r['images_per_s'] / ref['images_per_s']:.2f}× | {r['peak_rss_mb']:.0f} | {diff:.2e} |")


if __name__ == "__main__":
    main()

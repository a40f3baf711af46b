"""Benchmark: multi-scale + flip CAM inference, ours vs IRNet's make_cam loop, built independently.

    python bench/bench_cam.py [--backbone efficientnet_lite0] [--weights imagenet] [--images 8]
                              [--scales 1.0,0.5,1.5,2.0] [--repeats 5] [--threads 2]
                              [--variants reference,ours_fp32,ours_bf16]

Reference (written here, sharing no code with ``pipeline.cam``): IRNet's make_cam loop. Per
image, per scale: resize (cv2 bilinear, round(size x scale)), ImageNet-normalise, forward the
stack [image, flipped image] through the backbone under ``torch.no_grad`` (the model as built:
NCHW, BatchNorm unfused), CAM = conv2d(features, classifier weight). Two merges of the same
forward outputs:

* ``irnet`` (timed: what the loop costs): ReLU per pass, flip the flipped pass back, sum the two,
  F.interpolate the whole map to (ceil(H/4), ceil(W/4)), sum over scales, keep the labelled
  classes, divide each by its max + 1e-5. IRNet's own definition; it differs from ours by design
  (ReLU before the sum, a map resize that ignores the padded cells and the flip's shift, +1e-5),
  so its difference to ours is printed for information only.
* ``aligned`` (untimed, from the stored raw maps): our documented definition, coded again here
  with interpolation matrices instead of grid_sample: each pass's raw map sampled bilinearly (border
  clamp) at the centres of the stride-4 cells, the flipped pass through mirrored coordinates, summed
  over flips and scales, ReLU, labelled classes divided by their max. Ours must agree with it to
  1e-4 (max abs diff) in fp32: a merge error in ours shows here.

Ours: ``pipeline.cam.compute_cams`` as the make_cam stage calls it (one DataLoader worker, batches
of equal-size images), with a ``CamInference`` built once per run as the stage does (untimed; its
setup time is printed). ``ours_fp32``: the default (on the CPU: one image and its flip per pass,
BatchNorm folded, stride-1 'SAME' paddings made static, channels_last, glibc malloc told to keep
freed memory). ``ours_bf16``: ``cam.infer_dtype: bfloat16`` (CPU autocast). Optional rows that
split the gain: ``ours_fp32_before`` runs an earlier copy of pipeline/cam/infer.py given with
--before (for commit 944c4e4: batches of 8, no folding for EfficientNet-Lite0 as its fx tracing
failed, default malloc) and ``reference_malloc`` the IRNet loop with the malloc setting ours makes.

Every variant runs in its own process with the same ``torch.set_num_threads``: one untimed
warm-up over the first image (all scales), then --repeats timed passes over all images; seconds
per image min / median / max and the load average before / after each pass. Peak memory: the sum
of the PSS of the process and all its children (DataLoader workers), sampled every 20 ms with
psutil (see PeakRss); the process's own getrusage maxrss in brackets.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NUM_CLASSES = 20
STORED_STRIDE = 4
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32) * 255


def make_inputs(n: int, seed: int = 0):
    """n photo-sized (375, 500, 3) uint8 images (smooth colour fields + noise) and their label vectors."""
    import cv2

    rng = np.random.default_rng(seed)
    images, labels = [], []
    for _ in range(n):
        small = rng.integers(0, 256, (12, 16, 3)).astype(np.uint8)
        im = cv2.resize(small, (500, 375), interpolation=cv2.INTER_CUBIC).astype(np.int16)
        images.append(np.clip(im + rng.integers(-20, 21, im.shape), 0, 255).astype(np.uint8))
    for _ in range(n):
        v = np.zeros(NUM_CLASSES, np.float32)
        v[rng.choice(NUM_CLASSES, size=int(rng.integers(1, 4)), replace=False)] = 1
        labels.append(v)
    return images, labels


def build_model(backbone: str, weights: str):
    import torch

    from pipeline.models.classifier import build_classifier

    torch.manual_seed(0)
    return build_classifier(backbone, weights, NUM_CLASSES).eval()


# ------------------------------------------------------------------ reference: IRNet's make_cam loop

def irnet_input(image: np.ndarray, scale: float):
    """(2, 3, h', w'): the rescaled, normalised image and its mirror image (IRNet's per-scale stack)."""
    import cv2
    import torch

    h, w = image.shape[:2]
    sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
    im = image if (sh, sw) == (h, w) else cv2.resize(image, (sw, sh), interpolation=cv2.INTER_LINEAR)
    x = torch.from_numpy(((im.astype(np.float32) - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1).copy())
    return torch.stack([x, x.flip(-1)])


def irnet_merge(passes, size, labels):
    """IRNet: relu, flip back, sum, resize to the stride-4 size, sum over scales, max + 1e-5."""
    import torch
    import torch.nn.functional as F

    strided = (math.ceil(size[0] / STORED_STRIDE), math.ceil(size[1] / STORED_STRIDE))
    total = 0
    for raw in passes:  # raw: (2, K, fh, fw)
        o = F.relu(raw)
        o = o[0] + o[1].flip(-1)
        total = total + F.interpolate(o[None], strided, mode="bilinear", align_corners=False)[0]
    out = torch.zeros_like(total)
    valid = torch.nonzero(torch.as_tensor(labels))[:, 0]
    cam = total[valid]
    out[valid] = cam / (F.adaptive_max_pool2d(cam, (1, 1)) + 1e-5)
    return out


def centre_weights(n_out: int, out_len: float, in_len: int, feat_len: int, feat_stride: int, mirror: bool):
    """(n_out, feat_len) bilinear weights reading a feature axis at the stored cells' centres."""
    w = np.zeros((n_out, feat_len), np.float64)
    for j in range(n_out):
        pos = (j + 0.5) * STORED_STRIDE * in_len / out_len  # cell centre in input pixels
        if mirror:
            pos = in_len - pos
        u = min(max(pos / feat_stride - 0.5, 0.0), feat_len - 1.0)  # feature cell i is centred at (i + 0.5) * os
        i0 = int(math.floor(u))
        i1 = min(i0 + 1, feat_len - 1)
        w[j, i0] += 1.0 - (u - i0)
        w[j, i1] += u - i0
    return w


def aligned_merge(passes, inputs_hw, size, labels, feat_stride: int):
    """Our definition, coded independently: sample each raw pass at the stored cell centres, sum, relu, /max."""
    gh, gw = math.ceil(size[0] / STORED_STRIDE), math.ceil(size[1] / STORED_STRIDE)
    total = np.zeros((NUM_CLASSES, gh, gw), np.float64)
    for raw, (ih, iw) in zip(passes, inputs_hw):
        raw = raw.double().numpy()
        fh, fw = raw.shape[-2:]
        ry = centre_weights(gh, size[0], ih, fh, feat_stride, False)
        for flip in (0, 1):
            rx = centre_weights(gw, size[1], iw, fw, feat_stride, bool(flip))
            total += np.einsum("jy,kyx,ix->kji", ry, raw[flip], rx)
    cam = np.maximum(total, 0) * (np.asarray(labels) > 0)[:, None, None]
    peak = cam.reshape(len(cam), -1).max(1)
    return np.where(peak[:, None, None] > 0, cam / np.where(peak > 0, peak, 1)[:, None, None], 0).astype(np.float32)


def reference(model, images, labels, scales, keep_raw: list | None = None):
    """IRNet's loop. Returns the irnet-merged maps; appends (raw passes, input sizes) per image to keep_raw."""
    import torch
    import torch.nn.functional as F

    weight = model.classifier.weight
    out = []
    for image, lab in zip(images, labels):
        passes, sizes = [], []
        for s in scales:
            x = irnet_input(image, s)
            with torch.no_grad():
                passes.append(F.conv2d(model.features(x), weight))
            sizes.append(tuple(x.shape[-2:]))
        out.append(irnet_merge(passes, image.shape[:2], lab).numpy())
        if keep_raw is not None:
            keep_raw.append((passes, sizes))
    return out


# ------------------------------------------------------------------ ours

OURS = {"ours_fp32": "float32", "ours_bf16": "bfloat16", "ours_fp32_before": "float32"}


def infer_module(variant: str, before: str | None):
    """pipeline.cam.infer, or for ours_fp32_before an earlier copy of it loaded from the file ``before``."""
    if variant != "ours_fp32_before":
        import pipeline.cam.infer as mod

        return mod
    if not before:
        raise SystemExit("ours_fp32_before needs --before FILE (e.g. git show 944c4e4:pipeline/cam/infer.py > FILE)")
    import importlib.util

    spec = importlib.util.spec_from_file_location("infer_before", before)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def ours_inference(mod, model, scales, dtype: str):
    """Built once per run, as the make_cam stage does (model copy, BatchNorm folding, static paddings)."""
    from pipeline.cam import build_method

    return mod.CamInference(build_method("cam", model), scales, True, STORED_STRIDE, "cpu", dtype=dtype)


def glibc_keep_freed_memory() -> bool:
    """The allocator setting ours makes (mallopt M_MMAP_THRESHOLD 1 GiB, M_TRIM_THRESHOLD 2 GiB), for the
    reference_malloc row: how much of the gap is the allocator alone."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    return bool(libc.mallopt(-3, 1 << 30)) and bool(libc.mallopt(-1, (1 << 31) - 1))


def ours(mod, inference, images, labels, workers: int, max_batch: int):
    keys = list(range(len(images)))
    res = mod.compute_cams(inference, lambda k: images[k], keys, [im.shape[:2] for im in images], labels,
                       num_workers=workers, max_batch=max_batch)
    return [res[k][0] for k in keys]


# ------------------------------------------------------------------ measurement

class PeakRss:
    """Peak of (memory of this process + of all its children, the DataLoader workers), sampled every 20 ms
    in a thread. With psutil: PSS (proportional set size: a page shared by a forked worker and its parent
    counts half in each, so the sum is the memory really used; RSS would count it twice). Without psutil:
    getrusage maxrss of self + the largest child (an upper bound)."""

    def __init__(self):
        try:
            import psutil

            self.proc = psutil.Process()
            self.proc.memory_full_info()
            self.how = "psutil: sum of the PSS of the process and its children (DataLoader workers), sampled every 20 ms"
        except Exception:  # no psutil, or no /proc/<pid>/smaps to read PSS from
            self.proc = None
            self.how = "getrusage maxrss: self + largest child (upper bound)"
        self.peak = 0.0
        self._stop = threading.Event()

    def _sample(self):
        total = self.proc.memory_full_info().pss
        for c in self.proc.children(recursive=True):
            try:
                total += c.memory_full_info().pss
            except Exception:  # the worker exited between the listing and the read
                pass
        self.peak = max(self.peak, total / 2 ** 20)

    def _loop(self):
        while not self._stop.wait(0.02):
            self._sample()

    def __enter__(self):
        if self.proc is not None:
            self._sample()
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.proc is not None:
            self._stop.set()
            self._thread.join()
            self._sample()
        else:
            self.peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                         + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024


def run_variant(variant: str, args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    scales = [float(s) for s in args.scales.split(",")]
    images, labels = make_inputs(args.images)
    model = build_model(args.backbone, args.weights)
    setup = 0.0
    if variant.startswith("reference"):
        if variant == "reference_malloc" and not glibc_keep_freed_memory():
            raise SystemExit("reference_malloc: mallopt failed (not glibc?)")
        fn = lambda ims, labs, raw=None: reference(model, ims, labs, scales, raw)  # noqa: E731
    else:
        t0 = time.perf_counter()
        mod = infer_module(variant, args.before)
        inference = ours_inference(mod, model, scales, OURS[variant])
        setup = time.perf_counter() - t0
        fn = lambda ims, labs, raw=None: ours(mod, inference, ims, labs, args.workers, args.max_batch)  # noqa: E731
    runs = []
    with PeakRss() as rss:
        fn(images[:1], labels[:1])  # warm-up: every input shape of the first image
        maps = raw = None
        for _ in range(args.repeats):
            raw = [] if variant.startswith("reference") else None
            load0 = os.getloadavg()[0]
            t0 = time.perf_counter()
            maps = fn(images, labels, raw)
            dt = time.perf_counter() - t0
            runs.append({"s_per_image": dt / len(images), "load_before": load0, "load_after": os.getloadavg()[0]})
            print(f"  {variant}: {dt / len(images):.3f} s/image, load {load0:.2f} -> {runs[-1]['load_after']:.2f}",
                  file=sys.stderr, flush=True)
    arrays = {f"m{i}": m for i, m in enumerate(maps)}
    if variant.startswith("reference"):
        feat_stride = int(model.stride)
        for i, ((passes, sizes), im, lab) in enumerate(zip(raw, images, labels)):
            arrays[f"a{i}"] = aligned_merge(passes, sizes, im.shape[:2], lab, feat_stride)
    np.savez(args.dump, **arrays)
    return {"runs": runs, "peak_rss_mb": rss.peak, "rss_how": rss.how, "threads": torch.get_num_threads(),
            "setup_s": setup, "self_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def cpu_flags() -> str:
    try:
        flags = set()
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags |= set(line.split(":", 1)[1].split())
        model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                      if ln.startswith("model name")), "?")
    except OSError:
        return "unknown (no /proc/cpuinfo)"
    want = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
    return f"{model}; " + ", ".join(f"{f} {'yes' if f in flags else 'NO'}" for f in want)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--weights", default="imagenet", help="imagenet (offline package), none (random init) or a path")
    ap.add_argument("--images", type=int, default=8, help="images per pass (one make_cam shard of the photos preset)")
    ap.add_argument("--scales", default="1.0,0.5,1.5,2.0")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--workers", type=int, default=1, help="ours: DataLoader workers (cam.num_workers)")
    ap.add_argument("--max-batch", type=int, default=8, help="ours: cam.infer_batch")
    ap.add_argument("--variants", default="reference,ours_fp32,ours_bf16",
                    help=f"reference first; others: reference_malloc, {', '.join(OURS)}")
    ap.add_argument("--before", help="ours_fp32_before: a copy of an earlier pipeline/cam/infer.py")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--dump", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args)))
        return
    import torch

    variants = args.variants.split(",")
    if variants[0] != "reference":
        ap.error("--variants must start with reference")
    print(f"CPU: {cpu_flags()}; torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"torch.set_num_threads({args.threads}) in every variant; load average at start "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    results, maps = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for v in variants:
            dump = Path(tmp) / f"{v}.npz"
            cmd = [sys.executable, __file__, "--variant", v, "--dump", str(dump)]
            for k in ("backbone", "weights", "images", "scales", "repeats", "threads", "workers", "max_batch", "before"):
                if getattr(args, k) is not None:
                    cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
            out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, env=dict(os.environ, TQDM_DISABLE="1"))
            results[v] = json.loads(out.stdout.strip().splitlines()[-1])
            with np.load(dump) as z:
                maps[v] = {k: z[k] for k in z.files}
    ref = maps["reference"]
    n = args.images
    med_ref = statistics.median(r["s_per_image"] for r in results["reference"]["runs"])
    print(f"\nCAM inference, {args.backbone} (weights {args.weights}, classifier random), {n} images 500×375, scales "
          f"{args.scales} + flip, stored at stride {STORED_STRIDE}; {args.repeats} timed passes over all images each\n")
    print("| variant | s/image min / median / max | speed-up (median) | setup s (once) | peak memory MB (own maxrss) "
          "| max abs diff vs aligned ref. | max abs diff vs IRNet merge | load before → after (range) | threads |")
    print("|---|---|---|---|---|---|---|---|---|")
    for v in variants:
        r = results[v]
        s = [x["s_per_image"] for x in r["runs"]]
        loads = [x["load_before"] for x in r["runs"]] + [x["load_after"] for x in r["runs"]]
        if v.startswith("reference"):  # its maps are the IRNet merge; the aligned merge is its own check below
            d_al, d_ir = "—", "—"
        else:
            d_al = f"{max(float(np.abs(maps[v][f'm{i}'].astype(np.float64) - ref[f'a{i}']).max()) for i in range(n)):.1e}"
            d_ir = f"{max(float(np.abs(maps[v][f'm{i}'].astype(np.float64) - ref[f'm{i}']).max()) for i in range(n)):.1e}"
        print(f"| {v} | {min(s):.3f} / {statistics.median(s):.3f} / {max(s):.3f} | {med_ref / statistics.median(s):.2f}× | "
              f"{r['setup_s']:.2f} | {r['peak_rss_mb']:.0f} ({r['self_maxrss_mb']:.0f}) | {d_al} | {d_ir} | "
              f"{min(loads):.2f}–{max(loads):.2f} | {r['threads']} |")
    print(f"\nreference 'irnet' merge vs its own 'aligned' merge (same forward outputs): max abs diff "
          f"{max(float(np.abs(ref[f'm{i}'] - ref[f'a{i}']).max()) for i in range(n)):.1e}, mean "
          f"{np.mean([float(np.abs(ref[f'm{i}'] - ref[f'a{i}']).mean()) for i in range(n)]):.1e}")
    print(f"peak RSS: {results['reference']['rss_how']}; load average at end "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()

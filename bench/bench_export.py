"""Export throughput and mask storage: our formats against a plain folder of PNGs.

    python bench/bench_export.py [--store data/pseudo.zarr] [--prepared data/prepared] [--repeat 3]

Without a pseudo store (``data/pseudo.zarr`` missing) it builds one from the prepared GT with
3-px unsure (255) boundaries, so the masks look like refined pseudo masks.
Prints two markdown tables:
1. export: images/s and bytes per image of voc / coco / zarr (``run_export``) against writing the
   same masks as a folder of plain grayscale PNGs with OpenCV (the reference);
2. storage: size on disk and per-image random read time of the zarr mask store against the PNG folder.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import load_params  # noqa: E402
from pipeline.datasets import PreparedData  # noqa: E402
from pipeline.export import iter_store_masks, run_export  # noqa: E402
from pipeline.labels import IGNORE_INDEX  # noqa: E402
from pipeline.store import ArraySpec, Store, write_store  # noqa: E402


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def synthetic_pseudo(prepared: PreparedData, split: str, path: Path) -> Path:
    ids = prepared.ids(split)

    def compute(idx):
        out = []
        for i in idx:
            g = prepared.gt(ids[i]).copy()
            g[cv2.morphologyEx(g, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0] = IGNORE_INDEX
            out.append(g)
        return {"mask": out}

    return write_store(path, ids, prepared.sizes(ids), {"mask": ArraySpec("uint8", fill=IGNORE_INDEX)},
                       {"class_names": prepared.class_names, "split": split, "method": "gt_unsure_edges"}, compute,
                       progress="synthetic pseudo")


def png_folder_export(store: Store, out: Path) -> None:
    out.mkdir(parents=True)
    for i, image_id in enumerate(store.ids):
        cv2.imwrite(str(out / f"{image_id}.png"), store.read("mask", i))


def median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default="data/pseudo.zarr")
    ap.add_argument("--prepared", default="data/prepared")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--reads", type=int, default=200, help="random per-image reads for the storage table")
    args = ap.parse_args()
    params = load_params(args.params)
    prepared = PreparedData(params["data"], args.prepared)
    work = Path(tempfile.mkdtemp(prefix="bench_export_"))
    try:
        store_path = Path(args.store)
        source = str(store_path)
        if not store_path.exists():
            store_path = synthetic_pseudo(prepared, params["data"]["train_split"], work / "pseudo.zarr")
            source = "synthetic (prepared GT with 3-px unsure edges)"
        store = Store(store_path)
        n = len(store)
        h, w = np.median(store.sizes, 0).astype(int)
        print(f"\n{n} masks, median size {w}x{h}, source: {source}\n")

        def ours(fmt):
            k = [0]

            def run():
                k[0] += 1
                run_export(store_path, args.prepared, params["data"], [fmt], work / f"{fmt}{k[0]}", params=params,
                           lock_path=work / "no.lock", progress=False)
            return run

        k = [0]

        def ref():
            k[0] += 1
            png_folder_export(store, work / f"png{k[0]}")

        t_ref = median_time(ref, args.repeat)
        b_ref = folder_bytes(work / "png1")
        print("| export | images/s | bytes/image | time vs PNG folder | size vs PNG folder |")
        print("|---|---|---|---|---|")
        print(f"| PNG folder, cv2.imwrite (reference) | {n / t_ref:.0f} | {b_ref / n:.0f} | 1.00 | 1.00 |")
        for fmt in ("voc", "coco", "zarr"):
            t = median_time(ours(fmt), args.repeat)
            b = folder_bytes(work / f"{fmt}1")
            print(f"| {fmt} (+ manifest, README, validation, GT scoring) | {n / t:.0f} | {b / n:.0f} | {t / t_ref:.2f} | "
                  f"{b / b_ref:.2f} |")

        # storage: bytes and random single-image reads
        rng = np.random.default_rng(0)
        order = rng.integers(0, n, args.reads)
        png_dir = work / "png1"

        def read_store():
            s = Store(store_path)
            for i in order:
                s.read("mask", int(i))

        def read_png():
            for i in order:
                cv2.imread(str(png_dir / f"{store.ids[int(i)]}.png"), cv2.IMREAD_UNCHANGED)

        # correctness: both hold the same masks
        for i in order[:20]:
            a = cv2.imread(str(png_dir / f"{store.ids[int(i)]}.png"), cv2.IMREAD_UNCHANGED)
            assert np.array_equal(a, store.read("mask", int(i)))
        def scan_store():
            for _ in iter_store_masks(Store(store_path)):
                pass

        def scan_png():
            for image_id in store.ids:
                cv2.imread(str(png_dir / f"{image_id}.png"), cv2.IMREAD_UNCHANGED)

        t_scan_s = median_time(scan_store, args.repeat) / n
        t_scan_p = median_time(scan_png, args.repeat) / n
        t_s = median_time(read_store, args.repeat) / args.reads
        t_p = median_time(read_png, args.repeat) / args.reads
        b_s = folder_bytes(store_path)
        files_s = sum(1 for f in store_path.rglob("*") if f.is_file())
        print()
        print("| storage | bytes/image | files | ms/image, random reads | ms/image, full scan | size vs PNG | "
              "random read vs PNG | scan vs PNG |")
        print("|---|---|---|---|---|---|---|---|")
        print(f"| PNG folder (reference) | {b_ref / n:.0f} | {n} | {1000 * t_p:.3f} | {1000 * t_scan_p:.3f} | 1.00 | 1.00 | 1.00 |")
        print(f"| zarr mask store (scan = shard blocks) | {b_s / n:.0f} | {files_s} | {1000 * t_s:.3f} | {1000 * t_scan_s:.3f} | "
              f"{b_s / b_ref:.2f} | {t_s / t_p:.2f} | {t_scan_s / t_scan_p:.2f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

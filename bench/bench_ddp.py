"""Distributed training on this CPU: train_cam with 1 process x T threads against P processes x T/P
threads (the same total threads, the same global batch and data), several runs each.

    python bench/bench_ddp.py [--runs 3] [--epochs 2] [--threads 2] [--procs 2] [--images 320]

Both sides run the stage itself (``python -m stages.train_cam``) in a workspace prepared once from
the demo preset; samples/s is the training loop's own figure (images of every rank per second of the
epoch, the first epoch left out as warm-up) and the stage's wall time is printed beside it. Prints
min / median / max per side, the ratio of the medians, and the machine's load before and after."""
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_stage(work: Path, params: dict, stage: str) -> float:
    from pipeline.config import render_params

    (work / "params.yaml").write_text(render_params(params))
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=work, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    from pipeline.presets import preset

    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="total torch threads on each side")
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--images", type=int, default=320, help="demo training images")
    ap.add_argument("--freeze-bn", action="store_true", help="cam.freeze_bn: BatchNorm statistics fixed, so no "
                    "BatchNorm all-reduce per layer (what that synchronisation costs)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-ddp-"))
    base = preset("demo")
    base["data"]["demo_num_train"] = args.images
    base["cam"].update(epochs=args.epochs, num_workers=0, freeze_bn=args.freeze_bn)
    run_stage(work, base, "prepare")
    sides = {f"1 process x {args.threads} threads": (1, args.threads),
             f"{args.procs} processes x {args.threads // args.procs} threads": (args.procs, args.threads // args.procs)}
    print(f"load before: {os.getloadavg()}  cores: {os.cpu_count()}  train_cam on {args.images} demo images, "
          f"{args.epochs} epochs, global batch {base['cam']['batch_size']}, freeze_bn {args.freeze_bn}, {args.runs} runs "
          f"per side (interleaved)")
    results = {name: {"samples_per_s": [], "wall_s": []} for name in sides}
    for _ in range(args.runs):
        for name, (procs, threads) in sides.items():
            params = json.loads(json.dumps(base))
            params["compute"].update(procs_per_node=procs, torch_threads=threads)
            wall = run_stage(work, params, "train_cam")
            history = (work / "plots/train_cam/history.csv").read_text().splitlines()[1:]
            rates = [float(line.split(",")[2]) for line in history]
            results[name]["samples_per_s"].append(statistics.mean(rates[1:] or rates))
            results[name]["wall_s"].append(wall)
    print(f"{'side':32s} {'samples/s min / median / max':>32s} {'stage wall s min / median / max':>34s}")
    for name, r in results.items():
        s, w = r["samples_per_s"], r["wall_s"]
        print(f"{name:32s} {min(s):10.1f} {statistics.median(s):10.1f} {max(s):10.1f} "
              f"{min(w):11.1f} {statistics.median(w):10.1f} {max(w):10.1f}")
    (one, many) = (statistics.median(r["samples_per_s"]) for r in results.values())
    print(f"ratio of medians ({args.procs} processes / 1): {many / one:.2f}x samples/s")
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()

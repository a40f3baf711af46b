"""Label-quality rows of an ablation, measured in one workspace, each with its per-class table.

    python bench/label_rows.py --workspace DIR --rows bench/rows/saliency.yaml --out docs/rows/voc676 [--only NAME ...]

DIR is a finished (or partly finished) run of the graph: its params.yaml is the base (saved as
``<out>/base_params.yaml`` on the first call and reused after; put back in DIR when the rows end). Each row of the rows file names the
params it changes from the base and the stages it re-runs, in graph order; a row re-uses the other
stages' outputs as the workspace holds them, so a row lists every stage whose inputs its params (or
an earlier row's) changed. Each row runs ``python -m stages.<stage>`` in DIR (what ``dvc repro``
runs), copies ``metrics/`` to ``<out>/<row>/`` and writes ``<out>/<row>.md`` with
``wsss quality`` (per-stage and per-class tables); ``<out>/summary.md`` collects every row run so far.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
GRAPH = ["prepare", "saliency", "train_cam", "make_cam", "crf", "train_aff", "random_walk", "instances", "train_seg",
         "evaluate"]


def read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def summary_line(name: str, d: Path) -> str:
    cam, crf, rw, sal = (read(d / f) for f in ("cam.json", "crf.json", "rw.json", "saliency.json"))
    seg = read(d / "segmenter.json")
    bg = (rw.get("per_class_iou") or {}).get("background")
    sep = (rw.get("affinity_separation") or {}).get("gap")
    gain = round(rw["miou"] - cam["miou"], 2) if "miou" in rw and "miou" in cam else None
    return (f"| {name} | {cam.get('miou')} | {crf.get('miou')} ({crf.get('precision')} / {crf.get('coverage')}) | "
            f"{rw.get('miou')} | {gain} | {bg} | {sep} | {seg.get('miou', '–')} | {sal.get('source', '–')} |")


def main() -> None:
    from pipeline.config import load_params, render_params

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", required=True, type=Path)
    ap.add_argument("--rows", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--only", nargs="*", help="run only these rows (in the file's order)")
    ap.add_argument("--reuse", nargs="*", default=[], metavar="STAGE",
                    help="stages not to run because the workspace already holds their outputs for these rows' "
                         "params (e.g. crf and train_aff of an earlier row with the same crf / affinity params)")
    ap.add_argument("--already-run", nargs="*", default=[],
                    help="rows whose outputs the workspace already holds (e.g. base after `dvc repro`): their "
                         "metrics are copied, no stage runs")
    args = ap.parse_args()
    ws, out = args.workspace.resolve(), args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    base_file = out / "base_params.yaml"
    if not base_file.is_file():
        shutil.copy(ws / "params.yaml", base_file)
    base = load_params(base_file)
    rows = yaml.safe_load(args.rows.read_text())["rows"]
    try:
        run_rows(rows, args, ws, out, base)
    finally:
        (ws / "params.yaml").write_text(render_params(base))
    lines = ["| row | CAM | seeds (precision / coverage) | walk | walk − CAM | walk background IoU | affinity gap | "
             "segmenter | saliency |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [summary_line(r["name"], out / r["name"]) for r in rows if (out / r["name"]).is_dir()]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def run_rows(rows: list, args, ws: Path, out: Path, base: dict) -> None:
    from pipeline.config import render_params, with_overrides
    from pipeline.quality import write_quality

    for row in rows:
        if args.only and row["name"] not in args.only:
            continue
        sets = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in (row.get("set") or {}).items()]
        (ws / "params.yaml").write_text(render_params(with_overrides(base, sets)))
        stages = [] if row["name"] in args.already_run else sorted(row["stages"], key=GRAPH.index)
        stages = [s for s in stages if s not in args.reuse]
        print(f"row {row['name']}: {' '.join(sets) or '(base)'}; stages {' '.join(stages)}", flush=True)
        times = {}
        for stage in ["digest_data"] + stages:
            t0 = time.perf_counter()
            res = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=ws)
            if res.returncode:
                sys.exit(f"row {row['name']}: stage {stage} failed (rc {res.returncode})")
            times[stage] = round(time.perf_counter() - t0, 1)
        dest = out / row["name"]
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(ws / "metrics", dest)
        (dest / "row.json").write_text(json.dumps({"set": row.get("set") or {}, "stages": stages, "seconds": times,
                                                   "reused": [s for s in row["stages"] if s in args.reuse]},
                                                  indent=1))
        write_quality(dest, out / f"{row['name']}.md", f"{row['name']}: {' '.join(sets) or 'base params'}",
                      f"python bench/label_rows.py --workspace {args.workspace} --rows {args.rows} --out {args.out} "
                      f"--only {row['name']}", [row.get("note", "")] if row.get("note") else [])


if __name__ == "__main__":
    main()

"""Ablation grids through ``dvc exp run``: one experiment per combination, one table of per-stage mIoU."""
from __future__ import annotations

import itertools
import json
import logging
import subprocess
import time
from pathlib import Path
from typing import Sequence

import yaml

from pipeline.config import ParamsError, SCHEMA

log = logging.getLogger("wsss")

STAGE_COLUMNS = [("cam", "CAM"), ("crf", "CRF seeds"), ("rw", "random walk")]


def parse_grid(specs: Sequence[str]) -> dict[str, list]:
    """``["cam.method=cam,gradcam", "rw.enabled=true,false"]`` -> {"cam.method": ["cam", "gradcam"], ...}."""
    grid = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        if not sep or not values:
            raise ParamsError(f"ablation grid {spec!r}: expected key=value1,value2")
        ns, _, name = key.partition(".")
        if ns not in SCHEMA or name not in SCHEMA[ns]:
            raise ParamsError(f"ablation grid: unknown param {key!r}")
        grid[key] = [yaml.safe_load(v) for v in values.split(",")]
    return grid


def combinations(grid: dict[str, list]) -> list[dict]:
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def _dvc_value(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def run_experiment(setting: dict, name: str, queue: bool = False, repo: str | Path = ".") -> str:
    """``dvc exp run -S k=v ... -n name`` (or ``--queue``); returns dvc's output."""
    cmd = ["dvc", "exp", "run", "-n", name]
    for k, v in setting.items():
        cmd += ["-S", f"{k}={_dvc_value(v)}"]
    if queue:
        cmd.append("--queue")
    res = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    return res.stdout + res.stderr


def read_row(setting: dict, repo: str | Path = ".") -> dict:
    """Per-stage mIoU from the workspace metrics of the experiment that just ran."""
    repo = Path(repo)
    row = dict(setting)
    labels = json.loads((repo / "metrics/labels.json").read_text()) if (repo / "metrics/labels.json").exists() else {}
    for key, title in STAGE_COLUMNS:
        m = labels.get(key) or {}
        row[title] = m.get("miou") if m.get("enabled", True) else "off"
    seg = repo / "metrics/segmenter.json"
    row["segmenter (val)"] = json.loads(seg.read_text()).get("miou") if seg.exists() else None
    return row


def markdown_table(rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join("" if r[c] is None else str(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def plot_rows(rows: list[dict], keys: list[str], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.visual import save_figure

    metrics = [t for _, t in STAGE_COLUMNS] + ["segmenter (val)"]
    labels = [", ".join(f"{k.split('.')[-1]}={r[k]}" for k in keys) for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows)), 3.5))
    width = 0.8 / len(metrics)
    for j, m in enumerate(metrics):
        vals = [r[m] if isinstance(r[m], (int, float)) else 0 for r in rows]
        ax.bar([i + j * width for i in range(len(rows))], vals, width, label=m)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], labels, rotation=15, fontsize=8)
    ax.set_ylabel("mIoU (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def ablate(specs: Sequence[str], out_md: str | Path = "reports/ablation.md", out_png: str | Path = "reports/ablation.png",
           repo: str | Path = ".") -> str:
    """Run every combination of the grid as a DVC experiment; write and return the markdown table."""
    grid = parse_grid(specs)
    rows = []
    settings = combinations(grid)
    for n, setting in enumerate(settings):
        name = ("abl-" + "-".join(f"{k.split('.')[-1]}_{_dvc_value(v)}" for k, v in setting.items())).replace(".", "_")[:60]
        log.info("ablation %d/%d: dvc exp run -n %s ...", n + 1, len(settings), name)
        t0 = time.perf_counter()
        run_experiment(setting, name, repo=repo)
        rows.append(read_row(setting, repo))
        log.info("ablation %d/%d: %s done in %.0f s: %s", n + 1, len(settings), name, time.perf_counter() - t0,
                 ", ".join(f"{k} {v}" for k, v in rows[-1].items() if k not in setting))
    table = markdown_table(rows)
    cmd = "wsss ablate " + " ".join(f"--grid {s}" for s in specs)
    out_md = Path(repo) / out_md
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(f"# Ablation\n\nCommand: `{cmd}`\n\nmIoU in %; CAM/CRF/random walk on the train split, segmenter on val.\n\n{table}\n")
    plot_rows(rows, list(grid), Path(repo) / out_png)
    return table

"""Ablation grids through ``dvc exp run``: one experiment per combination, one table of per-stage mIoU."""
from __future__ import annotations

import copy
import itertools
import json
import logging
import subprocess
import time
from pathlib import Path
from typing import Sequence

import yaml

from pipeline.config import SCHEMA, ParamsError, defaults, load_params, validate
from pipeline.paths import METRICS

log = logging.getLogger("wsss")

STAGE_COLUMNS = [("cam", "CAM"), ("crf", "CRF seeds"), ("rw", "random walk")]
# the stage whose metrics file fills each column (``--until`` leaves out the columns of stages after it)
COLUMN_STAGES = {"CAM": "make_cam", "CRF seeds": "crf", "seeds precision / coverage": "crf",
                 "random walk": "random_walk", "instance AP50": "instances", "segmenter (val)": "evaluate"}


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


def check_settings(settings: list[dict], repo: str | Path = ".") -> None:
    """Validate every setting as ``dvc exp run -S`` would apply it to the repo's ``params.yaml``
    (defaults when there is none), with the checks of :func:`pipeline.config.validate`, before any
    experiment is queued or run. Raises ParamsError naming the key and the setting."""
    params_file = Path(repo) / "params.yaml"
    base = load_params(params_file) if params_file.is_file() else defaults()
    for setting in settings:
        trial = copy.deepcopy(base)
        for key, value in setting.items():
            ns, _, name = key.partition(".")
            p = SCHEMA[ns][name]
            if p.kind is float and isinstance(value, str):  # 1e-3: a str to PyYAML, a float to DVC (YAML 1.2)
                try:
                    value = float(value)
                except ValueError:
                    pass
            trial[ns][name] = value
        shown = ", ".join(f"{k}={_dvc_value(v)}" for k, v in setting.items())
        try:
            validate(trial, source=f"ablation setting {shown}")
        except ParamsError as e:
            raise ParamsError(f"ablation grid: {e} (in the setting {shown}); nothing was queued or run") from e


def combinations(grid: dict[str, list]) -> list[dict]:
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def _dvc_value(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def _short_key(key: str) -> str:
    """``cam.method`` -> ``method``; a name that several namespaces have keeps its namespace
    (``crf.enabled`` -> ``crf_enabled``), so two grids never share an experiment name."""
    ns, _, name = key.partition(".")
    return name if sum(name in params for params in SCHEMA.values()) == 1 else f"{ns}_{name}"


def experiment_name(setting: dict, until: str | None = None) -> str:
    """``{"cam.method": "gradcam", "rw.enabled": False}`` -> ``abl-method_gradcam-rw_enabled_false``
    (``-until_<stage>`` appended for a run that stops at a stage)."""
    name = "abl-" + "-".join(f"{_short_key(k)}_{_dvc_value(v)}" for k, v in setting.items())
    suffix = f"-until_{until}" if until else ""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:80 - len(suffix)] + suffix


def _git(args: list[str], repo) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)


def experiment_ref(name: str, repo: str | Path = ".") -> str | None:
    """The git ref DVC keeps experiment ``name`` of the current baseline (HEAD) under, or None."""
    head = _git(["rev-parse", "HEAD"], repo)
    if head.returncode != 0:
        raise RuntimeError(f"{repo}: not a git repository with a commit (dvc exp needs one): {head.stderr.strip()}")
    sha = head.stdout.strip()
    ref = f"refs/exps/{sha[:2]}/{sha[2:]}/{name}"
    return ref if _git(["rev-parse", "--verify", "--quiet", ref], repo).returncode == 0 else None


def restore_baseline_params(repo: str | Path = ".") -> bool:
    """Put the baseline commit's ``params.yaml`` back in the workspace (``dvc exp run`` leaves the last
    experiment's params there, and the next ``-S`` would stack on them). Returns whether it changed."""
    res = _git(["show", "HEAD:params.yaml"], repo)
    if res.returncode != 0:
        return False  # no committed params.yaml: the experiments start from the defaults / workspace file
    path = Path(repo) / "params.yaml"
    if path.is_file() and path.read_text() == res.stdout:
        return False
    path.write_text(res.stdout)
    return True


def uncommitted_params_edits(repo: str | Path = ".") -> list[str]:
    """How the workspace's ``params.yaml`` differs from the baseline commit's: ``ns.key: old -> new`` per
    changed param, or one line when only comments or layout differ. Empty when they are the same (or
    there is no committed params.yaml)."""
    res = _git(["show", "HEAD:params.yaml"], repo)
    path = Path(repo) / "params.yaml"
    if res.returncode != 0 or not path.is_file() or path.read_text() == res.stdout:
        return []
    old, new = yaml.safe_load(res.stdout) or {}, yaml.safe_load(path.read_text()) or {}
    edits = [f"{ns}.{key}: {(old.get(ns) or {}).get(key)!r} -> {(new.get(ns) or {}).get(key)!r}"
             for ns in sorted(set(old) | set(new)) for key in sorted(set(old.get(ns) or {}) | set(new.get(ns) or {}))
             if (old.get(ns) or {}).get(key) != (new.get(ns) or {}).get(key)]
    return edits or ["comments or layout (no value differs)"]


def run_experiment(setting: dict, name: str, queue: bool = False, repo: str | Path = ".",
                   until: str | None = None) -> str:
    """``dvc exp run -n name -S k=v ... [until]`` (or ``--queue``); returns dvc's output."""
    cmd = ["dvc", "exp", "run", "-n", name]
    for k, v in setting.items():
        cmd += ["-S", f"{k}={_dvc_value(v)}"]
    if until:
        cmd.append(until)
    if queue:
        cmd.append("--queue")
    res = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    return res.stdout + res.stderr


def _metrics_reader(repo: Path, ref: str | None):
    def read(path: str, missing_ok: bool = False) -> dict:
        if ref is None:
            f = repo / path
            return json.loads(f.read_text()) if f.exists() else {}
        res = _git(["show", f"{ref}:{path}"], repo)
        if res.returncode != 0 and missing_ok:  # e.g. an experiment from before the instances stage
            return {}
        if res.returncode != 0:
            raise RuntimeError(f"experiment {ref.rsplit('/', 1)[-1]!r} has no {path} (is metrics/ ignored by git?): "
                               f"{res.stderr.strip()}")
        return json.loads(res.stdout)
    return read


def upstream_stages(until: str, repo: str | Path = ".") -> set[str]:
    """``until`` and every stage it depends on through ``dvc.yaml`` (what ``dvc exp run <until>`` runs)."""
    stages = yaml.safe_load((Path(repo) / "dvc.yaml").read_text())["stages"]
    if until not in stages:
        raise ParamsError(f"ablation --until: unknown stage {until!r}; stages: {', '.join(stages)}")

    def paths(entries):
        return [next(iter(e)) if isinstance(e, dict) else e for e in entries or []]

    made = {name: paths(st.get("outs")) + paths(st.get("metrics")) + paths(st.get("plots")) for name, st in stages.items()}
    found, todo = {until}, [until]
    while todo:
        deps = paths(stages[todo.pop()].get("deps"))
        for name, outs in made.items():
            if name not in found and any(d == o or d.startswith(o.rstrip("/") + "/") for d in deps for o in outs):
                found.add(name)
                todo.append(name)
    return found


def columns_until(until: str | None, repo: str | Path = ".") -> list[str]:
    """The table's metric columns for a run that stops at stage ``until`` (None: the whole graph):
    those whose stage ``dvc exp run <until>`` runs."""
    if until is None:
        return list(COLUMN_STAGES)
    ran = upstream_stages(until, repo)
    columns = [c for c, stage in COLUMN_STAGES.items() if stage in ran]
    if not columns:
        raise ParamsError(f"ablation --until {until}: that stage and those before it measure nothing; "
                          f"stop at make_cam or later")
    return columns


def read_row(setting: dict, repo: str | Path = ".", ref: str | None = None, until: str | None = None) -> dict:
    """Per-stage mIoU of one experiment, from each stage's own metrics file: in the workspace, or in
    the experiment's git ``ref``. With ``until`` only the stages up to it (the later files are the
    baseline's).

    A disabled stage passes its input through; its column shows the mIoU of what it passed on,
    marked ``(off)``."""
    read = _metrics_reader(Path(repo), ref)
    files = {"CAM": "cam", "CRF seeds": "crf", "random walk": "rw"}  # column -> key of pipeline.paths.METRICS
    row = dict(setting)
    for title in columns_until(until, repo):
        if title == "segmenter (val)":
            row[title] = read(METRICS["segmenter"].as_posix()).get("miou")
            continue
        if title == "instance AP50":
            row[title] = (read(METRICS["instances"].as_posix(), missing_ok=True).get("instance_quality") or {}).get("ap50")
            continue
        m = read(METRICS[files.get(title, "crf")].as_posix())
        if title == "seeds precision / coverage":
            row[title] = (f"{m['precision']} / {m['coverage']}" if m.get("precision") is not None
                          and m.get("enabled", True) else None)
            continue
        value = m.get("miou")
        row[title] = f"{value} (off)" if value is not None and m.get("enabled") is False else value
    return row


def markdown_table(rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join("" if r[c] is None else str(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def _number(value) -> tuple[float | None, bool]:
    """A table cell -> (mIoU or None, stage disabled)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value), False
    if isinstance(value, str) and value.endswith("(off)"):
        return float(value.split()[0]), True
    return None, False


def plot_rows(rows: list[dict], keys: list[str], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.visual import save_figure

    metrics = [t for t in COLUMN_STAGES if t in rows[0] and t != "seeds precision / coverage"]
    labels = [", ".join(f"{k.split('.')[-1]}={r[k]}" for k in keys) for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows)), 3.5))
    width = 0.8 / len(metrics)
    for j, m in enumerate(metrics):
        vals = [_number(r[m]) for r in rows]
        bars = ax.bar([i + j * width for i in range(len(rows))], [v or 0 for v, _ in vals], width, label=m,
                      color=f"C{j}")
        for bar, (_, off) in zip(bars, vals):
            if off:  # a disabled stage: what it passed through, hatched
                bar.set_hatch("//")
                bar.set_alpha(0.5)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], labels, rotation=15, fontsize=8)
    ax.set_ylabel("mIoU (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def ablate(specs: Sequence[str], out_md: str | Path = "reports/ablation.md", out_png: str | Path = "reports/ablation.png",
           repo: str | Path = ".", mode: str = "run", until: str | None = None) -> str | None:
    """One DVC experiment per combination of the grid, named by :func:`experiment_name`.

    mode ``run``: run each (one that already exists on this baseline is reused, not re-run), then
    write the table; ``queue``: only queue them (``dvc queue start`` runs them; then ``collect``);
    ``collect``: read the experiments already run and write the table. Each experiment starts from
    the baseline commit's ``params.yaml`` (:func:`restore_baseline_params`), not from what the last
    experiment left in the workspace, which is put back when the grid ends; uncommitted edits of
    params.yaml are refused, naming them, before anything runs (they would be overwritten). ``until``: run the graph only
    up to that stage (``dvc exp run <stage>``; e.g. ``random_walk`` leaves out the segmenter's
    training) and show only the columns of the stages it ran. Every setting is validated first
    (:func:`check_settings`): one bad value queues and runs nothing. Returns the markdown table
    (None when queueing)."""
    if mode not in ("run", "queue", "collect"):
        raise ValueError(f"ablate: mode {mode!r} is not run | queue | collect")
    grid = parse_grid(specs)
    settings = combinations(grid)
    columns_until(until, repo)  # an unknown stage, or one that measures nothing, fails before anything runs
    repo = Path(repo)
    check_settings(settings, repo)  # every one, before the first is queued or run
    if mode != "collect":
        edits = uncommitted_params_edits(repo)
        if edits:  # the experiments start from the commit; never overwrite what the user has not committed
            raise RuntimeError(f"{repo / 'params.yaml'} has edits that are not committed ({'; '.join(edits)}): each "
                               "experiment starts from the baseline commit's params.yaml, and the ablation would "
                               "overwrite them. Commit them (they become the baseline) or undo them "
                               "(git checkout params.yaml), then run again")
    try:
        return _run_grid(specs, grid, settings, repo, mode, until, out_md, out_png)
    finally:
        if mode != "collect":
            restore_baseline_params(repo)  # dvc exp run leaves the last experiment's params in the workspace


def _run_grid(specs, grid: dict, settings, repo: Path, mode: str, until: str | None, out_md, out_png) -> str | None:
    rows = []
    for n, setting in enumerate(settings):
        name = experiment_name(setting, until)
        ref = experiment_ref(name, repo)
        if ref is None and mode != "collect":
            restore_baseline_params(repo)  # the previous experiment's params are in the workspace
        if mode == "queue":
            if ref is None:
                run_experiment(setting, name, queue=True, repo=repo, until=until)
            log.info("ablation %d/%d: %s %s", n + 1, len(settings), name, "queued" if ref is None else "exists already")
            continue
        if ref is None and mode == "collect":
            raise RuntimeError(f"experiment {name!r} was not found on this baseline (git HEAD); run it first "
                               "(wsss ablate without --collect, or dvc queue start)")
        if ref is None:
            log.info("ablation %d/%d: dvc exp run -n %s ...", n + 1, len(settings), name)
            t0 = time.perf_counter()
            run_experiment(setting, name, repo=repo, until=until)  # its results are in the workspace: read them there (ref None)
            log.info("ablation %d/%d: %s done in %.0f s", n + 1, len(settings), name, time.perf_counter() - t0)
        elif mode == "run":
            log.info("ablation %d/%d: %s exists on this baseline; reusing it (dvc exp remove %s to re-run)",
                     n + 1, len(settings), name, name)
        rows.append(read_row(setting, repo, ref, until))
        log.info("ablation %d/%d: %s", n + 1, len(settings), ", ".join(f"{k} {v}" for k, v in rows[-1].items()))
    if mode == "queue":
        log.info("queued; run them with `dvc queue start -j 1`, follow with `dvc queue status`, then "
                 "`wsss ablate %s --collect`", " ".join(f"--grid {s}" for s in specs) + (f" --until {until}" if until else ""))
        return None
    table = markdown_table(rows)
    cmd = "wsss ablate " + " ".join(f"--grid {s}" for s in specs) + (f" --until {until}" if until else "")
    out_md = repo / out_md
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(f"# Ablation\n\nCommand: `{cmd}`\n\nmIoU in %; CAM/CRF/random walk on the train split, segmenter "
                      f"on val; `(off)`: the stage was disabled and passed its input through.\n\n{table}\n")
    plot_rows(rows, list(grid), repo / out_png)
    return table

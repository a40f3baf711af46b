"""Run the tiny preset's whole graph (every stage's main, in order) with the code of CODE_DIR and write
the digests of its outputs (bench/compare_runs.py's run_digests) to OUT_JSON.

    python bench/tiny_graph_digests.py CODE_DIR WORK_DIR OUT_JSON

With CODE_DIR a worktree of an earlier commit (``git worktree add /tmp/old <rev>``) this records what
that revision produced: tests/fixtures/tiny_demo_digests.json came from commit d24c51c this way, and
tests/test_no_background.py holds today's code to it."""
import importlib
import json
import os
import sys
from pathlib import Path

STAGES = ("prepare", "saliency", "train_cam", "make_cam", "crf", "train_aff", "random_walk", "instances",
          "train_seg", "evaluate", "export")


def main() -> None:
    code, work, out = (Path(a).resolve() for a in sys.argv[1:4])
    bench = Path(__file__).resolve().parent
    sys.path.insert(0, str(code))
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)
    from pipeline.config import render_params
    from pipeline.presets import preset

    Path("params.yaml").write_text(render_params(preset("tiny")))
    for name in STAGES:
        importlib.import_module(f"stages.{name}").main()
    sys.path.insert(0, str(bench))
    from compare_runs import run_digests

    out.write_text(json.dumps(run_digests(work), indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()

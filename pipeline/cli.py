"""``wsss``: the user-facing commands (the DVC stages run ``python -m stages.<name>``)."""
from __future__ import annotations

import argparse
import os
import runpy
import sys
from pathlib import Path

STAGES = ["prepare", "saliency", "train_cam", "make_cam", "crf", "train_aff", "random_walk", "instances", "train_seg", "upper_bound",
          "evaluate", "export"]


def _params(args):
    from pipeline.config import defaults, render_params, with_overrides
    from pipeline.presets import preset

    params = preset(args.preset) if args.preset else defaults()
    sys.stdout.write(render_params(with_overrides(params, args.set or [])))


def _stage(args):
    sys.argv = [f"stages.{args.name}"]
    runpy.run_module(f"stages.{args.name}", run_name="__main__")


def _export(args):
    from pipeline.config import load_params
    from pipeline.export import run_export

    from pipeline.metrics import read_json

    params = load_params(args.params)
    formats = list(dict.fromkeys(args.format))
    summary = run_export(args.store, args.prepared, params["data"], formats, args.out, force=args.force, params=params,
                         label_metrics=read_json(args.metrics), nest=len(formats) > 1,
                         instances_store_path=args.instances)
    print(f"exported {summary['count']} masks as {', '.join(formats)} to {summary['out_dir']}")


def _saliency(args):
    from pipeline.compute import resolve_device
    from pipeline.config import load_params
    from pipeline.progress import setup_logging
    from pipeline.saliency.store import write_saliency_pngs

    setup_logging()
    params = load_params(args.params)
    split = args.split or params["data"]["train_split"]
    summary = write_saliency_pngs(args.prepared, params["data"], params["saliency"], args.out, split,
                                  store_path=args.store, device=str(resolve_device(params["compute"]["device"])))
    print(f"wrote {summary['count']} {params['saliency']['source']} saliency maps of split {split} to "
          f"{summary['out_dir']} (from {summary['from']})")


def _ablate(args):
    from pipeline.ablation import ablate
    from pipeline.progress import setup_logging

    setup_logging()
    mode = "queue" if args.queue else "collect" if args.collect else "run"
    table = ablate(args.grid, out_md=args.out, out_png=Path(args.out).with_suffix(".png"), mode=mode, until=args.until)
    if table:
        print(table)


def _quality(args):
    from pipeline.quality import write_quality

    path = write_quality(args.metrics, args.out, args.title, f"wsss quality --metrics {args.metrics} --out {args.out}",
                         args.note or [])
    print(f"wrote {path}")


def _plugins(args):
    from pipeline.registry import ALL

    for reg in ALL:
        print(f"{reg.kind}: {', '.join(reg.names())}")


def _deps(args):
    from pipeline.code_graph import CodeGraph, compact_deps, plugin_deps
    from pipeline.config import load_params

    graph = CodeGraph(args.root)
    known = graph.stage_names()
    for stage in args.stage:
        if stage not in known:
            raise ValueError(f"unknown stage {stage!r}; stages in {graph.root / 'stages'}: {', '.join(known)}")
    params = load_params(args.params) if Path(args.params).is_file() else None
    for stage in args.stage or known:
        print(f"{stage}:")
        for dep in compact_deps(graph.stage_files(stage), graph):
            print(f"  - {dep}")
        for dep in plugin_deps(stage, graph, params) if params else []:
            print(f"  - {dep}  # plugin named in {args.params}")


def main(argv=None) -> None:
    # plugin modules in the workspace (cam.method: myplug:MyCAM) import as they do under dvc repro, whose
    # `python -m stages.<name>` has the working directory on sys.path; the console script would not
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    from pipeline.paths import INSTANCES, METRICS, METRICS_DIR, PREPARED, PSEUDO, SALIENCY
    from pipeline.presets import PRESETS

    ap = argparse.ArgumentParser(prog="wsss", description="Weakly-supervised segmentation pseudo-label pipeline")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("params", help="print params.yaml with defaults (or a preset)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="tiny: seconds-long smoke run; photos: real photos on a CPU (set data.root)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override one param (YAML value), e.g. --set data.root=/datasets/VOC2012; repeatable")
    p.set_defaults(fn=_params)

    p = sub.add_parser("stage", help="run one stage outside DVC (dvc repro is the normal way)")
    p.add_argument("name", choices=STAGES)
    p.set_defaults(fn=_stage)

    p = sub.add_parser("export", help="export the pseudo-mask store for another team")
    p.add_argument("--format", action="append", choices=["voc", "coco", "zarr", "coco_instances"], required=True,
                   help="repeat for several formats (coco_instances: the instance pseudo masks of --instances)")
    p.add_argument("--out", required=True, help="output folder (must be empty or absent unless --force)")
    p.add_argument("--force", action="store_true",
                   help="replace a previous export in --out (any other non-empty folder is always refused)")
    p.add_argument("--store", default=str(PSEUDO), help="mask store to export")
    p.add_argument("--instances", default=str(INSTANCES), help="instance store (format coco_instances)")
    p.add_argument("--prepared", default=str(PREPARED))
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--metrics", default=str(METRICS["labels"]), help="label-quality metrics to put in the manifest")
    p.set_defaults(fn=_export)

    p = sub.add_parser("saliency", help="write saliency.source's maps of the prepared data as grey PNGs <id>.png")
    p.add_argument("--out", required=True, help="output folder (reuse it with saliency.source: folder)")
    p.add_argument("--split", default=None, help="split to write (default data.train_split)")
    p.add_argument("--store", default=str(SALIENCY), help="read the maps from this store when it holds them")
    p.add_argument("--prepared", default=str(PREPARED))
    p.add_argument("--params", default="params.yaml")
    p.set_defaults(fn=_saliency)

    p = sub.add_parser("ablate", help="run a grid of DVC experiments and print a per-stage mIoU table")
    p.add_argument("--grid", action="append", required=True, metavar="KEY=V1,V2",
                   help="e.g. --grid cam.method=cam,gradcam --grid rw.enabled=true,false")
    p.add_argument("--out", default="reports/ablation.md", help="markdown table (the plot goes beside it as .png)")
    p.add_argument("--until", choices=STAGES, help="run each experiment only up to this stage (dvc exp run STAGE), "
                   "e.g. random_walk to leave out the segmenter; the table shows the stages it ran")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--queue", action="store_true", help="only queue the experiments (run them with dvc queue start)")
    how.add_argument("--collect", action="store_true", help="only read experiments already run and write the table")
    p.set_defaults(fn=_ablate)

    p = sub.add_parser("quality", help="write the label-quality table of the last run as markdown")
    p.add_argument("--out", default="reports/quality.md")
    p.add_argument("--metrics", default=str(METRICS_DIR), help="folder with the stages' metrics json files")
    p.add_argument("--title", default="Label quality")
    p.add_argument("--note", action="append", help="a line of text to put under the title; repeatable")
    p.set_defaults(fn=_quality)

    p = sub.add_parser("plugins", help="list backbones, CAM methods, CAM training objectives, refiners and datasets "
                                       "(built-in and plugins)")
    p.set_defaults(fn=_plugins)

    p = sub.add_parser("deps", help="print the code a stage runs (its imports and the built-ins of the registries "
                                    "it resolves): what its deps in dvc.yaml must list")
    p.add_argument("stage", nargs="*", metavar="STAGE", help="stage names, e.g. train_aff (default: every stage)")
    p.add_argument("--root", default=".", help="the project root (holds pipeline/ and stages/)")
    p.add_argument("--params", default="params.yaml", help="plugins these params name are listed too")
    p.set_defaults(fn=_deps)

    args = ap.parse_args(argv)
    try:
        args.fn(args)
    except (ValueError, KeyError, OSError, RuntimeError) as e:  # OSError: unreadable / unwritable / busy paths
        sys.exit(f"wsss {args.cmd}: error: {e}")


if __name__ == "__main__":
    main()

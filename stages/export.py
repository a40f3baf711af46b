"""Stage export: data/pseudo.zarr and data/instances.zarr -> exports/pseudo_masks/<format> for each of
export.formats (voc, coco, zarr, coco_instances), each with manifest.json and a datasheet README.md
(see pipeline.export.run_export)."""
from pipeline.export import run_export
from pipeline.progress import stage_timer
from pipeline.metrics import read_json
from stages.common import EXPORTS, INSTANCES, LABEL_METRICS, PREPARED, PSEUDO, start

# the namespaces that decide what the pseudo masks are (recorded in each manifest)
MASK_NAMESPACES = ("data", "cam", "crf", "affinity", "rw", "instances", "compute")


def main() -> None:
    params = start("export")
    mask_params = {k: params[k] for k in MASK_NAMESPACES if k in params}
    with stage_timer("export") as t:
        summary = run_export(PSEUDO, PREPARED, params["data"], params["export"]["formats"], EXPORTS, force=True,
                             params=mask_params, label_metrics=read_json(LABEL_METRICS), nest=True,
                             instances_store_path=INSTANCES)
        t.n = summary["count"] * len(summary["formats"])
        t.extra = ", ".join(f"{k} {v['bytes_per_image']:.0f} B/img" for k, v in summary["formats"].items())


if __name__ == "__main__":
    main()

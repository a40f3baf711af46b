"""Stage instances: data/cams.zarr + models/affinity (displacement field) -> data/instances.zarr,
metrics/instances.json, plots/instances/gallery.png."""
from pipeline.metrics import write_json
from pipeline.progress import stage_timer
from pipeline.refine.instances import run_instances
from pipeline.visual import save_png
from stages.common import AFF_MODEL, CAMS, INSTANCES, METRICS, PLOTS, PREPARED, cam_best_threshold, start


def main() -> None:
    params = start("instances")
    with stage_timer("instances") as t:
        result = run_instances(PREPARED, params, CAMS, AFF_MODEL / "affinity.pt", INSTANCES,
                               cam_threshold=cam_best_threshold())
        m = result["metrics"]
        t.n = m["images"]
        ap = m["instance_quality"]["ap50"]
        t.extra = (f"{m['instances']} instances, mIoU of their classes {m['miou']}%"
                   + (f", mask AP50 {ap}%" if ap is not None else ""))
    write_json(METRICS["instances"], m)
    if result["gallery"] is not None:
        save_png(PLOTS / "instances" / "gallery.png", result["gallery"])


if __name__ == "__main__":
    main()

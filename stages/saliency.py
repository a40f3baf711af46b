"""Stage saliency: data/prepared -> data/saliency.zarr (one map per train image of saliency.source), metrics/saliency.json."""
from pipeline.compute import resolve_device
from pipeline.metrics import write_json
from pipeline.progress import stage_timer
from pipeline.saliency.store import run_saliency
from stages.common import METRICS, PREPARED, SALIENCY, start


def main() -> None:
    params = start("saliency")
    device = str(resolve_device(params["compute"]["device"]))
    with stage_timer("saliency") as t:
        m = run_saliency(PREPARED, params, SALIENCY, device=device)["metrics"]
        t.n = m["images"]
        t.extra = (f"source {m['source']}, " + (m["note"] if "note" in m else
                   f"foreground IoU {m['foreground_iou']}%, background IoU {m['background_iou']}% (threshold {m['threshold']})"))
    write_json(METRICS["saliency"], m)


if __name__ == "__main__":
    main()

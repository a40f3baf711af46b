"""Stage make_cam: classifier + train images -> data/cams.zarr, metrics/cam.json, plots/cam/{threshold_curve.csv, gallery.png}."""
import csv

from pipeline.cam.run import evaluate_cam_store, file_digest, gallery_picture, gallery_threshold, make_cam_store
from pipeline.compute import resolve_device, set_torch_threads
from pipeline.datasets import PreparedData
from pipeline.metrics import write_json
from pipeline.models.classifier import load_classifier
from pipeline.progress import stage_timer
from pipeline.store import Store
from pipeline.visual import save_png
from stages.common import CAM_MODEL, CAMS, PLOTS, PREPARED, start

CHECKPOINT = CAM_MODEL / "classifier.pt"


def main() -> None:
    params = start("make_cam")
    device = resolve_device(params["compute"]["device"])
    prepared = PreparedData(params["data"], PREPARED)
    set_torch_threads(params["compute"], device, params["cam"]["num_workers"])
    model, meta = load_classifier(CHECKPOINT, device)
    with stage_timer("make_cam") as t:
        _, logits = make_cam_store(prepared, model, meta, params, device, CAMS, file_digest(CHECKPOINT))
        t.n = len(logits)
        t.extra = f"method {params['cam']['method']}, {len(params['cam']['scales'])} scales, on {device}"
    store = Store(CAMS)
    with stage_timer("make_cam eval") as t:
        metrics = evaluate_cam_store(prepared, store, model, logits, params, device)
        t.n = metrics["images"]
        b = metrics["baselines"]
        t.extra = (f"CAM mIoU {metrics['miou']} at threshold {metrics['best_threshold']} "
                   f"(all background {b['all_background']['miou']}, top label {b['top_label']['miou']})"
                   if metrics["ground_truth"] else "no ground truth: CAMs not scored")
    write_json("metrics/cam.json", metrics)
    curve = PLOTS / "cam" / "threshold_curve.csv"
    curve.parent.mkdir(parents=True, exist_ok=True)
    with open(curve, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["threshold", "miou"])
        for row in metrics["curve"]:
            w.writerow([row["threshold"], row["miou"]])
    picture = gallery_picture(prepared, store, params["data"]["gallery_ids"], gallery_threshold(metrics, params["cam"]))
    if picture is not None:
        save_png(PLOTS / "cam" / "gallery.png", picture)


if __name__ == "__main__":
    main()

"""Stage make_cam: classifier + train images -> data/cams.zarr, metrics/cam.json, plots/cam/{threshold_curve.csv, gallery.png}."""
from pipeline.cam.run import run_make_cam
from pipeline.metrics import write_csv, write_json
from pipeline.progress import stage_timer
from pipeline.visual import save_png
from stages.common import CAM_METRICS, CAM_MODEL, CAMS, PLOTS, PREPARED, start, torch_device


def main() -> None:
    params = start("make_cam")
    device = torch_device(params, params["cam"]["num_workers"])
    with stage_timer("make_cam") as t:
        result = run_make_cam(PREPARED, params, CAM_MODEL / "classifier.pt", CAMS, device=device)
        m = result["metrics"]
        t.n = result["images"]
        t.extra = (f"method {params['cam']['method']}, {len(params['cam']['scales'])} scales, on {device}; "
                   + (f"CAM mIoU {m['miou']} at threshold {m['best_threshold']} (all background "
                      f"{m['baselines']['all_background']['miou']}, top label {m['baselines']['top_label']['miou']})"
                      if m["ground_truth"] and m.get("background", True) else
                      f"CAM mIoU {m['miou']}, argmax over the labels: no background (top label "
                      f"{m['baselines']['top_label']['miou']})" if m["ground_truth"] else "no ground truth: CAMs not scored"))
    write_json(CAM_METRICS, m)
    write_csv(PLOTS / "cam" / "threshold_curve.csv", result["curve"], ["threshold", "miou"])
    if result["gallery"] is not None:
        save_png(PLOTS / "cam" / "gallery.png", result["gallery"])


if __name__ == "__main__":
    main()

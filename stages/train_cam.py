"""Stage train_cam: data/prepared -> models/cam/classifier.pt, metrics/train_cam.json, plots/train_cam/history.csv."""
from pipeline.cam.run import run_train_cam
from pipeline.distributed import finish, is_main
from pipeline.metrics import write_csv, write_json
from pipeline.progress import stage_timer
from stages.common import CAM_MODEL, METRICS, PLOTS, PREPARED, resume_file, start_training


def main() -> None:
    started = start_training("train_cam", "cam")
    if started is None:  # the workers it launched did the work
        return
    params, device = started
    with stage_timer("train_cam") as t:
        result = run_train_cam(PREPARED, params, CAM_MODEL / "classifier.pt", device=device, resume=resume_file(CAM_MODEL))
        m = result["metrics"]
        t.n = m["train_images"] * m["epochs"]
        t.extra = f"val mAP {m.get('val_map')}, final loss {m['final_loss']}, on {device}"
    if is_main():
        write_json(METRICS["train_cam"], m)
        write_csv(PLOTS / "train_cam" / "history.csv", result["history"], ["epoch", "loss", "images_per_s"])
    finish()


if __name__ == "__main__":
    main()

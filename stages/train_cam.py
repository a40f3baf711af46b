"""Stage train_cam: data/prepared -> models/cam/classifier.pt, metrics/train_cam.json, plots/train_cam/history.csv."""
from pipeline.cam.run import train_and_save
from pipeline.datasets import PreparedData
from pipeline.metrics import write_csv, write_json
from pipeline.progress import stage_timer
from stages.common import CAM_MODEL, METRICS, PLOTS, PREPARED, resume_file, start, torch_device


def main() -> None:
    params = start("train_cam")
    device = torch_device(params, params["cam"]["num_workers"], seed=True)
    prepared = PreparedData(params["data"], PREPARED)
    with stage_timer("train_cam") as t:
        result = train_and_save(prepared, params, device, CAM_MODEL / "classifier.pt", resume_file(CAM_MODEL))
        m = result["metrics"]
        t.n = m["train_images"] * m["epochs"]
        t.extra = f"val mAP {m.get('val_map')}, final loss {m['final_loss']}, on {device}"
    write_json(METRICS["train_cam"], m)
    write_csv(PLOTS / "train_cam" / "history.csv", result["history"], ["epoch", "loss", "images_per_s"])


if __name__ == "__main__":
    main()

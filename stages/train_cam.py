"""Stage train_cam: data/prepared -> models/cam/classifier.pt, metrics/train_cam.json, plots/train_cam/history.csv."""
import csv

from pipeline.cam.run import train_and_save
from pipeline.compute import resolve_device, seed_everything, set_torch_threads
from pipeline.datasets import PreparedData
from pipeline.metrics import write_json
from pipeline.progress import stage_timer
from stages.common import CAM_MODEL, PLOTS, PREPARED, resume_file, start

CHECKPOINT = CAM_MODEL / "classifier.pt"
RESUME = resume_file(CAM_MODEL)


def main() -> None:
    params = start("train_cam")
    seed_everything(params["compute"]["seed"])
    device = resolve_device(params["compute"]["device"])
    prepared = PreparedData(params["data"], PREPARED)
    set_torch_threads(params["compute"], device, params["cam"]["num_workers"])
    with stage_timer("train_cam") as t:
        result = train_and_save(prepared, params, device, CHECKPOINT, RESUME)
        m = result["metrics"]
        t.n = m["train_images"] * m["epochs"]
        t.extra = f"val mAP {m.get('val_map')}, final loss {m['final_loss']}, on {device}"
    write_json("metrics/train_cam.json", m)
    path = PLOTS / "train_cam" / "history.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "loss", "images_per_s"])
        for h in result["history"]:
            w.writerow([h["epoch"], round(h["loss"], 6), round(h.get("images_per_s", 0.0), 2)])


if __name__ == "__main__":
    main()

"""Stage train_seg: pseudo masks (or GT, seg.labels=gt) -> models/seg/segmenter.pt + plots/train_seg/history.csv."""
from pipeline.datasets import PreparedData
from pipeline.metrics import write_csv
from pipeline.progress import stage_timer
from pipeline.segment import train_and_save
from stages.common import CAM_MODEL, PLOTS, PREPARED, PSEUDO, SEG_MODEL, resume_file, start, torch_device


def main() -> None:
    params = start("train_seg")
    device = torch_device(params, params["seg"]["num_workers"], seed=True)
    prepared = PreparedData(params["data"], PREPARED)
    with stage_timer("train_seg") as t:
        result = train_and_save(prepared, params, device, PSEUDO, SEG_MODEL / "segmenter.pt", resume_file(SEG_MODEL),
                                CAM_MODEL / "classifier.pt")
        m = result["metrics"]
        t.n = m["train_images"] * m["epochs"]
        t.extra = f"labels {m['labels']}, {m['epochs']} epochs on {device}, final loss {m['final_loss']:.4f}"
    write_csv(PLOTS / "train_seg" / "history.csv", result["history"], ["epoch", "loss", "images_per_s"])


if __name__ == "__main__":
    main()

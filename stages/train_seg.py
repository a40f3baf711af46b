"""Stage train_seg: pseudo masks (or GT, seg.labels=gt) -> models/seg/segmenter.pt + plots/train_seg/history.csv."""
from pipeline.distributed import finish, is_main
from pipeline.metrics import write_csv
from pipeline.progress import stage_timer
from pipeline.segment import run_train_seg
from stages.common import CAM_MODEL, PLOTS, PREPARED, PSEUDO, SALIENCY, SEG_MODEL, resume_file, start_training


def main() -> None:
    started = start_training("train_seg", "seg")
    if started is None:  # the workers it launched did the work
        return
    params, device = started
    with stage_timer("train_seg") as t:
        result = run_train_seg(PREPARED, params, PSEUDO, CAM_MODEL / "classifier.pt", SEG_MODEL / "segmenter.pt",
                               device=device, resume=resume_file(SEG_MODEL), saliency=SALIENCY)
        m = result["metrics"]
        t.n = m["train_images"] * m["epochs"]
        t.extra = f"labels {m['labels']}, {m['epochs']} epochs on {device}, final loss {m['final_loss']:.4f}"
    if is_main():
        write_csv(PLOTS / "train_seg" / "history.csv", result["history"], ["epoch", "loss", "images_per_s"])
    finish()


if __name__ == "__main__":
    main()

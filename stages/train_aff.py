"""Stage train_aff: data/seeds.zarr (+ the CAM classifier) -> models/affinity/affinity.pt, plots/train_aff/history.csv."""
from pipeline.distributed import finish, is_main
from pipeline.metrics import write_csv
from pipeline.progress import stage_timer
from pipeline.refine.affinity_training import run_train_aff
from stages.common import AFF_MODEL, CAM_MODEL, PLOTS, PREPARED, SEEDS, resume_file, start_training


def main() -> None:
    started = start_training("train_aff", "affinity")
    if started is None:  # the workers it launched did the work
        return
    params, device = started
    with stage_timer("train_aff") as t:
        result = run_train_aff(PREPARED, params, SEEDS, CAM_MODEL / "classifier.pt", AFF_MODEL / "affinity.pt",
                               device=device, resume=resume_file(AFF_MODEL))
        m = result["metrics"]
        t.n = m["train_images"] * m["epochs"]
        t.extra = f"final loss {m['final_loss']:.4f}" if m["final_loss"] is not None else "no training (rw.affinity features)"
    if is_main():
        write_csv(PLOTS / "train_aff" / "history.csv", result["history"],
                  columns=None if result["history"] else ["epoch", "loss"])
    finish()


if __name__ == "__main__":
    main()

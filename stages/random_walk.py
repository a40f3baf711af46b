"""Stage random_walk: data/cams.zarr + models/affinity -> data/pseudo.zarr, metrics/rw.json, plots/rw/gallery.png."""
from pipeline.metrics import write_json
from pipeline.progress import stage_timer
from pipeline.refine.walk_store import run_random_walk
from pipeline.visual import save_png
from stages.common import AFF_MODEL, CAMS, METRICS, PLOTS, PREPARED, PSEUDO, SALIENCY, SEEDS, cam_best_threshold, start


def main() -> None:
    params = start("random_walk")
    with stage_timer("random_walk") as t:
        result = run_random_walk(PREPARED, params, CAMS, AFF_MODEL / "affinity.pt", PSEUDO, seeds=SEEDS,
                                 cam_threshold=cam_best_threshold(), saliency_store=SALIENCY)
        m = result["metrics"]
        t.n = m["images"]
        t.extra = f"{'random walk' if params['rw']['enabled'] else 'disabled: CAM labels'}, mIoU {m['miou']}%"
    write_json(METRICS["rw"], m)
    if result["gallery"] is not None:
        save_png(PLOTS / "rw" / "gallery.png", result["gallery"])


if __name__ == "__main__":
    main()

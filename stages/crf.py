"""Stage crf: data/cams.zarr (+ data/saliency.zarr with crf.background_cue saliency) -> data/seeds.zarr (confident seeds, 255 = unsure), metrics/crf.json, plots/crf/gallery.png."""
from pipeline.metrics import write_json
from pipeline.progress import stage_timer
from pipeline.refine.seeds import run_crf
from pipeline.visual import save_png
from stages.common import CAMS, METRICS, PLOTS, PREPARED, SALIENCY, SEEDS, cam_best_threshold, start


def main() -> None:
    params = start("crf")
    with stage_timer("crf") as t:
        result = run_crf(PREPARED, params, CAMS, SEEDS, cam_threshold=cam_best_threshold(), saliency_store=SALIENCY)
        m = result["metrics"]
        t.n = m["images"]
        t.extra = (f"mode {m['mode']}, coverage {m['coverage']}%, precision {m['precision']}%, "
                   f"mIoU over labelled {m['miou']}%")
    write_json(METRICS["crf"], m)
    if result["gallery"] is not None:
        save_png(PLOTS / "crf" / "gallery.png", result["gallery"])


if __name__ == "__main__":
    main()

"""Stage crf: data/cams.zarr -> data/seeds.zarr (confident seeds, 255 = unsure), metrics/crf.json, plots/crf/gallery.png."""
from pipeline.metrics import write_json
from pipeline.progress import stage_timer
from pipeline.refine.common import open_prepared, open_store
from pipeline.refine.gallery import refine_gallery
from pipeline.refine.seeds import make_seed_store
from pipeline.visual import save_png
from stages.common import CAMS, PLOTS, PREPARED, SEEDS, cam_best_threshold, start


def main() -> None:
    params = start("crf")
    crf = params["crf"]
    with stage_timer("crf") as t:
        metrics = make_seed_store(PREPARED, params["data"], CAMS, SEEDS, crf, params["compute"],
                                  cam_threshold=cam_best_threshold())
        t.n = metrics["images"]
        t.extra = (f"mode {metrics['mode']}, coverage {metrics['coverage']}%, precision {metrics['precision']}%, "
                   f"mIoU over labelled {metrics['miou']}%")
    write_json("metrics/crf.json", metrics)
    prepared, cams, seeds = open_prepared(PREPARED, params["data"]), open_store(CAMS), open_store(SEEDS)
    ids = seeds.ids[: params["data"]["gallery_ids"]]
    if ids:
        save_png(PLOTS / "crf" / "gallery.png", refine_gallery(prepared, ids, cams, {"CRF seeds": seeds}, crf["alpha_fg"]))


if __name__ == "__main__":
    main()

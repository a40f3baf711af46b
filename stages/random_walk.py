"""Stage random_walk: data/cams.zarr + models/affinity -> data/pseudo.zarr, metrics/rw.json, plots/rw/gallery.png."""
from pipeline.metrics import write_json
from pipeline.progress import stage_timer
from pipeline.refine.common import open_prepared, open_store
from pipeline.refine.gallery import refine_gallery
from pipeline.refine.random_walk import affinity_separation, make_pseudo_store
from pipeline.visual import save_png
from stages.common import AFF_MODEL, CAMS, PLOTS, PREPARED, PSEUDO, SEEDS, cam_best_threshold, start

SEPARATION_IMAGES = 64  # images the affinity diagnostic looks at (GT pairs: same class vs different)


def main() -> None:
    params = start("random_walk")
    rw = params["rw"]
    device = "cpu" if params["compute"]["scheduler"] != "synchronous" else params["compute"]["device"]
    if device == "auto":
        from pipeline.compute import resolve_device

        device = str(resolve_device("auto"))
    with stage_timer("random_walk") as t:
        metrics = make_pseudo_store(PREPARED, params["data"], CAMS, AFF_MODEL / "affinity.pt", PSEUDO, rw,
                                    params["crf"], params["compute"], device=device,
                                    cam_threshold=cam_best_threshold())
        t.n = metrics["images"]
        t.extra = f"{'random walk' if rw['enabled'] else 'disabled: CAM labels'}, mIoU {metrics['miou']}%"
    prepared, cams, pseudo = open_prepared(PREPARED, params["data"]), open_store(CAMS), open_store(PSEUDO)
    if rw["enabled"]:
        metrics["affinity_separation"] = affinity_separation(AFF_MODEL / "affinity.pt", prepared,
                                                             pseudo.ids[:SEPARATION_IMAGES])
    write_json("metrics/rw.json", metrics)
    ids = pseudo.ids[: params["data"]["gallery_ids"]]
    columns = {"CRF seeds": open_store(SEEDS)} if SEEDS.exists() else {}
    columns["random walk" if rw["enabled"] else "pseudo (no walk)"] = pseudo
    if ids:
        save_png(PLOTS / "rw" / "gallery.png", refine_gallery(prepared, ids, cams, columns, metrics["alpha"]))


if __name__ == "__main__":
    main()

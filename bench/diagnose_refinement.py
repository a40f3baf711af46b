"""Why refinement wins or loses on a dataset: seeds and walk variants on the run's own CAMs.

    python bench/diagnose_refinement.py [--images 80] [--workers 2]

Run in a project folder after `dvc repro` (it reads params.yaml, data/prepared, data/cams.zarr,
metrics/cam.json and models/affinity/affinity.pt) on the first --images train images with GT.
Prints two markdown tables, each variant against the published fixed settings:

1. Seeds: precision (pixel accuracy over labelled pixels) and coverage, overall and split into
   objects and background, for PSA's alphas 4 / 32, IRNet's thresholds 0.30 / 0.05, the no-CRF
   thresholds and the params' own settings (with ``crf.thresholds: cam_sweep`` resolved), and
   the params' settings with saliency as the background cue (``saliency.*`` of params.yaml).
2. Walk: mIoU and what happens to the background, without the walk, with PSA's fixed background
   alpha 16, with the params' background, with the final dense CRF on top, and with saliency as
   the background (1 - saliency).
"""
from __future__ import annotations

import argparse
import json
import sys
from multiprocessing import Pool
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import load_params  # noqa: E402
from pipeline.metrics import ConfusionMatrix  # noqa: E402
from pipeline.labels import present_classes  # noqa: E402
from pipeline.refine.runner import open_prepared, read_cams  # noqa: E402
from pipeline.refine.random_walk import pseudo_mask, resolve_background  # noqa: E402
from pipeline.refine.walk_affinity import image_affinities
from pipeline.refine.seeds import resolve_thresholds, seeds_for_image  # noqa: E402
from pipeline.saliency.rules import background_score, seeds_with_saliency  # noqa: E402
from pipeline.saliency.sources import SaliencySource  # noqa: E402

CAMS, PREPARED, MODEL = "data/cams.zarr", "data/prepared", "models/affinity/affinity.pt"


def seed_variants(crf: dict, t: float | None) -> dict[str, dict]:
    fixed = dict(crf, thresholds="fixed", merge="published")
    return {
        "PSA: affinitynet, alpha 4 / 32": dict(fixed, mode="affinitynet", alpha_fg=4.0, alpha_bg=32.0),
        "IRNet: irnet, 0.30 / 0.05": dict(fixed, mode="irnet", fg_threshold=0.30, bg_threshold=0.05),
        "no CRF, params' thresholds": dict(resolve_thresholds(crf, t), enabled=False),
        "params": resolve_thresholds(crf, t),
        "params, saliency background": dict(resolve_thresholds(crf, t), background_cue="saliency"),
    }


def walk_variants(rw: dict, t: float | None) -> dict[str, dict]:
    own = resolve_background(rw, t)
    return {
        "no walk, params' background": dict(own, enabled=False),
        "walk, PSA background alpha 16": dict(rw, enabled=True, background="fixed", alpha=16.0),
        "walk, params' background": dict(own, enabled=True),
        "walk + final dense CRF": dict(own, enabled=True, final_crf=True),
        "walk, saliency background": dict(own, enabled=True, background_cue="saliency"),
    }


def _work(job):
    params, ids, seeds, walks = job
    import torch

    from pipeline.models.affinity import load_affinity_net
    from pipeline.models.pairs import pair_offsets

    torch.set_num_threads(1)
    prepared = open_prepared(PREPARED, params["data"])
    model = load_affinity_net(MODEL) if Path(MODEL).is_file() else None
    saliency = SaliencySource(params["saliency"])
    out = []
    for image_id in ids:
        classes = present_classes(prepared.labels(image_id))
        grid, stride = read_cams(CAMS, image_id, classes)
        image = prepared.image(image_id)
        sal = saliency([image_id], [image])[0]
        row = {"id": image_id, "seeds": []}
        for c in seeds.values():
            s = seeds_for_image(image, grid, stride, classes, c)
            row["seeds"].append(seeds_with_saliency(s, sal, params["saliency"]) if c.get("background_cue") == "saliency"
                                and sal is not None else s)
        if model is not None:
            offsets = pair_offsets(model.radius)
            aff = image_affinities(model, image, offsets)
            row["walks"] = [pseudo_mask(image, grid, stride, classes, r, params["crf"], aff=None if not r["enabled"] else aff,
                                        offsets=offsets, aff_stride=model.stride,
                                        background=background_score(sal) if r.get("background_cue") == "saliency"
                                        and sal is not None else None) for r in walks.values()]
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=80)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    params = load_params("params.yaml")
    cam_metrics = json.loads(Path("metrics/cam.json").read_text()) if Path("metrics/cam.json").is_file() else {}
    t = cam_metrics.get("best_threshold")
    prepared = open_prepared(PREPARED, params["data"])
    ids = [i for i in prepared.ids(params["data"]["train_split"]) if prepared.has_gt(i)][: args.images]
    seeds, walks = seed_variants(params["crf"], t), walk_variants(params["rw"], t)
    chunks = [ids[k::args.workers] for k in range(args.workers)]
    with Pool(args.workers) as pool:
        rows = [r for part in pool.map(_work, [(params, c, seeds, walks) for c in chunks]) for r in part]
    names = prepared.class_names
    print(f"{len(rows)} train images of {prepared.index.get('dataset')}; CAM best threshold t* = {t}\n")
    print("| seeds | precision | coverage | objects: precision | objects: coverage | background: precision | "
          "background: coverage | mIoU over labelled |\n|---|---|---|---|---|---|---|---|")
    for k, name in enumerate(seeds):
        cm = ConfusionMatrix(len(names))
        for r in rows:
            cm.update(r["seeds"][k], prepared.gt(r["id"]))
        m = cm.matrix
        fg_p = m[1:, 1:].trace() / max(m[:, 1:].sum(), 1)
        bg_p = m[0, 0] / max(m[:, 0].sum(), 1)
        cov = cm.coverage()
        fg_cov = 1 - cm.unlabelled_per_class[1:].sum() / max(cm.valid_per_class[1:].sum(), 1)
        s = cm.summary(names)
        print(f"| {name} | {s['pixel_accuracy']:.1f} | {s['coverage']:.1f} | {100 * fg_p:.1f} | {100 * fg_cov:.1f} | "
              f"{100 * bg_p:.1f} | {100 * cov[0]:.1f} | {s['miou']:.1f} |")
    if "walks" not in rows[0]:
        print(f"\n{MODEL} not found: walk table skipped")
        return
    print("\n| pseudo masks | mIoU | background IoU | background precision | background recall |\n|---|---|---|---|---|")
    for k, name in enumerate(walks):
        cm = ConfusionMatrix(len(names))
        for r in rows:
            cm.update(r["walks"][k], prepared.gt(r["id"]))
        s = cm.summary(names)
        bg = names[0]
        print(f"| {name} | {s['miou']:.1f} | {s['per_class_iou'][bg]:.1f} | {s['per_class_precision'][bg]:.1f} | "
              f"{s['per_class_recall'][bg]:.1f} |")
    own = walks["walk, params' background"]
    used = {k: seeds["params"][k] for k in ("mode", "merge", "fg_threshold", "bg_threshold")}
    print(f"\nparams' seeds: {json.dumps(used)}; params' walk: beta {own['beta']}, logt {own['logt']}, "
          f"background alpha {own['alpha']:.3f}; saliency: {json.dumps(params['saliency'])}")


if __name__ == "__main__":
    main()

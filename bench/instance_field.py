"""Does the learned displacement field make better instances than connected components?

    python bench/instance_field.py [--merge-radius 2 5]

Run in a project folder after `dvc repro instances` on a dataset with instance ground truth (the
demo, or VOC with SegmentationObject/). It rebuilds the instance store (in a temporary folder)
with the learned field at each --merge-radius, and once with the field replaced by zeros (no
centres: each class region's connected components become the instances), and prints one
markdown row each: instances, mIoU of their classes, COCO mask AP / AP50 / AP75.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--merge-radius", type=int, nargs="+", default=None, help="default: params.yaml's")
    args = ap.parse_args()

    import pipeline.refine.instances as instances
    from pipeline.config import load_params
    from stages.common import AFF_MODEL, CAMS, PREPARED, cam_best_threshold

    params = load_params("params.yaml")
    params["compute"]["scheduler"] = "synchronous"  # the zero-field variant patches this process only
    learned = instances.instance_masks

    def zero_field(image, cam_grid, cam_stride, classes, rw, inst, aff, disp, offsets, aff_stride):
        return learned(image, cam_grid, cam_stride, classes, rw, inst, aff, np.zeros_like(disp), offsets, aff_stride)

    radii = args.merge_radius or [params["instances"]["merge_radius"]]
    variants = [(f"learned field, merge_radius {r}", r, learned) for r in radii]
    variants.append(("zero field (connected components)", radii[0], zero_field))
    print("| instances from | instances | mIoU of their classes | mask AP | AP50 | AP75 |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for n, (name, radius, fn) in enumerate(variants):
            instances.instance_masks = fn
            params["instances"]["merge_radius"] = radius
            m = instances.make_instance_store(PREPARED, params, CAMS, AFF_MODEL / "affinity.pt", Path(tmp) / f"{n}.zarr",
                                              cam_best_threshold())
            q = m["instance_quality"]
            print(f"| {name} | {m['instances']} | {m['miou']} | {q['ap']} | {q['ap50']} | {q['ap75']} |", flush=True)
    instances.instance_masks = learned


if __name__ == "__main__":
    main()

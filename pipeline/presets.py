"""Named presets: partial params that overlay the schema's defaults (:mod:`pipeline.config`).

``demo`` is what the committed ``params.yaml`` holds (``wsss params --preset demo``; a test keeps the
two equal); ``tiny`` is for tests and smoke runs; ``demo_stuff`` / ``tiny_stuff`` the same without a
background class; ``photos`` for real photos on a CPU; ``psa``,
``irnet``, ``seam`` and ``sccam`` the published systems' settings. Only ``wsss params`` and the tests
read this module: no stage imports it, so editing a preset re-runs nothing until its values reach a
params file.
"""
from __future__ import annotations

from typing import Any

from pipeline.config import ParamsError, defaults, merge

# Published settings mapped onto our params (../docs/REFERENCE.md): a ResNet-50 stands in for PSA's
# ResNet-38; image-size ranges become scale ranges for ~500 px VOC photos. Set data.root.
_VOC = {"dataset": "voc", "root": "data/VOC2012"}
_FOUR_SCALES = {"scales": [1.0, 0.5, 1.5, 2.0], "flip": True}
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # The synthetic demo of `make demo`: params.yaml is exactly this preset rendered.
    "demo": {
        "cam": {"scales": [1.5, 2.0]},
        "rw": {"logt": 6, "alpha": 4.0},
        "seg": {"backbone": "efficientnet_lite0", "weights": "imagenet", "epochs": 10, "aspp_channels": 64},
        "compute": {"torch_threads": 1},
    },
    # AffinityNet (Ahn & Kwak, CVPR 2018)
    "psa": {
        "data": dict(_VOC),
        "cam": {"backbone": "resnet50", "weights": "imagenet", "epochs": 15, "batch_size": 16, "lr": 0.1,
                "weight_decay": 5e-4, "crop_size": 448, "scale_min": 0.5, "scale_max": 1.0, "stride": 4, **_FOUR_SCALES},
        "crf": {"mode": "affinitynet", "merge": "published", "thresholds": "fixed", "alpha_fg": 4.0, "alpha_bg": 32.0,
                "iterations": 10, "gaussian_sxy": 3.0, "gaussian_compat": 3.0, "bilateral_sxy": 80.0,
                "bilateral_srgb": 13.0, "bilateral_compat": 10.0},
        "affinity": {"radius": 5, "stride": 8, "lr": 0.1, "batch_size": 8, "epochs": 8, "crop_size": 448,
                     "scale_min": 0.5, "scale_max": 1.0},
        "rw": {"beta": 8.0, "logt": 8, "background": "fixed", "alpha": 16.0},
        "seg": {"backbone": "resnet50", "weights": "imagenet", "crop_size": 321},
    },
    # IRNet (Ahn, Cho & Kwak, CVPR 2019). Its walk pads a constant background score of 0.25; the
    # alpha whose (1 - m)^alpha crosses m at 0.25 is 4.82.
    "irnet": {
        "data": dict(_VOC),
        "cam": {"backbone": "resnet50", "weights": "imagenet", "epochs": 5, "batch_size": 16, "lr": 0.1,
                "weight_decay": 1e-4, "crop_size": 512, "scale_min": 0.5, "scale_max": 1.5, "stride": 4,
                **_FOUR_SCALES},
        "crf": {"mode": "irnet", "merge": "published", "thresholds": "fixed", "fg_threshold": 0.30,
                "bg_threshold": 0.05, "gt_prob": 0.7, "iterations": 10, "gaussian_sxy": 3.0, "gaussian_compat": 3.0,
                "bilateral_sxy": 50.0, "bilateral_srgb": 5.0, "bilateral_compat": 10.0},
        "affinity": {"radius": 5, "stride": 4, "crop_size": 512, "scale_min": 0.5, "scale_max": 1.5, "lr": 0.1,
                     "boundary_lr_mult": 1.0},
        "rw": {"beta": 10.0, "logt": 8, "background": "fixed", "alpha": 4.82, "affinity": "irn"},
        "seg": {"backbone": "resnet50", "weights": "imagenet", "crop_size": 321},
    },
    # Small and fast everything, for tests and smoke runs (``wsss params --preset tiny``).
    "tiny": {
        "data": {"demo_num_train": 24, "demo_num_val": 8, "demo_min_side": 48, "demo_max_side": 64, "gallery_ids": 2},
        "cam": {"backbone": "tiny", "weights": "none", "epochs": 2, "batch_size": 8, "crop_size": 48,
                "scales": [1.0, 0.5], "num_workers": 0},
        "crf": {"iterations": 3},
        "affinity": {"epochs": 1, "batch_size": 4, "crop_size": 48, "radius": 3},
        "rw": {"logt": 4},
        "seg": {"epochs": 1, "batch_size": 8, "crop_size": 48},
        "compute": {"scheduler": "synchronous", "shard_images": 8},
    },
    # Real photos (VOC-style) on a 2-core CPU: 46 to 71 minutes for 676 VOC photos depending on the CPU,
    # measured in docs/REAL_PHOTOS.md before the saliency stage and the Lite2 segmenter (not re-timed
    # since). Set data.root (and data.dataset for coco / folder). What differs from the published GPU
    # settings is smaller: crops, one CAM scale, a thinner AffinityNet embedding, the early backbone
    # levels frozen. Thresholds and the walk's background follow the CAM sweep.
    "photos": {
        "data": {"dataset": "voc", "root": "data/VOC2012", "gallery_ids": 8},
        "cam": {"backbone": "efficientnet_lite0", "weights": "imagenet", "epochs": 10, "batch_size": 16, "lr": 0.02,
                "crop_size": 320, "scale_min": 0.5, "scale_max": 1.0, "frozen_levels": 2, "freeze_bn": True,
                "scales": [1.0], "flip": True, "stride": 4, "num_workers": 1},
        "crf": {"mode": "irnet", "thresholds": "cam_sweep", "fg_ratio": 1.5, "bg_ratio": 0.5, "scale": 0.5,
                "background_cue": "saliency"},
        "affinity": {"crop_size": 256, "batch_size": 8, "epochs": 5, "lr": 0.05, "scale_min": 0.5, "scale_max": 1.0,
                     "stride": 4, "radius": 5, "embed_dim": 64, "frozen_levels": 2, "num_workers": 1},
        # the U2-Net-p salient-object detector guides the seeds (not salient -> background unless the CAM is
        # confident) and is the walk's background; the walk's affinities mix AffinityNet's with the frozen
        # backbone's (docs/REAL_PHOTOS.md: voc676 walk 43.6 -> 53.2, its 100-image cut 30.1 -> 44.5)
        "saliency": {"source": "u2netp", "seed_rule": "guided"},
        "rw": {"background": "cam_sweep", "beta": 10.0, "logt": 8, "background_cue": "saliency", "affinity": "mix"},
        # the segmenter: EfficientNet-Lite2 from ImageNet beat Lite0 from the CAM classifier on voc676 trained on
        # the pseudo masks (40.8 vs 39.5) and on GT (49.7 vs 48.0); wider and deeper, so slower to train
        "seg": {"backbone": "efficientnet_lite2", "weights": "imagenet", "epochs": 8, "batch_size": 16, "lr": 0.01,
                "crop_size": 320, "scale_min": 0.5, "scale_max": 1.0, "frozen_levels": 2, "freeze_bn": True,
                "aspp_channels": 128, "num_workers": 1, "eval_flip": True},
        "compute": {"torch_threads": 2},
    },
}

# SEAM (Wang et al., CVPR 2020): PSA's AffinityNet refinement after a classifier trained with the
# equivariant regularisation (rescaled copy at 0.3; 8 epochs, batch 8, lr 0.01, weight decay 5e-4,
# 448 crops). SEAM's ResNet-38 is not built in; ResNet-50 stands in.
PRESETS["seam"] = merge(PRESETS["psa"], {"cam": {"training": "seam", "training_options": {"scale": 0.3, "weight": 1.0},
                                                 "epochs": 8, "batch_size": 8, "lr": 0.01, "weight_decay": 5e-4,
                                                 "crop_size": 448}})
# SC-CAM (Chang et al., CVPR 2020): PSA's refinement after sub-category exploration (k 10 clusters per
# class, sub-category loss weight 5, 3 rounds); ResNet-38 replaced by ResNet-50 as above.
PRESETS["sccam"] = merge(PRESETS["psa"], {"cam": {"training": "sccam",
                                                  "training_options": {"k": 10, "weight": 5.0, "rounds": 3}}})
# Scenes without a background class (data.background: false): the generated stuff-and-things demo
# (pipeline/datasets/demo_stuff.py) with the demo's settings; seeds by the label-margin rule (the
# only one that needs no background). The segmenter trains 25 epochs (10 leave it at 73% of the pseudo
# masks; docs/NO_BACKGROUND.md) and predicts with flip, as the photos preset does. `tiny_stuff` is the
# same at the tiny preset's sizes, for tests.
_NO_BACKGROUND = {"data": {"dataset": "demo_stuff", "background": False}, "crf": {"mode": "margin", "margin": 0.2}}
PRESETS["demo_stuff"] = merge(PRESETS["demo"], {**_NO_BACKGROUND, "seg": {"epochs": 25, "eval_flip": True}})
PRESETS["tiny_stuff"] = merge(PRESETS["tiny"], _NO_BACKGROUND)


def preset(name: str) -> dict[str, dict[str, Any]]:
    """Full params for a named preset (defaults overlaid with the preset's values)."""
    if name not in PRESETS:
        raise ParamsError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return merge(defaults(), PRESETS[name])

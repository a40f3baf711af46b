"""Training and inference for the final segmenter (the model and its checkpoint: :mod:`pipeline.models.segmenter`).

- :func:`mask_source` gives the training labels: the pseudo masks (``data/pseudo.zarr``) or,
  for the fully-supervised upper bound, the ground truth.
- :func:`train_segmenter` trains with pixel-wise cross-entropy that skips 255 (unsure / ignore),
  SGD with poly lr and a 10x head lr, random scale / crop / flip; AMP + channels_last on CUDA.
- :func:`predict_probs` runs one image at one or more scales (+ flip) and returns class
  probabilities at the image's size; :func:`crf_refine` optionally sharpens them with a dense CRF.
- :func:`predict_store` writes the predictions of a split to a mask store and scores them.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.augment import normalise, random_scale_crop_flip
from pipeline.metrics import ConfusionMatrix
from pipeline.labels import IGNORE_INDEX
from pipeline.distributed import global_count, rank_loader, world_size
from pipeline.store import ArraySpec, Store, fingerprint, write_store
from pipeline.training import ResumePoint, autocast, images_to, param_groups, to_device, train_loop

log = logging.getLogger("wsss")

MaskFn = Callable[[str], np.ndarray]


def mask_source(kind: str, prepared, pseudo_path: str | Path, ids: Sequence[str]) -> MaskFn:
    """``id -> (H, W) uint8`` training mask. kind ``pseudo``: the pseudo-mask store; ``gt``: ground truth.

    Raises ValueError naming the store / param when the source does not cover ``ids``.
    """
    if kind == "pseudo":
        store = Store(pseudo_path)
        missing = [i for i in ids if i not in store]
        if missing:
            raise ValueError(f"{pseudo_path}: has no pseudo mask for {len(missing)} training images, e.g. {missing[:3]}; "
                             f"re-run the stage that writes it (dvc repro random_walk)")
        return lambda i: store.read("mask", i)
    if kind == "gt":
        missing = [i for i in ids if not prepared.has_gt(i)]
        if missing:
            raise ValueError(f"param seg.labels=gt: {len(missing)} training images have no ground truth, e.g. {missing[:3]}")
        return prepared.gt
    raise ValueError(f"param seg.labels: {kind!r} is not 'pseudo' or 'gt'")


class SegTrainSet(torch.utils.data.Dataset):
    """Augmented (image, mask) crops. Items: {"image": (3, S, S) float32, "mask": (S, S) int64}; with
    ``saliency`` (``id -> (H, W) float32 map in [0, 1] or None``) also "saliency" (S, S) float32 and
    "saliency_valid" (S, S) bool (False on the crop's padding and where the image has no map), cut
    with the same scale, crop and flip as the mask.

    The augmentation of item i in epoch e is fixed by (seed, e, i), so runs repeat exactly
    whatever the number of loader workers. Call :meth:`set_epoch` before each epoch.
    """

    def __init__(self, prepared, ids: Sequence[str], masks: MaskFn, crop: int, scale_min: float, scale_max: float,
                 seed: int = 0, saliency: Callable[[str], np.ndarray | None] | None = None):
        if not ids:
            raise ValueError("segmenter training set is empty")
        self.prepared, self.ids, self.masks, self.saliency = prepared, list(ids), masks, saliency
        self.crop, self.scale_min, self.scale_max, self.seed = crop, scale_min, scale_max, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        image_id = self.ids[index]
        image, mask = self.prepared.image(image_id), self.masks(image_id)
        if mask.shape != image.shape[:2]:
            raise ValueError(f"mask of image {image_id!r} is {mask.shape}, image is {image.shape[:2]}")
        rng = np.random.default_rng([self.seed, self.epoch, index])
        if self.saliency is None:
            image, (mask,), _ = random_scale_crop_flip(rng, image, [mask], self.crop, self.scale_min, self.scale_max)
            return {"image": normalise(image), "mask": torch.from_numpy(mask.astype(np.int64))}
        sal = self.saliency(image_id)
        has_map = sal is not None
        sal8 = (np.round(sal * 255).astype(np.uint8) if has_map else np.zeros(mask.shape, np.uint8))
        if sal8.shape != mask.shape:
            raise ValueError(f"saliency map of image {image_id!r} is {sal8.shape}, image is {mask.shape}")
        image, (mask, sal8), valid = random_scale_crop_flip(rng, image, [mask, sal8], self.crop, self.scale_min,
                                                           self.scale_max)
        return {"image": normalise(image), "mask": torch.from_numpy(mask.astype(np.int64)),
                "saliency": torch.from_numpy(sal8.astype(np.float32) / 255.0),
                "saliency_valid": torch.from_numpy(valid & has_map)}


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over labelled pixels (255 skipped); 0 (with a gradient path) when none is labelled.
    Under distributed training the mean is over the labelled pixels of every rank (the global batch's)."""
    if world_size() > 1:
        count = global_count((target != IGNORE_INDEX).sum())
        return F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, reduction="sum") / count.clamp(min=1)
    if not bool((target != IGNORE_INDEX).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX)


def saliency_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of saliency logits (B, 1, H, W) against maps (B, H, W) in [0, 1], mean over
    the ``valid`` pixels (of every rank under distributed training); 0 with a gradient path when none is."""
    per_pixel = F.binary_cross_entropy_with_logits(logits[:, 0].float(), target, reduction="none")
    total = (per_pixel * valid).sum()
    if world_size() > 1:
        return total / global_count(valid.sum()).clamp(min=1)
    return total / valid.sum().clamp(min=1)


def train_segmenter(model: torch.nn.Module, train_set: SegTrainSet, seg: dict, device: torch.device,
                    seed: int = 0, resume_path: str | Path | None = None,
                    inputs: dict[str, str] | None = None) -> list[dict]:
    """Train ``model`` in place on ``train_set`` with the ``seg`` params; returns per-epoch history.

    ``resume_path``: per-epoch resume checkpoint (:class:`pipeline.training.ResumePoint`), keyed by
    the seg params, seed, ids, the initial weights, the code and ``inputs``: what identifies the
    training masks (``labels``: the pseudo-mask store's fingerprint, or the GT's) and the ``prepared`` data."""
    from pipeline.provenance import state_digest

    model = to_device(model, device)
    groups = param_groups(model.backbone, model.head, seg["lr"], seg["weight_decay"], seg["head_lr_mult"])
    optimizer = torch.optim.SGD(groups, lr=seg["lr"], momentum=0.9, weight_decay=seg["weight_decay"])
    gen = torch.Generator().manual_seed(seed)
    resume = None
    if resume_path:
        resume = ResumePoint(resume_path, fingerprint(dict(seg), seed, train_set.ids), "train_seg", generator=gen,
                             inputs={**(inputs or {}), "initial_weights": state_digest(model)})
    loader = rank_loader(train_set, torch.utils.data.RandomSampler(train_set, generator=gen), seg["batch_size"],
                         "seg.batch_size", num_workers=seg["num_workers"], generator=gen,
                         pin_memory=device.type == "cuda", persistent_workers=False)

    weight = seg.get("saliency_weight", 0.0)
    if weight > 0 and train_set.saliency is None:
        raise ValueError("param seg.saliency_weight > 0 needs saliency maps for the training images (data/saliency.zarr)")

    def step(batch: dict) -> torch.Tensor:
        x = images_to(batch["image"], device)
        y = batch["mask"].to(device, non_blocking=True)
        if weight <= 0:
            return segmentation_loss(model(x), y)
        logits, sal_logits = model.forward_with_saliency(x)
        sal = batch["saliency"].to(device, non_blocking=True)
        valid = batch["saliency_valid"].to(device, non_blocking=True)
        return segmentation_loss(logits, y) + weight * saliency_loss(sal_logits, sal, valid)

    return train_loop(model, loader, step, optimizer, seg["epochs"], device, "train_seg",
                      on_epoch_start=train_set.set_epoch, resume=resume)


@torch.no_grad()
def predict_probs(model: torch.nn.Module, image: np.ndarray, device: torch.device, scales: Sequence[float] = (1.0,),
                  flip: bool = False) -> np.ndarray:
    """(H, W, 3) uint8 -> (C, H, W) float32 class probabilities, averaged over scales (and flips)."""
    h, w = image.shape[:2]
    x = normalise(image)[None]
    total = None
    n = 0
    for s in scales:
        xs = x if s == 1.0 else F.interpolate(x, size=(max(1, round(h * s)), max(1, round(w * s))),
                                               mode="bilinear", align_corners=False)
        batch = torch.cat([xs, xs.flip(-1)]) if flip else xs
        with autocast(device):
            logits = model(images_to(batch, device)).float()
        logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        probs = logits.softmax(1)
        if flip:
            probs = probs[:1] + probs[1:].flip(-1)
        total = probs[0] if total is None else total + probs[0]
        n += 2 if flip else 1
    return (total / n).cpu().numpy().astype(np.float32)


def crf_refine(image: np.ndarray, probs: np.ndarray, crf: dict) -> np.ndarray:
    """Dense-CRF refinement of (C, H, W) probabilities with the ``crf`` params namespace (kernels,
    iterations, ``crf.scale``): the same CRF as the seeds (:func:`pipeline.refine.crf.crf_marginals`).

    Returns (C, H, W) float32 marginals.
    """
    from pipeline.refine.crf import CrfSettings, crf_marginals

    return crf_marginals(image, probs, CrfSettings.from_params(crf))


def predict_mask(model: torch.nn.Module, image: np.ndarray, device: torch.device, seg: dict,
                 crf: dict | None = None) -> np.ndarray:
    """(H, W) uint8 class map with the ``seg`` eval settings (scales, flip, optional CRF)."""
    probs = predict_probs(model, image, device, seg["eval_scales"], seg["eval_flip"])
    if seg["eval_crf"]:
        if crf is None:
            raise ValueError("param seg.eval_crf is true but no crf params were given")
        probs = crf_refine(image, probs, crf)
    return probs.argmax(0).astype(np.uint8)


def predict_store(model: torch.nn.Module, prepared, ids: Sequence[str], path: str | Path, device: torch.device,
                  seg: dict, crf: dict | None, attrs: dict, shard_images: int = 32) -> Path:
    """Predict every image of ``ids`` into a mask store at ``path`` (array "mask", 255-free)."""
    from pipeline.provenance import prepared_digest, state_digest

    attrs = {**attrs, "inputs": {**attrs.get("inputs", {}), "segmenter": state_digest(model),
                                 "prepared": prepared_digest(prepared.dir)}}
    model = to_device(model, device).eval()

    def compute(indices):
        return {"mask": [predict_mask(model, prepared.image(ids[i]), device, seg, crf) for i in indices]}

    return write_store(path, ids, prepared.sizes(ids), {"mask": ArraySpec("uint8", fill=IGNORE_INDEX)},
                       attrs, compute, shard_images=shard_images, progress="predict")


def score_store(store: Store, prepared, ids: Sequence[str] | None = None, array: str = "mask") -> ConfusionMatrix:
    """Confusion matrix of a mask store's images (``ids`` or all) against the ground truth."""
    cm = ConfusionMatrix(prepared.num_classes)
    for image_id in store.ids if ids is None else ids:
        gt = prepared.gt(image_id)
        if gt is not None:
            cm.update(store.read(array, image_id), gt)
    return cm


def run_train_seg(prepared, params: dict, labels: str | Path, classifier: str | Path | None, out: str | Path, *,
                  device: torch.device, resume: str | Path, saliency: str | Path | None = None) -> dict:
    """What the train_seg stage does: train on the pseudo masks of the store ``labels``
    (``seg.labels: pseudo``) or on GT, from ``seg.weights`` (``classifier``: the CAM classifier
    checkpoint ``classifier``), with ``seg.saliency_weight`` > 0 also a saliency head on the maps of
    the saliency store ``saliency``; save the checkpoint ``out``, clear the resume file. Returns
    {"history", "metrics"}."""
    from pipeline.datasets.prepared import as_prepared
    from pipeline.models.segmenter import build_segmenter, save_segmenter
    from pipeline.provenance import prepared_digest
    from pipeline.training import clear_resume

    prepared = as_prepared(prepared, params["data"])
    pseudo_path, checkpoint, resume_path, classifier_path = labels, out, resume, classifier
    seg, data, seed = params["seg"], params["data"], params["compute"]["seed"]
    ids = prepared.ids(data["train_split"])
    masks = mask_source(seg["labels"], prepared, pseudo_path, ids)
    saliency_maps, inputs = None, {}
    if seg["saliency_weight"] > 0:
        saliency_maps, inputs["saliency"] = saliency_source(saliency, ids)
    train_set = SegTrainSet(prepared, ids, masks, seg["crop_size"], seg["scale_min"], seg["scale_max"], seed,
                            saliency=saliency_maps)
    model = build_segmenter(prepared.num_classes, seg, classifier_path)
    label_digest = Store(pseudo_path).attrs.get("fingerprint") if seg["labels"] == "pseudo" else "gt"
    history = train_segmenter(model, train_set, seg, device, seed, resume_path,
                              {"labels": label_digest, "prepared": prepared_digest(prepared.dir), **inputs})
    save_segmenter(checkpoint, model, seg, prepared.class_names, seg["labels"], history)
    clear_resume(resume_path)
    return {"history": history, "metrics": {"train_images": len(ids), "epochs": seg["epochs"], "labels": seg["labels"],
                                            "final_loss": round(history[-1]["loss"], 5)}}


def saliency_source(path: str | Path | None, ids: Sequence[str]) -> tuple[Callable[[str], np.ndarray | None], str]:
    """(``id -> map or None``, the store's fingerprint) for the saliency head's targets; an error naming
    ``seg.saliency_weight`` and the store when the store is missing or lacks a training image."""
    from pipeline.refine.runner import open_store, saliency_store_fingerprint
    from pipeline.saliency.store import read_saliency

    fingerprint = saliency_store_fingerprint(path, "seg.saliency_weight")
    missing = [i for i in ids if i not in open_store(path)]
    if missing:
        raise ValueError(f"param seg.saliency_weight > 0: the saliency store {path} has no map for {len(missing)} "
                         f"training images, e.g. {missing[:3]}; re-run the saliency stage")
    return (lambda i: read_saliency(path, i)), str(fingerprint)


def run_evaluate(prepared, params: dict, segmenter: str | Path, out: str | Path, *, device: torch.device) -> dict:
    """The evaluate stage's scoring: predict the eval split with the segmenter checkpoint ``segmenter``
    into the store ``out`` (resumable) and score it against GT. Returns {"metrics", "model",
    "checkpoint"} (the model, in eval mode, draws the report)."""
    from pipeline.datasets.prepared import as_prepared
    from pipeline.models.segmenter import load_segmenter

    prepared, checkpoint, predictions = as_prepared(prepared, params["data"]), segmenter, out

    seg, data = params["seg"], params["data"]
    names = prepared.class_names
    ids = prepared.ids(data["eval_split"])
    model, ckpt = load_segmenter(checkpoint, device)
    if ckpt.get("class_names") not in (None, names):
        raise ValueError(f"{checkpoint}: trained for classes {ckpt['class_names']}, data has {names}")
    settings = {k: seg[k] for k in ("eval_scales", "eval_flip", "eval_crf")}
    predict_store(model, prepared, ids, predictions, device, seg, params["crf"],
                  {"kind": "segmenter_prediction", "class_names": names, "split": data["eval_split"],
                   "trained_on": ckpt["labels"], "stride": 1, "eval": settings},
                  shard_images=params["compute"]["shard_images"])
    cm = score_store(Store(predictions), prepared, ids)
    metrics = {**cm.summary(names), "split": data["eval_split"], "images": len(ids), "trained_on": ckpt["labels"],
               "eval": settings}
    return {"metrics": metrics, "model": model, "checkpoint": ckpt}


"""Training the CAM classifier on image-level labels, and its classification mAP.

The objective of ``cam.training`` (:mod:`pipeline.cam.objectives`: multilabel soft-margin loss,
SEAM or SC-CAM); poly lr with the head at ``head_lr_mult``×; random rescale, crop and flip; bf16 autocast + channels_last on CUDA. After every epoch a resume checkpoint is written
(:class:`pipeline.training.ResumePoint`), so an interrupted run continues from its last finished
epoch and ends with the same weights.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from pipeline.augment import normalise, random_scale_crop_flip
from pipeline.cam.objectives import build_objective
from pipeline.distributed import rank_loader
from pipeline.models.classifier import CamClassifier, build_classifier
from pipeline.store import fingerprint
from pipeline.training import ResumePoint, images_to, param_groups, to_device, train_loop

TRAIN_KEYS = ("backbone", "weights", "epochs", "batch_size", "lr", "weight_decay", "head_lr_mult", "crop_size",
              "scale_min", "scale_max", "frozen_levels", "freeze_bn", "training", "training_options")


class EpochSampler(torch.utils.data.Sampler):
    """Yields (epoch, index) in a shuffled order that depends only on (seed, epoch); each pass over
    it is the next epoch. Augmentation seeds come from the same pair, so a resumed run repeats the
    uninterrupted run exactly, whatever the number of workers."""

    def __init__(self, n: int, seed: int, start_epoch: int = 0):
        self.n, self.seed, self.epoch = n, seed, start_epoch  # the trainer sets .epoch before each pass

    def __len__(self):
        return self.n

    def __iter__(self):
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        epoch = self.epoch
        self.epoch += 1
        return iter([(epoch, int(i)) for i in order])


class ClassificationSet(torch.utils.data.Dataset):
    """Augmented crops and multi-hot labels. Items: {"image": (3, c, c) float32, "label": (K,) float32}."""

    def __init__(self, load_image: Callable[[str], np.ndarray], ids: Sequence[str], label_vectors: Sequence[np.ndarray],
                 crop: int, scale_min: float, scale_max: float, seed: int):
        self.load_image, self.ids, self.labels = load_image, list(ids), [np.asarray(v, np.float32) for v in label_vectors]
        self.crop, self.scale_min, self.scale_max, self.seed = crop, scale_min, scale_max, seed

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, key):
        epoch, i = key
        rng = np.random.default_rng([self.seed, epoch, i])
        image, _, _ = random_scale_crop_flip(rng, self.load_image(self.ids[i]), [], self.crop, self.scale_min,
                                             self.scale_max)
        return {"image": normalise(image), "label": torch.from_numpy(self.labels[i]), "index": i}


def train_classifier(dataset: ClassificationSet, cam_params: dict, num_classes: int, device: torch.device, seed: int,
                     num_workers: int = 0, resume_path: str | Path | None = None,
                     on_epoch_end: Callable[[int, float], None] | None = None,
                     inputs: dict[str, str] | None = None) -> tuple[CamClassifier, list[dict]]:
    """Train and return (model in eval mode, per-epoch history [{epoch, loss, images_per_s}]).

    ``resume_path``: where the per-epoch resume checkpoint lives (deleted by the caller once the
    final checkpoint is saved); it resumes only for the same params, ids, initial weights, code and
    ``inputs`` (e.g. ``{"prepared": digest}``). ``on_epoch_end(epoch, loss)`` runs after it is written."""
    from pipeline.provenance import state_digest

    p = cam_params
    torch.manual_seed(seed)
    model = build_classifier(p["backbone"], p["weights"], num_classes, p["frozen_levels"], p["freeze_bn"])
    objective = build_objective(p.get("training", "plain"), model, p.get("training_options"))
    extra = objective.setup(dataset) if hasattr(objective, "setup") else None
    if extra is not None:  # a submodule while training, so resume checkpoints hold it; dropped at the end
        model.objective_state = extra
    model = to_device(model, device)
    head = list(model.classifier.parameters()) + (list(extra.parameters()) if extra is not None else [])
    opt = torch.optim.SGD(param_groups(model.backbone, head, p["lr"], p["weight_decay"], p["head_lr_mult"]),
                          lr=p["lr"], momentum=0.9, weight_decay=p["weight_decay"])
    resume = None
    if resume_path:
        resume = ResumePoint(resume_path, fingerprint({k: p[k] for k in TRAIN_KEYS}, seed, list(dataset.ids), num_classes),
                             "train_cam", inputs={"initial_weights": state_digest(model), **(inputs or {})})
    sampler = EpochSampler(len(dataset), seed)
    loader = rank_loader(dataset, sampler, p["batch_size"], "cam.batch_size", num_workers=num_workers,
                         persistent_workers=num_workers > 0, pin_memory=device.type == "cuda")
    if len(loader) == 0:
        raise ValueError(f"param cam.batch_size: {p['batch_size']} leaves no batch for {len(dataset)} images")

    def step(batch):
        return objective(images_to(batch["image"], device), batch["label"].to(device, non_blocking=True),
                         batch["index"])

    def epoch_start(epoch):
        sampler.epoch = epoch
        if hasattr(objective, "start_epoch"):
            objective.start_epoch(epoch, p["epochs"], device)

    history = train_loop(model, loader, step, opt, p["epochs"], device, "train_cam", on_epoch_start=epoch_start,
                         on_epoch_end=on_epoch_end, resume=resume)
    if extra is not None:
        del model.objective_state
    model.eval()
    return model, history


@torch.inference_mode()
def predict_scores(model: CamClassifier, images: Sequence[np.ndarray], device: torch.device) -> np.ndarray:
    """Sigmoid scores (N, K) for whole images (one at a time: sizes differ)."""
    model.eval()
    out = []
    for im in images:
        x = images_to(normalise(im)[None], device)
        out.append(torch.sigmoid(model(x).float()).cpu().numpy()[0])
    return np.stack(out) if out else np.zeros((0, model.num_classes), np.float32)


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """AP of one class (mean precision at each positive, ranked by score); NaN without positives."""
    pos = targets > 0
    if not pos.any():
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    hits = pos[order]
    precision_at = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision_at[hits].mean())


def mean_average_precision(scores: np.ndarray, targets: np.ndarray, class_names: Sequence[str]) -> dict:
    """{"map": %, "per_class_ap": {name: % or None}} over classes with at least one positive."""
    aps = [average_precision(scores[:, k], targets[:, k]) for k in range(targets.shape[1])]
    valid = [a for a in aps if np.isfinite(a)]
    return {"map": round(100 * float(np.mean(valid)), 2) if valid else None,
            "per_class_ap": {n: (round(100 * a, 2) if np.isfinite(a) else None) for n, a in zip(class_names, aps)}}

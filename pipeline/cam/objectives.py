"""What the CAM classifier is trained to minimise (``cam.training``), registered in
``pipeline.registry.CAM_TRAINING``.

An objective is built as ``Objective(model, **cam.training_options)`` and called on a batch of
normalised crops ``x`` (B, 3, H, W), multi-hot labels ``y`` (B, K) and the images' dataset
indices ``index`` (B,); it returns the scalar loss. Two optional hooks: ``setup(dataset)`` returns
a module of extra trainable weights and state (the trainer puts it in the optimizer at the head's
lr and in resume checkpoints, and drops it after training); ``start_epoch(epoch, epochs, device)``
runs before each epoch. Built-ins:

- ``plain``: the multilabel soft-margin loss on the image logits (PSA, IRNet).
- ``seam``: SEAM's equivariant regularisation (Wang et al., CVPR 2020) without its pixel
  correlation module: the crops and a copy rescaled by ``scale`` are both classified, and the
  CAMs of the crop, rescaled the same way, must equal the rescaled copy's CAMs (mean L1 over the
  foreground channels of max-normalised CAMs). SEAM's published setting: scale 0.3, weight 1.
- ``sccam``: SC-CAM's sub-category exploration (Chang et al., CVPR 2020): the first 1/``rounds``
  of the epochs train on the image labels alone; then, at the start of each later round, the
  pooled features of every training image are clustered per class (k-means, ``k`` clusters) and
  a second head learns the (class, cluster) labels, added with ``weight``. Published: k 10,
  weight 5, 3 rounds.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import numpy as np
import torch.nn as nn

from pipeline.registry import CAM_TRAINING


def classification_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.multilabel_soft_margin_loss(logits.float(), y)


def max_normalised(cams: torch.Tensor, y: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """(B, K, h, w) raw CAMs -> ReLU, absent classes zeroed, each map divided by its own max."""
    cams = F.relu(cams.float()) * y[:, :, None, None]
    return cams / (cams.flatten(2).amax(2)[:, :, None, None] + eps)


def equivariance_loss(cams: torch.Tensor, cams_of_rescaled: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean |rescale(norm(cams)) - norm(cams_of_rescaled)|: zero when the CAM commutes with rescaling."""
    a = F.interpolate(max_normalised(cams, y), size=cams_of_rescaled.shape[-2:], mode="bilinear",
                      align_corners=True)
    return (a - max_normalised(cams_of_rescaled, y)).abs().mean()


@CAM_TRAINING.register("plain")
class PlainObjective:
    """Multilabel soft-margin loss on the classifier's logits."""

    def __init__(self, model):
        self.model = model

    def __call__(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        return classification_loss(self.model(x), y)


@CAM_TRAINING.register("seam")
class SeamObjective:
    """SEAM's equivariant regularisation: ``(cls(x) + cls(x')) / 2 + weight * ER``, x' = x rescaled by
    ``scale`` (bilinear)."""

    def __init__(self, model, scale: float = 0.3, weight: float = 1.0):
        if not 0 < float(scale) < 4 or float(scale) == 1.0:
            raise ValueError(f"param cam.training_options: seam scale must be in (0, 4) and not 1, got {scale}")
        if float(weight) < 0:
            raise ValueError(f"param cam.training_options: seam weight must be >= 0, got {weight}")
        self.model, self.scale, self.weight = model, float(scale), float(weight)
        self.last: dict[str, float] = {}  # the two terms of the last call, for logs and tests

    def __call__(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        model = self.model
        x2 = F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=True, recompute_scale_factor=False)
        f1, f2 = model.features(x), model.features(x2)
        cls = (classification_loss(model.head(f1), y) + classification_loss(model.head(f2), y)) / 2
        er = equivariance_loss(model.cam(f1), model.cam(f2), y)
        self.last = {"classification": float(cls.detach()), "equivariance": float(er.detach())}
        return cls + self.weight * er


def kmeans(points: np.ndarray, k: int, seed: int, iterations: int = 30) -> np.ndarray:
    """Cluster ids (N,) of ``points`` (N, D) into ``min(k, N)`` clusters (k-means++ start, Lloyd steps)."""
    n = len(points)
    k = min(k, n)
    rng = np.random.default_rng(seed)
    centres = [points[rng.integers(n)]]
    for _ in range(1, k):
        d = np.min([((points - c) ** 2).sum(1) for c in centres], axis=0)
        centres.append(points[rng.choice(n, p=d / d.sum())] if d.sum() > 0 else points[rng.integers(n)])
    centres = np.stack(centres)
    assign = np.zeros(n, np.int64)
    for _ in range(iterations):
        assign = ((points[:, None] - centres[None]) ** 2).sum(2).argmin(1)
        new = np.stack([points[assign == j].mean(0) if (assign == j).any() else centres[j] for j in range(k)])
        if np.allclose(new, centres):
            break
        centres = new
    return assign


class SubCategoryState(nn.Module):
    """The sub-category head (pooled features -> C*k logits) and the current (class, cluster) targets
    of every training image, as a buffer so a resumed run continues with the same ones."""

    def __init__(self, channels: int, num_classes: int, k: int, num_images: int):
        super().__init__()
        self.k = k
        self.head = nn.Conv2d(channels, num_classes * k, 1, bias=False)
        nn.init.normal_(self.head.weight, std=0.01)
        self.register_buffer("targets", torch.zeros(num_images, num_classes * k))
        self.register_buffer("round", torch.zeros((), dtype=torch.long))  # rounds clustered so far


@CAM_TRAINING.register("sccam")
class SubCategoryObjective:
    """SC-CAM: ``cls(x) + weight * multilabel soft-margin(sub-category logits, (class, cluster) targets)``."""

    def __init__(self, model, k: int = 10, weight: float = 5.0, rounds: int = 3):
        if int(k) < 2 or int(rounds) < 2 or float(weight) < 0:
            raise ValueError(f"param cam.training_options: sccam needs k >= 2, rounds >= 2, weight >= 0 "
                             f"(got k {k}, rounds {rounds}, weight {weight})")
        self.model, self.k, self.weight, self.rounds = model, int(k), float(weight), int(rounds)
        self.state: SubCategoryState | None = None
        self.dataset = None
        self.seed = 0

    def setup(self, dataset) -> nn.Module:
        self.dataset, self.seed = dataset, int(getattr(dataset, "seed", 0))
        self.state = SubCategoryState(self.model.backbone.out_channels, self.model.num_classes, self.k, len(dataset))
        return self.state

    def round_of(self, epoch: int, epochs: int) -> int:
        """Which round an epoch belongs to (0 = image labels only)."""
        return min(self.rounds - 1, epoch * self.rounds // max(epochs, 1))

    @torch.no_grad()
    def pooled_features(self, device: torch.device) -> np.ndarray:
        """(N, D) L2-normalised pooled features of every training image (resized to the crop size)."""
        import cv2

        from pipeline.augment import normalise
        from pipeline.training import images_to

        ds, was_training = self.dataset, self.model.training
        self.model.eval()
        out = []
        for image_id in ds.ids:
            image = cv2.resize(ds.load_image(image_id), (ds.crop, ds.crop), interpolation=cv2.INTER_LINEAR)
            f = self.model.features(images_to(normalise(image)[None], device)).float().mean((2, 3))[0]
            out.append((f / f.norm().clamp_min(1e-8)).cpu().numpy())
        self.model.train(was_training)
        return np.stack(out)

    def start_epoch(self, epoch: int, epochs: int, device: torch.device) -> None:
        r = self.round_of(epoch, epochs)
        if r == 0 or int(self.state.round) >= r:
            return
        feats = self.pooled_features(device)
        labels = np.stack([np.asarray(v) for v in self.dataset.labels]) > 0
        targets = np.zeros((len(feats), labels.shape[1] * self.k), np.float32)
        for c in range(labels.shape[1]):
            members = np.flatnonzero(labels[:, c])
            if len(members):
                targets[members, c * self.k + kmeans(feats[members], self.k, seed=self.seed * 1000 + r * 100 + c)] = 1.0
        self.state.targets.copy_(torch.from_numpy(targets))
        self.state.round.fill_(r)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        f = self.model.features(x)
        loss = classification_loss(self.model.head(f), y)
        if self.state is None or int(self.state.round) == 0:
            return loss
        if index is None:
            raise ValueError("cam.training sccam needs each batch's image indices")
        sub = self.state.head(f.mean((2, 3), keepdim=True)).flatten(1)
        return loss + self.weight * classification_loss(sub, self.state.targets[index.to(self.state.targets.device)])


def build_objective(name: str, model, options: dict | None = None):
    """The ``cam.training`` objective ``name`` for ``model`` with ``cam.training_options``."""
    return CAM_TRAINING.get(name)(model, **(options or {}))

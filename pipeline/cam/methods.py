"""CAM methods behind one small base class, registered in ``pipeline.registry.CAM_METHODS``.

A method turns a batch of normalised images into raw (un-normalised, un-merged) class maps on the
model's feature grid. Multi-scale / flip merging, ReLU and max-normalisation happen in
:mod:`pipeline.cam.infer`, the same for every method. A plugin adds a method by subclassing
:class:`CamMethod` (implementing :meth:`CamMethod.compute`) or, for a gradient method,
:class:`GradientCamMethod` (implementing :meth:`GradientCamMethod.cam_image` or only
:meth:`GradientCamMethod.channel_weights`), and registering it (``@CAM_METHODS.register`` or an entry
point ``cam_method.<name>`` in group ``wsss.plugins``). ``cam.method_options`` are passed to the
method's constructor as keyword args; the built-ins take none.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.registry import CAM_METHODS, check_options


@dataclass
class CamOutput:
    """maps: (B, K, h, w) float32 raw class maps; logits: (B, K) float32 classifier scores."""

    maps: torch.Tensor
    logits: torch.Tensor


class CamMethod:
    """Base class. ``needs_grad``: the method runs a backward pass (inference then uses no_grad,
    not inference_mode, around the backbone, and the method enables grad where it needs it).

    ``model`` is a :class:`pipeline.models.classifier.CamClassifier` (``features``, ``head``, ``cam``).
    """

    name = "base"
    needs_grad = False

    def __init__(self, model):
        self.model = model

    def compute(self, features: torch.Tensor, labels: torch.Tensor) -> CamOutput:  # pragma: no cover - interface
        """features: (B, D, h, w) last feature map; labels: (B, K) bool, the classes to produce."""
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, labels: torch.Tensor) -> CamOutput:
        """x: (B, 3, H, W) normalised images; labels: (B, K) bool. Returns float32 maps and logits."""
        out = self.compute(self.model.features(x), labels)
        return CamOutput(out.maps.float(), out.logits.float())


def build_method(name: str, model, options: dict | None = None) -> CamMethod:
    """The method registered as ``name`` (param ``cam.method``) for ``model``, built with ``options``
    (param ``cam.method_options``) as keyword args; an option it does not take raises OptionsError."""
    cls = CAM_METHODS.get(name)
    if not (isinstance(cls, type) and issubclass(cls, CamMethod)):
        raise TypeError(f"param cam.method: {name!r} resolves to {cls!r}, which is not a CamMethod subclass")
    options = dict(options or {})
    check_options(cls, options, "cam.method_options", f"cam_method {name!r}")
    return cls(model, **options)


@CAM_METHODS.register("cam")
class ClassActivationMap(CamMethod):
    """CAM (Zhou et al.): the classifier weights applied to the last feature map. Every class from
    one forward pass, no gradients. The logits are the spatial mean of the maps (GAP is linear)."""

    name = "cam"

    def compute(self, features, labels):
        maps = self.model.cam(features)
        return CamOutput(maps, maps.float().mean((2, 3)))


class GradientCamMethod(CamMethod):
    """Base of gradient methods: the gradients of each present class's logit w.r.t. the last feature
    map, computed once per class, turned into that class's map by :meth:`cam_image` (the hook of
    pytorch-grad-cam's ``get_cam_image``).

    Only the head lies between that map and the logits, so the backward pass never enters the
    backbone: one cheap backward per class present in the batch. A subclass overrides
    :meth:`cam_image`, or only :meth:`channel_weights` for a map ReLU(Σ_d w_d A_d).
    """

    needs_grad = True

    def channel_weights(self, acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """acts, grads: (B, D, h, w) -> (B, D) weights of the feature channels."""
        raise NotImplementedError(f"{type(self).__name__} overrides neither cam_image nor channel_weights")

    def cam_image(self, acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """acts: (B, D, h, w) float32 features (no grad); grads: (B, D, h, w) float32 gradients of one
        class's logit w.r.t. them -> (B, h, w) float32 map of that class, >= 0.
        Default: ReLU(Σ_d w_d A_d) with w = :meth:`channel_weights`."""
        w = self.channel_weights(acts, grads)
        return torch.relu((w[:, :, None, None] * acts).sum(1))

    def compute(self, features, labels):
        acts = features.detach().float().clone().requires_grad_(True)
        b, k = labels.shape
        maps = acts.new_zeros((b, k) + tuple(acts.shape[-2:]))
        with torch.enable_grad():
            logits = self.model.head(acts).float()
            present = [c for c in range(k) if bool(labels[:, c].any())]
            for n, c in enumerate(present):
                # logits of different images depend only on their own features: one backward for the batch
                (grads,) = torch.autograd.grad(logits[:, c].sum(), acts, retain_graph=n < len(present) - 1)
                maps[:, c] = self.cam_image(acts.detach(), grads) * labels[:, c, None, None]
        return CamOutput(maps, logits.detach())


@CAM_METHODS.register("gradcam")
class GradCAM(GradientCamMethod):
    """Grad-CAM (Selvaraju et al.): channel weights = spatially averaged gradients, then ReLU."""

    name = "gradcam"

    def channel_weights(self, acts, grads):
        return grads.mean((2, 3))


@CAM_METHODS.register("gradcampp")
class GradCAMPlusPlus(GradientCamMethod):
    """Grad-CAM++ (Chattopadhyay et al.): weights = Σ α·ReLU(grad) with the closed-form α for an
    exponential score, α = g² / (2g² + Σ_ij A · g³)."""

    name = "gradcampp"

    def channel_weights(self, acts, grads):
        g2, g3 = grads.pow(2), grads.pow(3)
        denom = 2 * g2 + acts.sum((2, 3), keepdim=True) * g3
        alpha = torch.where(grads != 0, g2 / torch.where(denom != 0, denom, torch.ones_like(denom)),
                            torch.zeros_like(grads))
        return (alpha * torch.relu(grads)).sum((2, 3))

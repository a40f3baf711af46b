"""Contracts every registered part keeps (docs/ARCHITECTURE.md, "Data contracts"): each CAM method
(the built-ins and the example plugin), each seed maker and each dataset adapter, plus the plugin
options params (``cam.method_options``, ``crf.mode_options``) that reach their constructors."""
from __future__ import annotations

import inspect
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import pipeline.cam  # noqa: F401  (registers the built-in CAM methods)
import pipeline.cam.objectives  # noqa: F401  (registers the built-in training objectives)
import pipeline.datasets  # noqa: F401  (registers the built-in datasets)
from pipeline.cam import CamInference, GradientCamMethod, build_method
from pipeline.cam.infer import scale_inputs
from pipeline.config import ParamsError, validate
from pipeline.presets import preset
from pipeline.datasets import Dataset
from pipeline.labels import IGNORE_INDEX
from pipeline.models.classifier import build_classifier
from pipeline.refine.seeds import SeedMaker, seed_maker
from pipeline.registry import CAM_METHODS, CAM_TRAINING, DATASETS, REFINERS, OptionsError

torch.set_num_threads(1)
PLUGIN_SRC = Path(__file__).resolve().parents[1] / "examples" / "wsss_cam_plugin" / "src"
EXAMPLE_PLUGIN = "wsss_cam_plugin:LayerCAM"


def builtin_names(registry) -> list[str]:
    """The names the pipeline itself registers (not the toys other test modules add)."""
    return sorted(n for n, obj in registry._items.items() if obj.__module__.startswith("pipeline."))


@pytest.fixture
def importable_example(monkeypatch):
    monkeypatch.syspath_prepend(str(PLUGIN_SRC))
    yield
    sys.modules.pop("wsss_cam_plugin", None)


# --- CAM methods ----------------------------------------------------------------------------------
CAM_NAMES = builtin_names(CAM_METHODS) + [EXAMPLE_PLUGIN]
NUM_FG = 4
LABELS = torch.tensor([True, False, True, True])  # class 2 (channel 1) is absent


@pytest.mark.parametrize("name", CAM_NAMES)
def test_cam_method_gives_float32_maps_on_the_feature_grid(importable_example, name):
    torch.manual_seed(0)
    model = build_classifier("tiny", "none", NUM_FG).eval()
    x = torch.randn(2, 3, 40, 56)
    labels = torch.stack([LABELS, ~LABELS])
    out = build_method(name, model)(x, labels)
    with torch.no_grad():
        feats = model.features(x)
    assert out.maps.shape == (2, NUM_FG) + tuple(feats.shape[-2:]) and out.maps.dtype == torch.float32
    assert out.logits.shape == (2, NUM_FG) and out.logits.dtype == torch.float32
    assert torch.isfinite(out.maps).all() and torch.isfinite(out.logits).all()


@pytest.mark.parametrize("name", CAM_NAMES)
def test_cam_after_merging_is_k_h_w_in_0_1_with_only_labelled_classes_non_zero(importable_example, name):
    torch.manual_seed(0)
    model = build_classifier("tiny", "none", NUM_FG).eval()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    stride, scales = 4, (1.0, 0.5)
    inference = CamInference(build_method(name, model), scales, True, stride, "cpu")
    cams, logits = inference.run_group([scale_inputs(image, scales)], image.shape[:2], LABELS[None])
    cam = cams[0]
    assert cam.shape == (NUM_FG, math.ceil(37 / stride), math.ceil(53 / stride)) and cam.dtype == torch.float32
    assert torch.isfinite(cam).all() and cam.min() >= 0 and cam.max() <= 1
    assert torch.all(cam[~LABELS] == 0), "a class not in the labels must be exactly zero"
    for c in torch.nonzero(LABELS).flatten():
        assert cam[c].max() in (0.0, 1.0), f"labelled channel {int(c)} is max-normalised (or empty)"
    assert cam[LABELS].max() == 1.0
    assert logits.shape == (1, NUM_FG)


def test_example_plugin_overrides_only_the_cam_image_hook(importable_example):
    from wsss_cam_plugin import LayerCAM

    assert issubclass(LayerCAM, GradientCamMethod)
    own = {k for k, v in vars(LayerCAM).items() if callable(v)}
    assert own == {"cam_image"}


# --- seed makers ----------------------------------------------------------------------------------
def blob_cams(h: int, w: int, centres) -> np.ndarray:
    """(K, h, w) float32 in [0, 1]: one Gaussian blob per class, peak 1."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.stack([np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 8.0 ** 2)) for cy, cx in centres]).astype(np.float32)


@pytest.mark.parametrize("mode", builtin_names(REFINERS))
def test_seed_maker_gives_h_w_uint8_of_background_labelled_classes_and_ignore(mode):
    crf = dict(preset("tiny")["crf"], mode=mode)
    h, w = 41, 57
    image = np.full((h, w, 3), 30, np.uint8)
    image[5:25, 5:25] = (220, 60, 60)
    image[20:38, 30:52] = (60, 60, 220)
    classes = [2, 5]
    seeds = seed_maker(crf)(image, blob_cams(h, w, [(15, 15), (29, 41)]), classes)
    assert isinstance(seeds, np.ndarray) and seeds.shape == (h, w) and seeds.dtype == np.uint8
    assert set(np.unique(seeds).tolist()) <= {0, *classes, IGNORE_INDEX}
    assert set(classes) & set(np.unique(seeds).tolist()), "the confident blob centres are labelled"


@pytest.mark.parametrize("mode", builtin_names(REFINERS))
def test_registered_seed_maker_is_a_seed_maker(mode):
    assert issubclass(REFINERS.get(mode), SeedMaker)


@pytest.mark.parametrize("name", builtin_names(CAM_TRAINING))
def test_training_objective_gives_a_finite_scalar_that_trains_backbone_and_head(name):
    torch.manual_seed(0)
    model = build_classifier("tiny", "none", 3).train()
    loss = CAM_TRAINING.get(name)(model)(torch.randn(2, 3, 48, 48), torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]))
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert model.classifier.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())


# --- datasets -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", builtin_names(DATASETS))
def test_registered_dataset_implements_the_dataset_interface(name):
    cls = DATASETS.get(name)
    assert isinstance(cls, type) and issubclass(cls, Dataset)
    assert not inspect.isabstract(cls), f"{cls.__name__} leaves {sorted(cls.__abstractmethods__)} abstract"
    assert cls.name == name


def test_data_dataset_accepts_registered_names_and_names_the_param_otherwise():
    assert {"demo", "voc", "coco", "folder"} <= set(DATASETS.names())
    assert validate({"data": {"dataset": "pipeline.datasets.folder:FolderDataset"}})["data"]["dataset"]
    with pytest.raises(ParamsError, match=r"param data\.dataset: unknown dataset 'imagenet'"):
        validate({"data": {"dataset": "imagenet"}})


class OneImageDataset(Dataset):
    """A plugin dataset: one image, built from ``data.root`` alone."""

    name = "test_one_image"
    class_names = ["background", "thing"]

    def split_ids(self, split):
        return ["only"]

    def image_path(self, image_id):
        return self.root / "only.png"

    def raw_labels(self, image_id):
        return ["thing"]


def test_plugin_dataset_by_dotted_path_is_opened_from_data_root(tmp_path):
    from pipeline.datasets import open_dataset

    data = validate({"data": {"dataset": "tests.test_contracts:OneImageDataset", "root": str(tmp_path)}})["data"]
    ds = open_dataset(data, tmp_path / "prepared")
    assert type(ds).__name__ == "OneImageDataset" and ds.root == tmp_path and ds.split_ids("train") == ["only"]


# --- plugin options -------------------------------------------------------------------------------
class PoweredGradCAM(GradientCamMethod):
    """A plugin with one option: Grad-CAM's map raised to ``power``."""

    name = "test_powered_gradcam"

    def __init__(self, model, power: float = 1.0):
        super().__init__(model)
        self.power = power

    def channel_weights(self, acts, grads):
        return grads.mean((2, 3))

    def cam_image(self, acts, grads):
        return super().cam_image(acts, grads) ** self.power


class MarginSeeds(SeedMaker):
    """A plugin seed maker with one option, ``margin``: everything unsure."""

    def __init__(self, crf, margin: int = 0):
        super().__init__(crf)
        self.margin = margin

    def __call__(self, image, cams, classes):
        return np.full(image.shape[:2], IGNORE_INDEX, np.uint8)


def test_method_options_reach_the_plugin_constructor():
    method = "tests.test_contracts:PoweredGradCAM"
    params = validate({"cam": {"method": method, "method_options": {"power": 2}}})
    built = build_method(method, build_classifier("tiny", "none", 2), params["cam"]["method_options"])
    assert type(built).__name__ == "PoweredGradCAM" and built.power == 2  # (imported anew by its dotted path)


@pytest.mark.parametrize("name", builtin_names(CAM_METHODS))
def test_builtin_method_refuses_any_option_naming_param_and_key(name):
    with pytest.raises(ParamsError, match=r"param cam\.method_options: .*no option 'power'"):
        validate({"cam": {"method": name, "method_options": {"power": 2}}})
    with pytest.raises(OptionsError, match=r"param cam\.method_options: .*no option 'power'"):
        build_method(name, build_classifier("tiny", "none", 2), {"power": 2})


def test_unknown_plugin_option_names_the_key_and_what_it_takes():
    with pytest.raises(ParamsError, match=r"param cam\.method_options: .*no option 'pwr'; it takes 'power'"):
        validate({"cam": {"method": "tests.test_contracts:PoweredGradCAM", "method_options": {"pwr": 2}}})


@pytest.mark.parametrize("value,match", [
    ({"a": {"b": 1}}, r"param cam\.method_options\.a: expected"),
    ({"a": [1, [2]]}, r"param cam\.method_options\.a: expected"),
    ({"a": float("nan")}, r"param cam\.method_options\.a: expected a finite"),
    ({1: 2}, r"param cam\.method_options: option names must be identifiers"),
    ([1, 2], r"param cam\.method_options: expected dict"),
])
def test_method_options_must_map_names_to_yaml_scalars_or_lists(value, match):
    with pytest.raises(ParamsError, match=match):
        validate({"cam": {"method_options": value}})


def test_mode_options_reach_the_seed_maker_and_builtins_refuse_them():
    mode = "tests.test_contracts:MarginSeeds"
    crf = validate({"crf": {"mode": mode, "mode_options": {"margin": 3}}})["crf"]
    assert seed_maker(crf).margin == 3
    with pytest.raises(ParamsError, match=r"param crf\.mode_options: .*no option 'margin'"):
        validate({"crf": {"mode": "irnet", "mode_options": {"margin": 3}}})
    with pytest.raises(OptionsError, match=r"param crf\.mode_options: .*no option 'margin'"):
        seed_maker(dict(preset("tiny")["crf"], mode="irnet", mode_options={"margin": 3}))

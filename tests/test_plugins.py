"""Plugins: the example CAM method in examples/ runs through the make_cam stage code, found both
by an entry point in group wsss.plugins and by a dotted path in params."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.cam import CamMethod, CamOutput
from pipeline.cam.run import make_cam_store
from pipeline.presets import preset
from pipeline.datasets import PreparedData
from pipeline.models.classifier import build_classifier
from pipeline.prepare import prepare_dataset
from pipeline.registry import CAM_METHODS, REFINERS, RegistryError, load_dotted
from pipeline.store import Store

PLUGIN_SRC = Path(__file__).resolve().parents[1] / "examples" / "wsss_cam_plugin" / "src"
torch.set_num_threads(1)


@pytest.fixture
def plugin_on_path(tmp_path, monkeypatch):
    """The example package importable, and advertised by an installed-looking dist-info."""
    monkeypatch.syspath_prepend(str(PLUGIN_SRC))
    dist = tmp_path / "site" / "wsss_cam_plugin-0.1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: wsss-cam-plugin\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text("[wsss.plugins]\ncam_method.layercam = wsss_cam_plugin:LayerCAM\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    yield
    sys.modules.pop("wsss_cam_plugin", None)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    params = preset("tiny")
    params["data"].update(demo_num_train=6, demo_num_val=2)
    out = tmp_path_factory.mktemp("prep") / "prepared"
    prepare_dataset(params["data"], out, shard_images=4)
    return params, PreparedData(params["data"], out)


def test_entry_point_plugin_is_listed_and_resolved(plugin_on_path):
    assert "layercam" in CAM_METHODS.names()
    assert CAM_METHODS.get("layercam").__name__ == "LayerCAM"


@pytest.mark.parametrize("name", ["layercam", "wsss_cam_plugin:LayerCAM"])
def test_example_plugin_runs_through_make_cam(plugin_on_path, prepared, tmp_path, name):
    params, data = prepared
    params = {k: dict(v) for k, v in params.items()}
    params["cam"].update(method=name, scales=[1.0], num_workers=0)
    torch.manual_seed(0)
    model = build_classifier("tiny", "none", data.num_classes - 1).eval()
    meta = {"class_names": data.class_names, "backbone": "tiny"}
    path, _ = make_cam_store(data, model, meta, params, torch.device("cpu"), tmp_path / "cams.zarr", "digest")
    store = Store(path)
    assert store.attrs["method"] == name
    for i, image_id in enumerate(store.ids):
        cam = store.read("cam", i).astype(np.float32)
        labelled = np.asarray(data.labels(image_id)) - 1
        absent = np.setdiff1d(np.arange(cam.shape[0]), labelled)
        assert np.all(cam[absent] == 0)
        assert cam.max() <= 1.0 + 1e-3 and cam.min() >= 0


class PositiveWeightCAM(CamMethod):
    """LayerCAM written out for this classifier (GAP, then a 1x1 conv without bias): the gradient of
    logit c w.r.t. feature (d, y, x) is W[c, d] / (h w) at every position, so LayerCAM's map is
    ReLU(sum_d ReLU(W[c, d]) A[d, y, x]) / (h w): plain CAM with the negative weights dropped."""

    name = "test_positive_weight_cam"

    def compute(self, features, labels):
        feats = features.float()
        weight = torch.relu(self.model.classifier.weight.float())
        maps = torch.relu(F.conv2d(feats, weight)) / (feats.shape[-2] * feats.shape[-1])
        return CamOutput(maps * labels[:, :, None, None], self.model.head(feats).float())


if PositiveWeightCAM.name not in CAM_METHODS._items:
    CAM_METHODS.register(PositiveWeightCAM.name)(PositiveWeightCAM)


def test_layercam_compute_is_its_own_formula_not_plain_cam(plugin_on_path):
    from wsss_cam_plugin import LayerCAM

    torch.manual_seed(0)
    model = build_classifier("tiny", "none", 4).eval()
    x = torch.randn(2, 3, 40, 56)
    labels = torch.tensor([[True, False, True, False], [False, True, True, True]])
    with torch.no_grad():
        feats = model.features(x)
    out = LayerCAM(model).compute(feats, labels)
    # independent: ReLU(sum_d ReLU(W[c, d]) / (h w) * A[d]) per labelled class, 0 for the others
    w = model.classifier.weight.detach()[:, :, 0, 0].numpy()
    a = feats.numpy()
    hw = a.shape[-2] * a.shape[-1]
    expect = np.maximum(np.einsum("cd,bdyx->bcyx", np.maximum(w, 0) / hw, a), 0) * labels.numpy()[:, :, None, None]
    np.testing.assert_allclose(out.maps.numpy(), expect, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(out.logits.numpy(), model.head(feats).detach().numpy(), rtol=1e-5, atol=1e-6)
    # and it is not plain CAM: the max-normalised maps differ clearly for labelled classes
    plain = np.maximum(np.einsum("cd,bdyx->bcyx", w, a), 0)
    assert (w < 0).any() and (w > 0).any()
    for b, c in zip(*np.nonzero(labels.numpy())):
        ours, cam = expect[b, c] / expect[b, c].max(), plain[b, c] / plain[b, c].max()
        assert np.abs(ours - cam).max() > 0.05


def test_plugin_cam_store_follows_layercam_not_plain_cam(plugin_on_path, prepared, tmp_path):
    """Through make_cam: the plugin's store equals the store of the formula above (same multi-scale
    and flip merging) and differs from plain CAM's store."""
    params, data = prepared
    params = {k: dict(v) for k, v in params.items()}
    torch.manual_seed(0)
    model = build_classifier("tiny", "none", data.num_classes - 1).eval()
    meta = {"class_names": data.class_names, "backbone": "tiny"}
    cams = {}
    for method in ("wsss_cam_plugin:LayerCAM", PositiveWeightCAM.name, "cam"):
        params["cam"].update(method=method, scales=[1.0], num_workers=0)
        path, _ = make_cam_store(data, model, meta, params, torch.device("cpu"), tmp_path / f"{len(cams)}.zarr", "d")
        store = Store(path)
        cams[method] = [store.read("cam", i).astype(np.float32) for i in range(len(store.ids))]
    plugin, formula, plain = cams.values()
    biggest = 0.0
    for p, f, c in zip(plugin, formula, plain):
        np.testing.assert_allclose(p, f, atol=2e-3)  # float16 store
        biggest = max(biggest, float(np.abs(p - c).max()))
    assert biggest > 0.1


def test_unknown_plugin_name_lists_what_is_known():
    with pytest.raises(RegistryError, match="unknown cam_method 'nosuch'.*gradcam"):
        CAM_METHODS.get("nosuch")


def test_bad_dotted_path_names_the_module():
    with pytest.raises(RegistryError, match="no_such_module"):
        load_dotted("no_such_module:Thing")


def test_refiner_registry_holds_both_crf_modes():

    assert {"affinitynet", "irnet"} <= set(REFINERS.names())


def test_the_wsss_command_finds_plugin_modules_in_the_workspace_as_dvc_repro_does(tmp_path):
    """`dvc repro` runs `python -m stages.<name>` in the workspace, so `cam.method: wsplug:MyCAM` with
    wsplug.py in the workspace root imports; the `wsss` console script must find it too."""
    import subprocess
    import sys
    from pathlib import Path

    from pipeline.config import defaults, render_params

    (tmp_path / "wsplug.py").write_text("from pipeline.cam.methods import ClassActivationMap\n\n\n"
                                        "class MyCAM(ClassActivationMap):\n    pass\n")
    repo = Path(__file__).resolve().parents[1]
    params = defaults()
    params["cam"]["method"] = "wsplug:MyCAM"  # not validated here: this process does not have the workspace on its path
    (tmp_path / "params.yaml").write_text(render_params(params))
    wsss = Path(sys.executable).parent / "wsss"
    res = subprocess.run([str(wsss), "deps", "make_cam", "--root", str(repo)], cwd=tmp_path, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr
    assert "wsplug.py  # plugin named in params.yaml" in res.stdout

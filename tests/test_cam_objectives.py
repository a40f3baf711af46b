"""CAM training objectives (cam.training): SEAM's equivariant regularisation against hand-computed
values, and that choosing it changes what the classifier learns."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.cam.objectives import (PlainObjective, SeamObjective, SubCategoryObjective, build_objective,
                                     equivariance_loss, kmeans, max_normalised)
from pipeline.cam.train import ClassificationSet, train_classifier
from pipeline.config import ParamsError, validate
from pipeline.presets import preset
from pipeline.datasets import PreparedData
from pipeline.models.classifier import build_classifier
from pipeline.prepare import prepare_dataset


def test_max_normalised_zeroes_absent_classes_and_scales_each_map_to_one():
    cams = torch.tensor([[[[2.0, -1.0], [1.0, 0.0]], [[4.0, 4.0], [4.0, 4.0]]]])
    out = max_normalised(cams, torch.tensor([[1.0, 0.0]]))
    np.testing.assert_allclose(out[0, 0].numpy(), [[1.0, 0.0], [0.5, 0.0]], atol=1e-5)
    np.testing.assert_allclose(out[0, 1].numpy(), 0.0)


def test_equivariance_loss_by_hand():
    y = torch.tensor([[1.0, 1.0]])
    peak = torch.tensor([[[[2.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]]]])
    flat = torch.tensor([[[[3.0, 3.0], [3.0, 3.0]], [[1.0, 1.0], [1.0, 1.0]]]])
    # channel 0: |[1,0,0,0] - [1,1,1,1]| -> mean 0.75; channel 1 equal -> 0; mean over both channels 0.375
    assert equivariance_loss(peak, flat, y).item() == pytest.approx(0.375, abs=1e-4)
    # a class that is not in the image does not count
    assert equivariance_loss(peak, flat, torch.tensor([[0.0, 1.0]])).item() == pytest.approx(0.0, abs=1e-6)
    # maps that commute with the rescaling: a constant map downscaled 4x2 -> 2x1
    const = torch.full((1, 2, 4, 2), 5.0)
    assert equivariance_loss(const, torch.full((1, 2, 2, 1), 0.7), y).item() == pytest.approx(0.0, abs=1e-4)


def test_seam_loss_is_the_mean_classification_loss_plus_a_nonzero_equivariance_term():
    torch.manual_seed(0)
    model = build_classifier("tiny", "none", 3).eval()
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    seam = SeamObjective(model, scale=0.5, weight=2.0)
    loss = seam(x, y)
    assert seam.last["equivariance"] > 1e-3
    x2 = torch.nn.functional.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=True)
    plain = PlainObjective(model)
    expected = (plain(x, y) + plain(x2, y)) / 2 + 2.0 * seam.last["equivariance"]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert SeamObjective(model, scale=0.5, weight=0.0)(x, y).item() == pytest.approx(((plain(x, y) + plain(x2, y)) / 2).item(), rel=1e-5)


def test_objectives_resolve_by_name_and_bad_settings_name_the_param():
    model = build_classifier("tiny", "none", 2)
    assert isinstance(build_objective("plain", model), PlainObjective)
    assert isinstance(build_objective("seam", model, {"scale": 0.25}), SeamObjective)
    with pytest.raises(ValueError, match="cam.training_options"):
        SeamObjective(model, scale=1.0)
    params = preset("tiny")
    params["cam"]["training"] = "seem"
    with pytest.raises(ParamsError, match="cam.training"):
        validate(params)
    params["cam"].update(training="seam", training_options={"scales": 0.3})
    with pytest.raises(ParamsError, match="cam.training_options"):
        validate(params)


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    params = preset("tiny")
    params["data"].update(demo_num_train=8, demo_num_val=2)
    out = tmp_path_factory.mktemp("objectives") / "prepared"
    prepare_dataset(params["data"], out, shard_images=4)
    prepared = PreparedData(params["data"], out)
    ids = prepared.ids("train")
    ds = ClassificationSet(prepared.image, ids, [prepared.label_vector(i) for i in ids], 32, 0.8, 1.2, seed=3)
    return ds, params, prepared.num_classes - 1


def test_seam_training_changes_the_learned_cams(tiny_set):
    ds, params, k = tiny_set
    cam = dict(params["cam"], epochs=1, batch_size=4, crop_size=32)
    plain, _ = train_classifier(ds, cam, k, torch.device("cpu"), 3)
    seam, hist = train_classifier(ds, dict(cam, training="seam", training_options={"scale": 0.5}), k,
                                  torch.device("cpu"), 3)
    assert hist[0]["loss"] > 0
    x = ds[(0, 0)]["image"][None]
    with torch.no_grad():
        a, b = plain.cam(plain.features(x)), seam.cam(seam.features(x))
    assert (a - b).abs().max().item() > 1e-4


class Interrupted(Exception):
    pass


def test_kmeans_finds_separated_clusters():
    rng = np.random.default_rng(0)
    points = np.concatenate([rng.normal(0, 0.1, (10, 3)), rng.normal(5, 0.1, (7, 3))])
    ids = kmeans(points, 2, seed=1)
    assert len(set(ids[:10])) == 1 and len(set(ids[10:])) == 1 and ids[0] != ids[10]
    assert kmeans(points[:1], 5, seed=0).tolist() == [0]  # fewer points than clusters


def test_sccam_clusters_each_class_into_one_sub_category_per_image(tiny_set):
    ds, params, k = tiny_set
    model = build_classifier("tiny", "none", k)
    objective = SubCategoryObjective(model, k=2, weight=5.0, rounds=2)
    state = objective.setup(ds)
    x, y, index = ds[(0, 0)]["image"][None], torch.from_numpy(ds.labels[0])[None], torch.tensor([0])
    assert objective.round_of(0, 4) == 0 and objective.round_of(2, 4) == 1
    objective.start_epoch(0, 4, torch.device("cpu"))
    assert int(state.round) == 0 and state.targets.sum() == 0
    plain_loss = objective(x, y, index).item()  # round 0: image labels only
    assert plain_loss == pytest.approx(PlainObjective(model)(x, y).item(), rel=1e-6)
    objective.start_epoch(2, 4, torch.device("cpu"))
    assert int(state.round) == 1
    targets = state.targets.numpy().reshape(len(ds), k, 2)
    labels = np.stack(ds.labels) > 0
    np.testing.assert_array_equal(targets.sum(2), labels.astype(np.float32))  # one cluster per (image, class)
    assert objective(x, y, index).item() > plain_loss


def test_sccam_training_changes_the_cams_and_resumes_to_the_same_weights(tiny_set, tmp_path):
    ds, params, k = tiny_set
    cam = dict(params["cam"], epochs=4, batch_size=4, crop_size=32)
    sccam = dict(cam, training="sccam", training_options={"k": 2, "rounds": 2})
    plain, _ = train_classifier(ds, cam, k, torch.device("cpu"), 3)
    straight, _ = train_classifier(ds, sccam, k, torch.device("cpu"), 3)
    assert set(straight.state_dict()) == set(plain.state_dict())  # the sub-category head is not kept
    assert any(not torch.equal(plain.state_dict()[n], v) for n, v in straight.state_dict().items())

    def crash(epoch, loss):
        if epoch == 2:  # after the first epoch with sub-categories (epochs 2 and 3 are round 1)
            raise Interrupted

    resume = tmp_path / "resume.pt"
    with pytest.raises(Interrupted):
        train_classifier(ds, sccam, k, torch.device("cpu"), 3, resume_path=resume, on_epoch_end=crash)
    resumed, hist = train_classifier(ds, sccam, k, torch.device("cpu"), 3, resume_path=resume)
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4]
    for name, v in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], v, msg=name)

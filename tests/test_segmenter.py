"""The final segmenter: shapes, loss with 255, checkpoints, and that it learns a toy dataset."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.presets import preset
from pipeline.metrics import ConfusionMatrix
from pipeline.labels import IGNORE_INDEX
from pipeline.models.segmenter import Segmenter, build_segmenter, load_segmenter, save_segmenter
from pipeline.augment import normalise
from pipeline.segment import (SegTrainSet, crf_refine, mask_source, predict_mask, predict_probs, saliency_loss,
                              saliency_source, segmentation_loss, train_segmenter)


def _seg(**kw):
    seg = preset("tiny")["seg"]
    seg.update(kw)
    return seg


def test_logits_have_the_input_size_for_odd_sizes():
    torch.manual_seed(0)
    model = Segmenter(4, "tiny", rates=(1, 2), channels=16).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 37, 53))
    assert out.shape == (2, 4, 37, 53)


def test_loss_skips_255_and_is_zero_when_everything_is_ignored():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    target = torch.full((1, 4, 4), IGNORE_INDEX, dtype=torch.long)
    loss = segmentation_loss(logits, target)
    assert loss.item() == 0.0 and torch.isfinite(loss)
    target[0, 0, 0] = 2
    full = torch.nn.functional.cross_entropy(logits[:, :, :1, :1], target[:, :1, :1])
    assert torch.allclose(segmentation_loss(logits, target), full)


def test_predict_probs_sum_to_one_with_scales_and_flip():
    torch.manual_seed(0)
    model = Segmenter(3, "tiny", rates=(1,), channels=8).eval()
    img = np.random.default_rng(0).integers(0, 255, (30, 41, 3), dtype=np.uint8)
    p = predict_probs(model, img, torch.device("cpu"), scales=(1.0, 0.5, 1.5), flip=True)
    assert p.shape == (3, 30, 41)
    np.testing.assert_allclose(p.sum(0), 1.0, atol=1e-5)


class RampAndRedModel(torch.nn.Module):
    """Two logits per pixel: 0, and 3 * x / (w - 1) + 0.5 * (normalised red): depends on the position
    (so a prediction not flipped back shows) and on the content (so an input not flipped shows)."""

    def forward(self, x):
        b, _, h, w = x.shape
        ramp = torch.linspace(0.0, 1.0, w).expand(b, h, w)
        fg = 3.0 * ramp + 0.5 * x[:, 0]
        return torch.stack([torch.zeros_like(fg), fg], 1)


class InputHeightModel(torch.nn.Module):
    """Two constant logit maps: 0 and (input height) / 10, so each scale's prediction is known exactly."""

    def forward(self, x):
        b, _, h, w = x.shape
        return torch.stack([torch.zeros(b, h, w), torch.full((b, h, w), h / 10.0)], 1)


def _sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def test_predict_probs_flip_averages_with_the_flipped_back_prediction():
    img = np.random.default_rng(3).integers(0, 256, (9, 13, 3), dtype=np.uint8)
    h, w = img.shape[:2]
    red = (img[..., 0].astype(np.float64) / 255 - 0.485) / 0.229  # ImageNet normalisation, red channel
    x = np.arange(w) / (w - 1)
    plain = _sigmoid(3.0 * x + 0.5 * red)  # p(class 1) without flip
    # flipped image: at column j the model sees red[:, w-1-j] and ramp x[j]; flipped back, column j
    # holds ramp x[w-1-j] and red[:, j]
    flipped_back = _sigmoid(3.0 * x[::-1] + 0.5 * red)
    p = predict_probs(RampAndRedModel(), img, torch.device("cpu"), scales=(1.0,), flip=False)
    np.testing.assert_allclose(p[1], plain, atol=1e-5)
    p = predict_probs(RampAndRedModel(), img, torch.device("cpu"), scales=(1.0,), flip=True)
    np.testing.assert_allclose(p[1], (plain + flipped_back) / 2, atol=1e-5)
    np.testing.assert_allclose(p[0], 1 - (plain + flipped_back) / 2, atol=1e-5)


@pytest.mark.parametrize("flip", [False, True])
def test_predict_probs_averages_the_scales(flip):
    img = np.zeros((30, 41, 3), np.uint8)
    # input heights 30, 15, 45 (round(30 * s)): p(class 1) = sigmoid(height / 10) at each scale
    expect = np.mean([_sigmoid(3.0), _sigmoid(1.5), _sigmoid(4.5)])
    p = predict_probs(InputHeightModel(), img, torch.device("cpu"), scales=(1.0, 0.5, 1.5), flip=flip)
    assert p.shape == (2, 30, 41)
    np.testing.assert_allclose(p[1], expect, atol=1e-6)
    np.testing.assert_allclose(p[0], 1 - expect, atol=1e-6)


def test_checkpoint_round_trip_gives_the_same_predictions(tmp_path):
    torch.manual_seed(0)
    seg = _seg(aspp_channels=8)
    model = build_segmenter(3, seg).eval()
    save_segmenter(tmp_path / "seg.pt", model, seg, ["background", "a", "b"], "pseudo", [{"epoch": 1, "loss": 1.0}])
    loaded, ckpt = load_segmenter(tmp_path / "seg.pt", torch.device("cpu"))
    assert ckpt["labels"] == "pseudo" and ckpt["class_names"] == ["background", "a", "b"]
    img = np.random.default_rng(1).integers(0, 255, (24, 24, 3), dtype=np.uint8)
    np.testing.assert_array_equal(predict_mask(model, img, torch.device("cpu"), seg),
                                  predict_mask(loaded, img, torch.device("cpu"), seg))


def test_decoder_reads_the_stride_4_map_and_round_trips(tmp_path):
    torch.manual_seed(0)
    seg = _seg(aspp_channels=8, decoder=True)
    model = build_segmenter(3, seg).eval()
    assert model.decoder and all(isinstance(b.classifier, torch.nn.Identity) for b in model.head.branches)
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        out = model(x)
        # the logits change when only the shallow (stride-4) map changes: the decoder is in the path
        low = model.backbone(x)
        changed = model.head.decoder(low[0] + 1.0, model.head.parts(low[-1])[1])
        plain = model.head.decoder(low[0], model.head.parts(low[-1])[1])
    assert out.shape == (1, 3, 40, 40)
    assert not torch.allclose(changed, plain)
    save_segmenter(tmp_path / "seg.pt", model, seg, ["background", "a", "b"], "pseudo", [{"epoch": 1, "loss": 1.0}])
    loaded, ckpt = load_segmenter(tmp_path / "seg.pt", torch.device("cpu"))
    assert ckpt["arch"]["decoder"] is True and loaded.decoder
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), out)


def test_checkpoint_from_before_the_decoder_param_loads_without_one(tmp_path):
    torch.manual_seed(0)
    seg = _seg(aspp_channels=8)
    model = build_segmenter(3, seg).eval()
    save_segmenter(tmp_path / "seg.pt", model, seg, ["background", "a", "b"], "pseudo", [])
    ckpt = torch.load(tmp_path / "seg.pt", weights_only=True)
    del ckpt["arch"]["decoder"]
    torch.save(ckpt, tmp_path / "old.pt")
    loaded, _ = load_segmenter(tmp_path / "old.pt", torch.device("cpu"))
    assert not loaded.decoder


def test_classifier_weights_start_the_backbone_from_the_cam_classifier(tmp_path):
    from pipeline.models.classifier import build_classifier, save_classifier

    torch.manual_seed(0)
    clf = build_classifier("tiny", "none", 2)
    with torch.no_grad():
        for p in clf.parameters():
            p.add_(torch.randn_like(p))  # unlike any fresh initialisation
    save_classifier(tmp_path / "classifier.pt", clf, "tiny", ["a", "b"], {})
    seg = _seg(weights="classifier", aspp_channels=8)
    model = build_segmenter(3, seg, tmp_path / "classifier.pt")
    for key, value in clf.backbone.state_dict().items():
        torch.testing.assert_close(model.backbone.state_dict()[key], value, rtol=0, atol=0, msg=key)
    fresh = build_segmenter(3, _seg(aspp_channels=8))
    assert any(not torch.equal(fresh.backbone.state_dict()[k], v) for k, v in clf.backbone.state_dict().items())
    with pytest.raises(FileNotFoundError, match="seg.weights=classifier"):
        build_segmenter(3, seg, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="seg.backbone is 'resnet18'"):
        build_segmenter(3, _seg(weights="classifier", backbone="resnet18"), tmp_path / "classifier.pt")


def test_classifier_weights_need_the_cam_backbone():
    from pipeline.config import ParamsError, validate

    params = preset("tiny")
    params["seg"].update(weights="classifier", backbone="resnet18")
    with pytest.raises(ParamsError, match="seg.weights"):
        validate(params)


def test_gt_labels_need_ground_truth_for_every_training_image():
    class NoGT:
        def has_gt(self, image_id):
            return False

    with pytest.raises(ValueError, match="seg.labels=gt"):
        mask_source("gt", NoGT(), "unused", ["a"])


class ToyData:
    """Grey noise with one bright square (class 1) or one dark disk (class 2) per image."""

    num_classes = 3

    def __init__(self, n: int, size: int = 40, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.images, self.masks = {}, {}
        yy, xx = np.mgrid[:size, :size]
        for k in range(n):
            img = rng.integers(90, 150, (size, size, 3)).astype(np.uint8)
            mask = np.zeros((size, size), np.uint8)
            cls = 1 + k % 2
            r = int(rng.integers(6, 11))
            cy, cx = rng.integers(r, size - r, 2)
            region = (abs(yy - cy) <= r) & (abs(xx - cx) <= r) if cls == 1 else (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            img[region] = (235, 235, 235) if cls == 1 else (20, 20, 20)
            mask[region] = cls
            self.images[f"t{k}"], self.masks[f"t{k}"] = img, mask

    def ids(self):
        return list(self.images)

    def image(self, image_id):
        return self.images[image_id]


def test_segmenter_learns_a_toy_dataset():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    train, val = ToyData(32, seed=0), ToyData(12, seed=1)
    seg = _seg(epochs=12, batch_size=8, crop_size=40, lr=0.02, aspp_channels=16, aspp_rates=[1, 2], scale_min=0.9,
               scale_max=1.1)
    masks = train.masks.copy()
    for m in masks.values():  # unsure pseudo-label edges: 255 must not hurt learning
        m[0, :] = IGNORE_INDEX
    ds = SegTrainSet(train, train.ids(), masks.__getitem__, seg["crop_size"], seg["scale_min"], seg["scale_max"])
    model = build_segmenter(3, seg)
    history = train_segmenter(model, ds, seg, torch.device("cpu"))
    assert history[-1]["loss"] < history[0]["loss"]
    model.eval()
    cm = ConfusionMatrix(3)
    for i in val.ids():
        cm.update(predict_mask(model, val.image(i), torch.device("cpu"), seg), val.masks[i])
    # chance (all background) scores ~1/3 mIoU here; a learned model separates both shapes
    assert cm.miou() > 0.6, cm.summary(["background", "square", "disk"])


def test_crf_refine_keeps_shape_and_sharpens_to_colour_edges():
    crf = preset("tiny")["crf"]
    img = np.zeros((20, 20, 3), np.uint8)
    img[:, 10:] = 255
    probs = np.full((2, 20, 20), 0.5, np.float32)
    probs[1, :, 12:], probs[0, :, 12:] = 0.9, 0.1  # confident right part, unsure stripe 10..11
    probs[0, :, :8], probs[1, :, :8] = 0.9, 0.1
    q = crf_refine(img, probs, crf)
    assert q.shape == (2, 20, 20)
    np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-4)
    assert (q.argmax(0)[:, 10:] == 1).all() and (q.argmax(0)[:, :8] == 0).all()


@pytest.mark.parametrize("num_workers", [0, 1])  # the demo trains with one loader worker
def test_interrupted_training_resumes_to_the_same_weights(tmp_path, caplog, num_workers):
    torch.set_num_threads(1)
    data = ToyData(8, seed=0)
    seg = _seg(epochs=3, batch_size=4, crop_size=32, aspp_channels=8, aspp_rates=[1, 2], dropout=0.5,
               num_workers=num_workers)

    class Killed(Exception):
        pass

    class CrashingSet(SegTrainSet):  # the run dies as epoch 3 starts, after epochs 1-2 were saved
        def set_epoch(self, epoch):
            if epoch == 2:
                raise Killed
            super().set_epoch(epoch)

    def run(dataset_cls, resume=None, labels="toy-masks"):
        torch.manual_seed(0)
        ds = dataset_cls(data, data.ids(), data.masks.__getitem__, seg["crop_size"], 0.8, 1.2, seed=1)
        model = build_segmenter(3, seg)
        return model, train_segmenter(model, ds, seg, torch.device("cpu"), 1, resume, {"labels": labels})

    straight, _ = run(SegTrainSet)
    resume = tmp_path / "resume.pt"
    with pytest.raises(Killed):
        run(CrashingSet, resume)
    assert torch.load(resume, weights_only=True)["epoch"] == 2
    resumed, history = run(SegTrainSet, resume)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    for name, v in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], v, msg=name)
    # other training labels: the resume file (now at epoch 3) is ignored and training starts over
    with caplog.at_level("INFO", logger="wsss"):
        run(SegTrainSet, resume, labels="other-masks")
    assert "made from other labels" in caplog.text and "train_seg epoch 1/3" in caplog.text


def test_saliency_loss_by_hand_over_the_valid_pixels_only():
    logits = torch.tensor([[[[0.0, 2.0], [-1.0, 5.0]]]], requires_grad=True)
    target = torch.tensor([[[1.0, 0.0], [0.25, 1.0]]])
    valid = torch.tensor([[[True, True], [True, False]]])
    bce = lambda z, t: -(t * np.log(1 / (1 + np.exp(-z))) + (1 - t) * np.log(1 - 1 / (1 + np.exp(-z))))
    expected = (bce(0.0, 1.0) + bce(2.0, 0.0) + bce(-1.0, 0.25)) / 3
    assert float(saliency_loss(logits, target, valid).detach()) == pytest.approx(expected, rel=1e-5)
    none = saliency_loss(logits, target, torch.zeros_like(valid))
    none.backward()
    assert float(none) == 0.0 and logits.grad is not None


def test_saliency_crops_follow_the_mask_and_padding_is_not_valid():
    data = ToyData(4, size=40)
    sal = {i: (m > 0).astype(np.float32) for i, m in data.masks.items()}
    sal["t3"] = None  # a map the source skipped
    ds = SegTrainSet(data, data.ids(), data.masks.__getitem__, 56, 0.8, 1.2, saliency=sal.__getitem__)
    for k in range(3):
        item = ds[k]
        valid, mask = item["saliency_valid"].numpy(), item["mask"].numpy()
        assert not valid.all() and valid.any()  # a 56-px crop of a <=48-px image is padded
        assert (mask[~valid] == IGNORE_INDEX).all()
        np.testing.assert_array_equal(item["saliency"].numpy()[valid], (mask[valid] > 0).astype(np.float32))
    assert not ds[3]["saliency_valid"].numpy().any()
    assert set(SegTrainSet(data, data.ids(), data.masks.__getitem__, 32, 1.0, 1.0)[0]) == {"image", "mask"}


def test_joint_saliency_head_learns_the_maps_and_changes_the_segmenter():
    """Not a no-op: with seg.saliency_weight the head learns the maps (salient pixels score higher)
    and the shared backbone ends elsewhere than without it."""
    torch.set_num_threads(1)
    train = ToyData(32, seed=0)
    sal = {i: (m > 0).astype(np.float32) for i, m in train.masks.items()}
    trained = {}
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        seg = _seg(epochs=12, batch_size=8, crop_size=40, lr=0.02, aspp_channels=16, aspp_rates=[1, 2],
                   scale_min=0.9, scale_max=1.1, saliency_weight=weight)
        ds = SegTrainSet(train, train.ids(), train.masks.__getitem__, 40, 0.9, 1.1, saliency=sal.__getitem__)
        model = build_segmenter(3, seg)
        assert model.saliency_head == (weight > 0)
        train_segmenter(model, ds, seg, torch.device("cpu"))
        trained[weight] = model.eval()
    with torch.no_grad():
        x = torch.stack([normalise(train.image(i)) for i in train.ids()])
        _, sal_logits = trained[1.0].forward_with_saliency(x)
        fg = torch.from_numpy(np.stack([train.masks[i] > 0 for i in train.ids()]))
        prob = sal_logits[:, 0].sigmoid()
        assert prob[fg].mean() > prob[~fg].mean() + 0.2, (prob[fg].mean(), prob[~fg].mean())
        assert trained[0.0].forward_with_saliency(x)[1] is None
    a, b = (dict(m.backbone.named_parameters()) for m in (trained[0.0], trained[1.0]))
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].requires_grad)


def test_saliency_weight_needs_the_saliency_store(tmp_path):
    with pytest.raises(FileNotFoundError, match="seg.saliency_weight.*saliency maps are not there"):
        saliency_source(tmp_path / "saliency.zarr", ["a"])
    seg = _seg(saliency_weight=0.5)
    data = ToyData(2)
    ds = SegTrainSet(data, data.ids(), data.masks.__getitem__, 32, 1.0, 1.0)
    with pytest.raises(ValueError, match="seg.saliency_weight"):
        train_segmenter(build_segmenter(3, seg), ds, seg, torch.device("cpu"))

"""IRNet-style instance pseudo masks: the displacement loss by hand, centres from a displacement
field, two objects of one class kept apart, a trained field that finds two objects, and the COCO
instance export read back by pycocotools (COCOeval scores it as a perfect match of itself)."""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch

from pipeline.presets import preset
from pipeline.datasets import PreparedData
from pipeline.export import ExportError, read_export, run_export
from pipeline.labels import IGNORE_INDEX
from pipeline.models.affinity import affinity_checkpoint, build_affinity_net, displacement_loss, load_affinity_net
from pipeline.models.pairs import pair_labels, pair_offsets
from pipeline.prepare import prepare_dataset
from pipeline.refine.affinity_training import DISPLACEMENT_LR_MULT
from pipeline.refine.instances import (centre_clusters, converge, instance_candidates, instance_masks,
                                       instances_from_scores)
from pipeline.store import ArraySpec, write_store

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _field_to(centres, labels):
    """(2, h, w) displacement from each cell to the centre of its label (label 0: zero)."""
    h, w = labels.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    disp = np.zeros((2, h, w), np.float32)
    for k, (cy, cx) in centres.items():
        m = labels == k
        disp[0][m], disp[1][m] = cy - ys[m], cx - xs[m]
    return disp


def test_displacement_loss_by_hand():
    offsets = [(0, 1)]
    seeds = torch.tensor([[[1, 1, 1, 0, 0]]])
    bg, fg, neg = pair_labels(seeds, offsets)  # fg pairs (x0,x1), (x1,x2); bg pair (x3,x4)
    exact = torch.zeros(1, 2, 1, 5)
    exact[0, 1] = torch.tensor([1.0, 0.0, -1.0, 0.0, 0.0])  # cells 0..2 point at x = 1
    assert displacement_loss(exact, bg, fg, offsets).item() == pytest.approx(0.0)
    # a zero field: each fg pair misses D(i) - D(j) = (0, 1) by 1 -> mean 1; bg pair exact
    assert displacement_loss(torch.zeros(1, 2, 1, 5), bg, fg, offsets).item() == pytest.approx(1.0)
    # background cells that disagree by (0.5, 0.25): L1 0.75 on the one bg pair
    skew = exact.clone()
    skew[0, 0, 0, 4], skew[0, 1, 0, 4] = 0.5, 0.25
    assert displacement_loss(skew, bg, fg, offsets).item() == pytest.approx(0.75)


def test_points_converge_to_their_centres_and_cluster_into_one_id_per_object():
    labels = np.zeros((10, 20), np.int64)
    labels[2:8, 1:8], labels[2:8, 12:19] = 1, 2
    disp = _field_to({1: (5, 4), 2: (5, 15)}, labels)
    points = converge(disp, 3)
    np.testing.assert_allclose(points[:, labels == 1].T, np.tile([5, 4], ((labels == 1).sum(), 1)))
    centres, n = centre_clusters(points, merge_radius=2)
    left, right = np.unique(centres[labels == 1]), np.unique(centres[labels == 2])
    assert len(left) == 1 and len(right) == 1 and left[0] != right[0]
    assert n == 2 and (centres[labels == 0] == 0).all()  # background points stay put: no centre


def _two_blobs():
    """A 40 x 80 image; class 3's CAM on two blobs at stride 4 (grid 10 x 20) and the field to their centres."""
    labels = np.zeros((10, 20), np.int64)
    labels[2:8, 1:8], labels[2:8, 12:19] = 1, 2
    cam = np.where(labels > 0, 0.9, 0.05).astype(np.float32)[None]
    return np.zeros((40, 80, 3), np.uint8), cam, _field_to({1: (5, 4), 2: (5, 15)}, labels), labels


def test_two_objects_of_one_class_become_two_instances():
    image, cam, disp, _ = _two_blobs()
    rw = {"enabled": False, "alpha": 4.0, "beta": 8.0, "logt": 2, "ignore_below": 0.0}
    inst = {"iterations": 10, "merge_radius": 2, "min_area": 0.001, "max_instances": 32}
    out = instance_masks(image, cam, 4, [3], rw, inst, None, disp, [], 4)
    ids = sorted(np.unique(out["instance"][out["instance"] > 0]))
    assert ids == [1, 2]
    assert set(np.unique(out["mask"])) == {0, 3}
    left, right = out["instance"][20, 16], out["instance"][20, 60]
    assert {left, right} == {1, 2}
    assert (out["instance"][:, :32] != right).all() and (out["instance"][:, 48:] != left).all()
    assert 0 < out["score"][20, 16] <= 1 and out["score"][0, 0] == 0
    # a field that learned nothing (all zero): the class's connected regions, one instance each
    flat = instance_masks(image, cam, 4, [3], rw, inst, None, np.zeros_like(disp), [], 4)
    assert sorted(np.unique(flat["instance"][flat["instance"] > 0])) == [1, 2]
    assert flat["instance"][20, 16] != flat["instance"][20, 60]
    # with the walk on (affinities 1 inside each blob and the background, 0 across their borders)
    offsets = pair_offsets(2)
    region = np.where(_two_blobs()[3] == 0, 0, _two_blobs()[3])
    aff = np.stack([(region == np.roll(np.roll(region, -dy, 0), -dx, 1)).astype(np.float32) for dy, dx in offsets])
    walked = instance_masks(image, cam, 4, [3], dict(rw, enabled=True), inst, torch.from_numpy(aff), disp, offsets, 4)
    assert sorted(np.unique(walked["instance"][walked["instance"] > 0])) == [1, 2]
    assert walked["instance"][20, 16] != walked["instance"][20, 60]


def test_candidates_are_capped_by_cam_mass_and_small_instances_dropped():
    _, cam, disp, labels = _two_blobs()
    cam[0][labels == 2] = 0.6  # the right blob is weaker
    centres, _ = centre_clusters(converge(disp, 10), 2)
    maps, classes = instance_candidates(cam, centres, [3], alpha=4.0, max_instances=1)
    assert classes == [3] and maps.shape == (1, 10, 20)
    assert maps[0][labels == 1].min() > 0 and maps[0][labels == 2].max() == 0  # the stronger one kept
    scores = np.zeros((3, 4, 4), np.float32)
    scores[0] = 0.5
    scores[1, 0, 0] = scores[2, 1:, 1:] = 0.9
    out = instances_from_scores(scores, [3, 3], min_area=0.1)  # instance 1 has 1 px of 16 < 10 %
    assert sorted(np.unique(out["instance"])) == [0, 1] and (out["mask"][1:, 1:] == 3).all()
    assert out["mask"][0, 0] == IGNORE_INDEX and out["instance"][0, 0] == 0  # dropped: unsure, not background
    assert (out["mask"][0, 1:] == 0).all()
    scores[0, 1, 1] = scores[2, 1, 1] = 0.2  # top score below ignore_below: unsure, and the instance keeps id 1
    out = instances_from_scores(scores, [3, 3], min_area=0.1, ignore_below=0.3)
    assert out["mask"][1, 1] == IGNORE_INDEX and out["instance"][1, 1] == 0 and out["instance"][2, 2] == 1


def test_training_learns_a_field_that_separates_two_objects_of_one_class():
    torch.manual_seed(0)
    model, _ = build_affinity_net("tiny", "none", 4)
    x = torch.zeros(1, 3, 48, 96)
    x[:, 1, 8:40, 4:36] = 2.0
    x[:, 1, 8:40, 60:92] = 2.0
    seeds = torch.zeros(1, 12, 24, dtype=torch.long)
    seeds[:, 2:10, 1:9] = 1
    seeds[:, 2:10, 15:23] = 1
    offsets = pair_offsets(3)
    bg, fg, _ = pair_labels(seeds, offsets)
    # the optimiser train_aff gives the branch (demo lr 0.05 x DISPLACEMENT_LR_MULT, momentum 0.9)
    opt = torch.optim.SGD(model.displacement_head.parameters(), lr=0.05 * DISPLACEMENT_LR_MULT, momentum=0.9)
    model.train()
    first = None
    for _ in range(150):
        _, disp = model.relations(x, offsets)
        loss = displacement_loss(disp, bg, fg, offsets)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    assert all(p.grad is None or not p.grad.any() for p in model.backbone.parameters())  # detached features
    model.eval()
    with torch.no_grad():
        disp = model.relations(x, offsets)[1][0].numpy()
    centres, _ = centre_clusters(converge(disp, 100), 2)
    left, right = centres[2:10, 1:9], centres[2:10, 15:23]
    l_id, r_id = np.bincount(left.ravel()).argmax(), np.bincount(right.ravel()).argmax()
    assert l_id != r_id
    assert (left == l_id).mean() > 0.8 and (right == r_id).mean() > 0.8


class _Images:
    """The one method of a prepared dataset that set_displacement_mean reads."""

    def __init__(self, images):
        self.images = images

    def image(self, image_id):
        return self.images[image_id]


def test_the_fields_free_constant_is_measured_after_training_subtracted_and_saved(tmp_path):
    # the displacement loss sees only differences, so a constant added to the field costs nothing in
    # training; IRNet removes it after training with the field's mean over the training images
    from pipeline.models.affinity import save_affinity_net
    from pipeline.refine.affinity_training import set_displacement_mean

    torch.manual_seed(0)
    model, _ = build_affinity_net("tiny", "none", 4)
    rng = np.random.default_rng(0)
    images = _Images({f"i{k}": rng.integers(0, 256, (40 + 8 * k, 56, 3), dtype=np.uint8) for k in range(3)})
    offsets = pair_offsets(2)
    with torch.no_grad():
        model.displacement_head.mix[-1].bias.copy_(torch.tensor([-2.5, 0.75]))  # the drift left by training
    mean = set_displacement_mean(model, images, list(images.images), torch.device("cpu"))
    assert mean == pytest.approx([-2.5, 0.75], abs=1e-4)
    for image in images.images.values():
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
        with torch.no_grad():
            disp = model.relations(x, offsets)[1][0]
        assert disp.mean((1, 2)).abs().max() < 1e-4  # the field no longer drifts
    save_affinity_net(tmp_path / "a.pt", model, "tiny", radius=2)
    loaded = load_affinity_net(tmp_path / "a.pt")
    assert loaded.displacement_head.mean.tolist() == pytest.approx([-2.5, 0.75], abs=1e-4)
    assert loaded.has_displacement is True


def test_a_checkpoint_saved_before_the_field_mean_existed_still_gives_instances(tmp_path, caplog):
    from pipeline.checkpoint import save_checkpoint

    model, _ = build_affinity_net("tiny", "none", 4)
    ck = affinity_checkpoint(model, "tiny", radius=3)
    del ck["state_dict"]["displacement_head.mean"]
    save_checkpoint(tmp_path / "old.pt", ck)
    loaded = load_affinity_net(tmp_path / "old.pt")
    assert loaded.has_displacement is True
    assert loaded.displacement_head.mean.tolist() == [0.0, 0.0]
    assert "re-run the train_aff stage" in caplog.text


def test_a_checkpoint_without_the_displacement_branch_loads_for_affinities_but_not_instances(tmp_path):
    from pipeline.checkpoint import save_checkpoint
    from pipeline.refine.instances import make_instance_store

    model, _ = build_affinity_net("tiny", "none", 4)
    ck = affinity_checkpoint(model, "tiny", radius=3)
    ck["state_dict"] = {k: v for k, v in ck["state_dict"].items() if not k.startswith("displacement_head.")}
    save_checkpoint(tmp_path / "old.pt", ck)
    assert load_affinity_net(tmp_path / "old.pt").has_displacement is False
    with pytest.raises(ValueError, match="re-run the train_aff stage"):
        make_instance_store(tmp_path, preset("tiny"), tmp_path / "cams.zarr", tmp_path / "old.pt", tmp_path / "i.zarr")
    ck["state_dict"]["stray.weight"] = torch.zeros(1)
    save_checkpoint(tmp_path / "bad.pt", ck)
    with pytest.raises(ValueError, match="does not match"):
        load_affinity_net(tmp_path / "bad.pt")


@pytest.fixture(scope="module")
def instance_store(tmp_path_factory):
    """A tiny prepared demo and an instance store: image 0 holds two instances of class 2 and one of class 1."""
    root = tmp_path_factory.mktemp("instances")
    params = preset("tiny")
    prepare_dataset(params["data"], root / "prepared", shard_images=8)
    prepared = PreparedData(params["data"], root / "prepared")
    ids = prepared.ids("train")[:3]
    sizes = prepared.sizes(ids)

    def compute(idx):
        out = {"instance": [], "mask": [], "score": []}
        for i in idx:
            h, w = (int(v) for v in sizes[i])
            inst = np.zeros((h, w), np.uint16)
            mask = np.zeros((h, w), np.uint8)
            score = np.zeros((h, w), np.float32)
            if i == 0:
                for k, (cls, ys, xs, s) in enumerate([(2, slice(2, 10), slice(2, 10), 0.9), (2, slice(14, 22), slice(2, 12), 0.7),
                                                      (1, slice(2, 12), slice(16, 24), 0.5)], start=1):
                    inst[ys, xs], mask[ys, xs], score[ys, xs] = k, cls, s
            else:
                inst[1:6, 1:6], mask[1:6, 1:6], score[1:6, 1:6] = 1, 1, 1.0
            mask[-1, -1] = IGNORE_INDEX
            out["instance"].append(inst)
            out["mask"].append(mask)
            out["score"].append(score)
        return out

    specs = {"mask": ArraySpec("uint8", fill=IGNORE_INDEX), "instance": ArraySpec("uint16"), "score": ArraySpec("float32")}
    attrs = {"class_names": prepared.class_names, "split": "train", "method": "test"}
    write_store(root / "instances.zarr", ids, sizes, specs, attrs, compute, shard_images=8)
    write_store(root / "pseudo.zarr", ids, sizes, {"mask": specs["mask"]}, attrs,
                lambda idx: {"mask": [compute([i])["mask"][0] for i in idx]}, shard_images=8)
    return {"root": root, "params": params, "ids": ids, "compute": compute}


def test_coco_instance_export_round_trips_through_pycocotools_and_cocoeval(instance_store, tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    s = instance_store
    run_export(s["root"] / "pseudo.zarr", s["root"] / "prepared", s["params"]["data"], ["coco_instances"],
               tmp_path / "out", params=s["params"], progress=False, instances_store_path=s["root"] / "instances.zarr")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["format"] == "coco_instances" and manifest["source"]["store"].endswith("instances.zarr")
    path = tmp_path / "out" / manifest["files"]["annotations"]
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(path))
    first = [img_id for img_id, img in coco.imgs.items() if img["image_key"] == s["ids"][0]][0]
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[first]))
    assert sorted(a["category_id"] for a in anns) == [1, 2, 2]  # two instances of class 2 in one image
    assert sorted(a["score"] for a in anns) == [0.5, 0.7, 0.9]
    assert 0 not in coco.getCatIds()
    back = read_export(tmp_path / "out")
    for i, image_id in enumerate(s["ids"]):
        want = s["compute"]([i])["instance"][0]
        got = back[image_id]
        for k in np.unique(want[want > 0]):  # same partition of the pixels (ids may be renumbered)
            assert len(np.unique(got[want == k])) == 1 and (got[want == k] > 0).all()
        assert ((got > 0) == (want > 0)).all()
    # the annotations as detections against themselves: COCOeval scores a perfect match
    dets = json.loads(path.read_text())["annotations"]
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco, coco.loadRes([{k: a[k] for k in ("image_id", "category_id", "segmentation", "score")}
                                          for a in dets]), "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ev.stats[1] == pytest.approx(1.0)  # AP at IoU 0.5


def test_coco_instance_export_names_a_missing_instance_store(instance_store, tmp_path):
    s = instance_store
    with pytest.raises(ExportError, match="instances.zarr"):
        run_export(s["root"] / "pseudo.zarr", s["root"] / "prepared", s["params"]["data"], ["coco_instances"],
                   tmp_path / "out", params=s["params"], progress=False,
                   instances_store_path=tmp_path / "nowhere" / "instances.zarr")
    assert not (tmp_path / "out").exists()


def test_demo_instance_gt_is_kept_and_scores_a_perfect_store_at_ap_100(instance_store, tmp_path):
    from pipeline.refine.instances import instance_ap
    from pipeline.store import Store

    s = instance_store
    prepared = PreparedData(s["params"]["data"], s["root"] / "prepared")
    ids = prepared.ids("train")
    gts = {i: prepared.instance_gt(i) for i in ids}
    assert all(g is not None for g in gts.values())
    for i in ids:  # each GT instance is one class; instances cover exactly the objects
        g, sem = gts[i], prepared.gt(i)
        assert ((g > 0) == (sem > 0)).all()
        assert all(len(np.unique(sem[g == k])) == 1 for k in np.unique(g[g > 0]))

    def perfect(idx, merge=False):
        out = {"instance": [], "mask": [], "score": []}
        for j in idx:
            g = gts[ids[j]].astype(np.uint16)
            if merge:  # every object of the image as one instance of its first object's class
                g = (g > 0).astype(np.uint16)
            sem = prepared.gt(ids[j])
            mask = np.where(g > 0, sem[g > 0][0] if merge and (g > 0).any() else sem, 0).astype(np.uint8)
            out["instance"].append(g)
            out["mask"].append(mask)
            out["score"].append((g > 0).astype(np.float32))
        return out

    specs = {"mask": ArraySpec("uint8", fill=IGNORE_INDEX), "instance": ArraySpec("uint16"), "score": ArraySpec("float32")}
    write_store(tmp_path / "perfect.zarr", ids, prepared.sizes(ids), specs, {}, perfect, shard_images=8)
    q = instance_ap(prepared, Store(tmp_path / "perfect.zarr"))
    assert q["instance_gt_images"] == len(ids) and q["gt_instances"] >= len(ids)
    assert q["ap"] == pytest.approx(100.0) and q["ap50"] == pytest.approx(100.0)
    write_store(tmp_path / "merged.zarr", ids, prepared.sizes(ids), specs, {},
                lambda idx: perfect(idx, merge=True), shard_images=8)
    assert instance_ap(prepared, Store(tmp_path / "merged.zarr"))["ap50"] < 100.0


def test_voc_instance_masks_are_read_and_a_wrong_size_names_the_file(tmp_path):
    from PIL import Image

    from pipeline.datasets.demo import generate
    from pipeline.datasets.imageio import DatasetError

    ds = generate(tmp_path / "demo", seed=1, num_train=2, num_val=1, min_side=40, max_side=48, progress=False)
    image_id = ds.split_ids("train")[0]
    size = ds.load_image(image_id).shape[:2]
    inst = ds.load_instance_gt(image_id, size)
    assert inst.shape == size and inst.max() >= 1
    path = tmp_path / "demo" / "SegmentationObject" / f"{image_id}.png"
    Image.fromarray(np.zeros((5, 7), np.uint8)).save(path)
    with pytest.raises(DatasetError, match=str(path)):
        ds.load_instance_gt(image_id, size)
    path.unlink()
    assert ds.load_instance_gt(image_id, size) is None

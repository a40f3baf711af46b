"""Export: round trips, COCO decoding with pycocotools, safety, manifest contents."""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from pipeline.presets import preset
from pipeline.datasets import PreparedData
from pipeline.export import ExportError, read_coco, read_export, run_export, safe_member
from pipeline.prepare import prepare_dataset
from pipeline.labels import IGNORE_INDEX
from pipeline.store import ArraySpec, Store, write_store

# pycocotools (numpy 2) warns about __array__(copy=...) on every decode; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A tiny prepared demo and a pseudo store made from its GT with a 255 border and a wrong class patch."""
    root = tmp_path_factory.mktemp("export")
    params = preset("tiny")
    prepare_dataset(params["data"], root / "prepared", shard_images=8)
    prepared = PreparedData(params["data"], root / "prepared")
    ids = prepared.ids("train")

    def compute(idx):
        out = []
        for i in idx:
            m = prepared.gt(ids[i]).copy()
            m[:2] = IGNORE_INDEX
            m[-4:, -4:] = (i % (prepared.num_classes - 1)) + 1
            out.append(m)
        return {"mask": out}

    write_store(root / "pseudo.zarr", ids, prepared.sizes(ids), {"mask": ArraySpec("uint8", fill=IGNORE_INDEX)},
                {"class_names": prepared.class_names, "split": "train", "method": "test"}, compute, shard_images=8)
    return {"root": root, "params": params, "prepared": prepared, "store": root / "pseudo.zarr"}


def _export(demo, out, formats, **kw):
    return run_export(demo["store"], demo["root"] / "prepared", demo["params"]["data"], formats, out,
                      params=demo["params"], progress=False, **kw)


def _store_masks(demo):
    s = Store(demo["store"])
    return {i: s.read("mask", i) for i in s.ids}


@pytest.mark.parametrize("fmt", ["voc", "coco", "zarr"])
def test_export_round_trip_equals_the_store(demo, tmp_path, fmt):
    _export(demo, tmp_path / "out", [fmt])
    back = read_export(tmp_path / "out")
    want = _store_masks(demo)
    assert sorted(back) == sorted(want)
    for i, m in want.items():
        assert back[i].dtype == np.uint8
        np.testing.assert_array_equal(back[i], m, err_msg=f"{fmt} {i}")


def test_coco_json_loads_and_decodes_with_pycocotools(demo, tmp_path):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    _export(demo, tmp_path / "out", ["coco"])
    path = tmp_path / "out" / "annotations" / "instances_train.json"
    coco = COCO(str(path))
    names = demo["prepared"].class_names
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == names
    want = _store_masks(demo)
    img = coco.imgs[1]
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[1]))
    m = want[img["image_key"]]
    present = sorted(int(k) for k in np.unique(m) if k != IGNORE_INDEX)
    assert sorted(a["category_id"] for a in anns) == present  # one annotation per class per image
    assert all(a["iscrowd"] == 0 for a in anns)
    for a in anns:
        np.testing.assert_array_equal(coco.annToMask(a), (m == a["category_id"]).astype(np.uint8))
        assert a["area"] == float(mask_utils.area(a["segmentation"]))
    assert len(read_coco(path)) == len(want)


@pytest.mark.parametrize("bad", ["../evil", "a/b", "..", "a\\b", ""])
def test_ids_with_path_separators_or_dotdot_are_rejected(tmp_path, bad):
    with pytest.raises(ExportError, match="unsafe image id"):
        safe_member(tmp_path, bad, ".png")


def test_store_with_an_unsafe_id_writes_nothing(demo, tmp_path):
    prepared = demo["prepared"]
    ids = prepared.ids("train")[:2]
    evil = ["../../escape", ids[1]]
    write_store(tmp_path / "evil.zarr", evil, prepared.sizes(ids), {"mask": ArraySpec("uint8", fill=IGNORE_INDEX)},
                {"class_names": prepared.class_names}, lambda idx: {"mask": [prepared.gt(ids[i]) for i in idx]},
                shard_images=8)
    with pytest.raises(ExportError, match="unsafe image id"):
        run_export(tmp_path / "evil.zarr", demo["root"] / "prepared", demo["params"]["data"], ["voc"],
                   tmp_path / "sub" / "out", progress=False)
    assert not (tmp_path / "escape.png").exists() and not (tmp_path / "sub").exists()


def test_non_empty_target_is_refused_without_force(demo, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ExportError, match="not empty"):
        _export(demo, out, ["voc"])
    assert (out / "keep.txt").exists()
    with pytest.raises(ExportError, match="not a previous export"):  # force replaces only a previous export
        _export(demo, out, ["voc"], force=True)
    assert (out / "keep.txt").exists()
    (out / "keep.txt").unlink()
    _export(demo, out, ["coco"])
    with pytest.raises(ExportError, match="not empty"):
        _export(demo, out, ["voc"])
    _export(demo, out, ["voc"], force=True)
    assert json.loads((out / "manifest.json").read_text())["format"] == "voc"


def test_target_holding_the_inputs_is_refused_even_with_force(demo):
    with pytest.raises(ExportError, match="is or contains"):
        _export(demo, demo["root"], ["voc"], force=True)


def test_export_leaves_no_temporary_folder(demo, tmp_path):
    _export(demo, tmp_path / "out", ["voc", "zarr"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["voc", "zarr"]


def test_manifest_carries_the_documented_fields(demo, tmp_path):
    lock = tmp_path / "dvc.lock"
    lock.write_text(yaml.safe_dump({"schema": "2.0", "stages": {"random_walk": {"cmd": "x", "outs": [
        {"path": str(demo["store"]), "md5": "abc.dir", "size": 1, "nfiles": 2}]}}}))
    _export(demo, tmp_path / "out", ["voc"], lock_path=lock, label_metrics={"rw": {"miou": 50.0}})
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    for key in ("dataset", "split", "count", "class_names", "palette", "ignore_value", "params", "code_revision",
                "inputs", "label_quality", "stage_metrics", "created", "format"):
        assert key in m, key
    assert m["count"] == len(demo["prepared"].ids("train")) and m["split"] == "train"
    assert m["ignore_value"] == 255 and m["class_names"] == demo["prepared"].class_names
    assert m["inputs"][str(demo["store"])]["md5"] == "abc.dir"
    assert m["params"]["rw"] == demo["params"]["rw"]
    assert 0 < m["label_quality"]["miou"] <= 100 and m["stage_metrics"]["rw"]["miou"] == 50.0
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "255" in readme and "ignore" in readme


def test_unknown_format_is_an_error(demo, tmp_path):
    with pytest.raises(ExportError, match="unknown export format"):
        _export(demo, tmp_path / "out", ["png"])


def test_published_folder_has_normal_permissions(demo, tmp_path):
    import os
    import stat

    _export(demo, tmp_path / "out", ["zarr"])
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~umask

"""Dataset adapters (voc, coco, folder) and bad-input handling. Every fixture is written into tmp_path."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.presets import preset
from pipeline.datasets import DatasetError, open_dataset
from pipeline.datasets.coco import CocoDataset
from pipeline.datasets.folder import FolderDataset, val_score
from pipeline.datasets.imageio import read_rgb, voc_palette, write_label_png
from pipeline.datasets.voc import VOCDataset

H, W = 12, 16


# --- fixture writers ----------------------------------------------------------------------------
def rgb(seed: int = 0, h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def save_png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def save_mask(path: Path, mask: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_label_png(path, mask, voc_palette(256)[:21])
    return path


def voc_xml(names: list[str]) -> str:
    objs = "".join(f"<object><name>{n}</name></object>" for n in names)
    return f"<annotation><filename>x.jpg</filename>{objs}</annotation>"


def make_voc(root: Path, with_masks: bool = True) -> dict[str, np.ndarray]:
    """Two train images (ids a, b), one val image (c); masks or Annotations xml."""
    masks = {}
    for k, i in enumerate("abc"):
        save_png(root / "JPEGImages" / f"{i}.png", rgb(k))
    masks["a"] = np.zeros((H, W), np.uint8)
    masks["a"][2:6, 3:9] = 15  # person
    masks["a"][0, :] = 255
    masks["b"] = np.zeros((H, W), np.uint8)
    masks["b"][5:, 5:] = 12  # dog
    masks["b"][:3, :3] = 8  # cat
    masks["c"] = np.full((H, W), 1, np.uint8)  # aeroplane everywhere
    if with_masks:
        for i, m in masks.items():
            save_mask(root / "SegmentationClass" / f"{i}.png", m)
    else:
        (root / "Annotations").mkdir(parents=True)
        for i, names in {"a": ["person"], "b": ["dog", "cat", "dog"], "c": ["aeroplane"]}.items():
            (root / "Annotations" / f"{i}.xml").write_text(voc_xml(names))
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("a\nb\n")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("c\n")
    return masks


def rle_counts(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE (column-major runs, starting with a run of zeros)."""
    flat = mask.T.ravel().astype(np.uint8)
    counts, cur, run = [], 0, 0
    for v in flat:
        if v == cur:
            run += 1
        else:
            counts.append(run)
            cur, run = v, 1
    counts.append(run)
    return counts


def make_coco(root: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """COCO fixture: categories out of id order, a polygon, a compressed RLE over it, a crowd RLE, an unannotated image."""
    from pycocotools import mask as mask_utils

    (root / "images").mkdir(parents=True)
    for k, name in enumerate(["img_one.jpg", "img_two.png", "img_empty.png"]):
        Image.fromarray(rgb(k)).save(root / "images" / name)
    poly = [[1, 1, 9, 1, 9, 7, 1, 7]]
    cat_mask = np.zeros((H, W), np.uint8)
    cat_mask[4:10, 6:14] = 1
    crowd = np.zeros((H, W), np.uint8)
    crowd[:, 12:] = 1
    rle = mask_utils.encode(np.asfortranarray(cat_mask))
    rle["counts"] = rle["counts"].decode()
    js = {
        "images": [{"id": 7, "file_name": "img_one.jpg", "width": W, "height": H},
                   {"id": 8, "file_name": "img_two.png", "width": W, "height": H},
                   {"id": 9, "file_name": "img_empty.png", "width": W, "height": H}],
        "categories": [{"id": 17, "name": "cat"}, {"id": 1, "name": "person"}, {"id": 5, "name": "airplane"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 1, "iscrowd": 0, "segmentation": poly},
            {"id": 2, "image_id": 7, "category_id": 17, "iscrowd": 0, "segmentation": rle},
            {"id": 3, "image_id": 8, "category_id": 5, "iscrowd": 0, "segmentation": rle},
            {"id": 4, "image_id": 8, "category_id": 1, "iscrowd": 1,
             "segmentation": {"size": [H, W], "counts": rle_counts(crowd)}},
        ],
    }
    (root / "ann").mkdir()
    (root / "ann" / "train.json").write_text(json.dumps(js))
    poly_mask = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(poly, H, W))).astype(bool)
    one = np.zeros((H, W), np.uint8)
    one[poly_mask] = 1  # person (category id 1 -> index 1)
    one[cat_mask > 0] = 3  # cat (id 17 -> index 3), painted later so it wins the overlap
    two = np.zeros((H, W), np.uint8)
    two[cat_mask > 0] = 2  # airplane (id 5 -> index 2)
    two[(crowd > 0) & (two == 0)] = 255
    return js, {"img_one": one, "img_two": two}


def coco(root: Path, json_name: str = "train.json") -> CocoDataset:
    return CocoDataset(root, splits={"train": (root / "ann" / json_name, root / "images")})


def make_folder(root: Path, rows: list[str], classes: str = "cat\ndog\nbird\n", images: dict | None = None) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text(classes)
    (root / "labels.csv").write_text("\n".join(["image,labels"] + rows) + "\n")
    for k, name in enumerate(images if images is not None else [r.split(",")[0] for r in rows]):
        save_png(root / "images" / name, rgb(k))


def folder(root: Path, val_fraction: float = 0.0) -> FolderDataset:
    return FolderDataset(root, csv=root / "labels.csv", classes=root / "classes.txt", images=root / "images",
                         val_fraction=val_fraction)


# --- VOC ----------------------------------------------------------------------------------------
def test_voc_with_masks_gives_ids_labels_and_gt(tmp_path):
    masks = make_voc(tmp_path)
    ds = VOCDataset(tmp_path)
    assert ds.split_ids("train") == ["a", "b"] and ds.split_ids("val") == ["c"]
    assert ds.class_names[0] == "background" and ds.class_names[15] == "person"
    assert ds.labels("a") == [15] and ds.labels("b") == [8, 12]
    np.testing.assert_array_equal(ds.load_gt("b"), masks["b"])
    np.testing.assert_array_equal(ds.load_image("a"), rgb(0))
    rec = ds.check_item("a")
    assert rec.size == (H, W) and rec.has_gt


def test_voc_with_only_annotation_xml_gives_labels_and_no_gt(tmp_path):
    make_voc(tmp_path, with_masks=False)
    ds = VOCDataset(tmp_path)
    assert ds.labels("b") == [8, 12]
    assert ds.load_gt("b") is None
    assert [r.has_gt for r in ds.scan("train", progress=False).records] == [False, False]


def test_voc_reads_deeplab_train_aug_list_with_paths(tmp_path):
    make_voc(tmp_path)
    (tmp_path / "ImageSets" / "Segmentation" / "train_aug.txt").write_text(
        "/JPEGImages/a.jpg /SegmentationClassAug/a.png\n/JPEGImages/b.jpg /SegmentationClassAug/b.png\n")
    assert VOCDataset(tmp_path, use_sbd=True).split_ids("train") == ["a", "b"]


def test_voc_unknown_class_name_in_xml_names_the_file(tmp_path):
    make_voc(tmp_path, with_masks=False)
    (tmp_path / "Annotations" / "a.xml").write_text(voc_xml(["zebra"]))
    with pytest.raises(DatasetError, match=r"a\.png: unknown class name 'zebra'"):
        VOCDataset(tmp_path).check_item("a")


def test_voc_duplicate_id_in_split_list_fails_or_is_skipped(tmp_path):
    make_voc(tmp_path)
    (tmp_path / "ImageSets" / "Segmentation" / "train.txt").write_text("a\nb\na\n")
    with pytest.raises(DatasetError, match="duplicate image id 'a'"):
        VOCDataset(tmp_path).scan("train", progress=False)
    res = VOCDataset(tmp_path).scan("train", on_bad_item="skip", progress=False)
    assert [r.id for r in res.records] == ["a", "b"]
    assert res.skipped == [{"id": "a", "split": "train", "reason": res.skipped[0]["reason"]}]


def test_voc_mask_size_differs_from_image_size(tmp_path):
    make_voc(tmp_path)
    save_mask(tmp_path / "SegmentationClass" / "a.png", np.zeros((H + 1, W), np.uint8))
    with pytest.raises(DatasetError, match=rf"SegmentationClass/a\.png: mask size {W}x{H + 1} != image size {W}x{H}"):
        VOCDataset(tmp_path).check_item("a")


def test_voc_mask_with_out_of_range_class_is_rejected(tmp_path):
    make_voc(tmp_path)
    m = np.zeros((H, W), np.uint8)
    m[0, 0] = 40
    save_mask(tmp_path / "SegmentationClass" / "a.png", m)
    with pytest.raises(DatasetError, match=r"a\.png: mask has values \[40\]"):
        VOCDataset(tmp_path).check_item("a")


def test_voc_image_with_background_only_mask_has_no_labels(tmp_path):
    make_voc(tmp_path)
    save_mask(tmp_path / "SegmentationClass" / "a.png", np.zeros((H, W), np.uint8))
    with pytest.raises(DatasetError, match=r"a\.png: image has no labels"):
        VOCDataset(tmp_path).check_item("a")


def test_missing_root_folder_names_the_param(tmp_path):
    with pytest.raises(DatasetError, match=r"nowhere: dataset root folder does not exist \(param data.root\)"):
        VOCDataset(tmp_path / "nowhere")


# --- COCO ---------------------------------------------------------------------------------------
def test_coco_classes_in_category_id_order_with_names(tmp_path):
    make_coco(tmp_path)
    assert coco(tmp_path).class_names == ["background", "person", "airplane", "cat"]


def test_coco_ids_are_file_stems_and_labels_come_from_annotations(tmp_path):
    make_coco(tmp_path)
    ds = coco(tmp_path)
    assert ds.split_ids("train") == ["img_one", "img_two", "img_empty"]
    assert ds.labels("img_one") == [1, 3]
    assert ds.labels("img_two") == [1, 2]  # the crowd annotation's class is an image label too
    np.testing.assert_array_equal(ds.load_image("img_two"), rgb(1))


def test_coco_gt_later_annotation_wins_and_crowd_is_ignore(tmp_path):
    _, expected = make_coco(tmp_path)
    ds = coco(tmp_path)
    for i, m in expected.items():
        np.testing.assert_array_equal(ds.load_gt(i), m)
    assert (ds.load_gt("img_two") == 255).any()


def test_coco_scan_leaves_out_unannotated_images_even_in_fail_mode(tmp_path):
    make_coco(tmp_path)
    res = coco(tmp_path).scan("train", on_bad_item="fail", progress=False)
    assert [r.id for r in res.records] == ["img_one", "img_two"]
    assert [s["id"] for s in res.skipped] == ["img_empty"]
    assert "no annotations" in res.skipped[0]["reason"]


def test_coco_later_stages_find_images_without_parsing_the_json(tmp_path):
    make_coco(tmp_path)
    ds = coco(tmp_path)
    (tmp_path / "ann" / "train.json").unlink()  # proves the json is not read
    assert ds.image_path("img_one") == tmp_path / "images" / "img_one.jpg"


def test_coco_adapter_pickles_for_worker_processes(tmp_path):
    import pickle

    make_coco(tmp_path)
    ds = coco(tmp_path)
    ds.scan("train", progress=False)
    clone = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(clone.load_image("img_one"), ds.load_image("img_one"))
    assert clone.labels("img_two") == [1, 2]


def test_coco_via_open_dataset_uses_params(tmp_path):
    make_coco(tmp_path)
    data = dict(preset("tiny")["data"], dataset="coco", root=str(tmp_path), coco_train_json="ann/train.json",
                coco_train_images="images", coco_val_json="ann/train.json", coco_val_images="images")
    ds = open_dataset(data)
    assert isinstance(ds, CocoDataset) and ds.split_ids("val") == ["img_one", "img_two", "img_empty"]


def test_coco_missing_json_names_the_file(tmp_path):
    make_coco(tmp_path)
    with pytest.raises(DatasetError, match=r"ann/nope\.json: COCO annotation file is missing"):
        coco(tmp_path, "nope.json").split_ids("train")


@pytest.mark.parametrize("key", ["images", "annotations", "categories"])
def test_coco_json_without_a_section_names_the_file(tmp_path, key):
    js, _ = make_coco(tmp_path)
    del js[key]
    (tmp_path / "ann" / "bad.json").write_text(json.dumps(js))
    with pytest.raises(DatasetError, match=rf"ann/bad\.json: not a COCO instances file: missing list\(s\) \['{key}'\]"):
        coco(tmp_path, "bad.json").split_ids("train")


def test_coco_annotation_with_unknown_category_names_the_file(tmp_path):
    js, _ = make_coco(tmp_path)
    js["annotations"][2]["category_id"] = 99
    (tmp_path / "ann" / "bad.json").write_text(json.dumps(js))
    with pytest.raises(DatasetError, match=r"ann/bad\.json: annotation 3 references unknown category id 99"):
        coco(tmp_path, "bad.json").split_ids("train")


def test_coco_invalid_json_names_the_file(tmp_path):
    make_coco(tmp_path)
    (tmp_path / "ann" / "bad.json").write_text("{not json")
    with pytest.raises(DatasetError, match=r"ann/bad\.json: not valid JSON"):
        coco(tmp_path, "bad.json").split_ids("train")


def test_coco_image_size_differing_from_json_names_json_and_image(tmp_path):
    make_coco(tmp_path)
    Image.fromarray(rgb(0, H, W + 2)).save(tmp_path / "images" / "img_one.jpg")
    with pytest.raises(DatasetError, match=r"ann/train\.json \(annotations of .*img_one\.jpg\): mask size"):
        coco(tmp_path).check_item("img_one")


def test_coco_missing_image_file_is_reported(tmp_path):
    make_coco(tmp_path)
    (tmp_path / "images" / "img_two.png").unlink()
    with pytest.raises(DatasetError, match=r"img_two\.png: image file is missing"):
        coco(tmp_path).check_item("img_two")


def test_coco_splits_with_different_categories_are_refused(tmp_path):
    js, _ = make_coco(tmp_path)
    renamed = [dict(c, name="kitten") if c["name"] == "cat" else c for c in js["categories"]]
    (tmp_path / "ann" / "val.json").write_text(json.dumps(dict(js, categories=renamed)))
    ds = CocoDataset(tmp_path, splits={"train": (tmp_path / "ann" / "train.json", tmp_path / "images"),
                                       "val": (tmp_path / "ann" / "val.json", tmp_path / "images")})
    ds.split_ids("train")
    with pytest.raises(DatasetError, match=r"val\.json: categories differ"):
        ds.split_ids("val")


# --- folder -------------------------------------------------------------------------------------
def test_folder_labels_with_spaces_or_semicolons_and_implied_background(tmp_path):
    make_folder(tmp_path, ["x1.png,cat;dog", "x2.png,bird cat", "sub/x3.png,dog"])
    ds = folder(tmp_path)
    assert ds.class_names == ["background", "cat", "dog", "bird"]
    assert ds.split_ids("train") == ["x1", "x2", "x3"] and ds.split_ids("val") == []
    assert ds.labels("x1") == [1, 2] and ds.labels("x2") == [1, 3] and ds.labels("x3") == [2]
    np.testing.assert_array_equal(ds.load_image("x3"), rgb(2))
    assert ds.load_gt("x1") is None


def test_folder_background_listed_first_is_kept_once(tmp_path):
    make_folder(tmp_path, ["x1.png,cat"], classes="background\ncat\n\n# comment\ndog\n")
    assert folder(tmp_path).class_names == ["background", "cat", "dog"]


def test_folder_optional_masks_are_read(tmp_path):
    make_folder(tmp_path, ["x1.png,cat", "x2.png,dog"])
    m = np.zeros((H, W), np.uint8)
    m[3:5, 3:5] = 1
    save_mask(tmp_path / "masks" / "x1.png", m)
    ds = folder(tmp_path)
    np.testing.assert_array_equal(ds.load_gt("x1"), m)
    assert [r.has_gt for r in ds.scan("train", progress=False).records] == [True, False]


def test_folder_split_is_a_deterministic_hash_of_the_id(tmp_path):
    ids = [f"im{k:03d}" for k in range(60)]
    make_folder(tmp_path, [f"{i}.png,cat" for i in ids], images=[])
    ds = folder(tmp_path, val_fraction=0.3)
    val = ds.split_ids("val")
    assert val == [i for i in ids if val_score(i) < 0.3]
    assert 5 <= len(val) <= 35 and set(val).isdisjoint(ds.split_ids("train"))
    # adding rows does not move existing ids
    make_folder(tmp_path, [f"{i}.png,cat" for i in ids + ["new1", "new2"]], images=[])
    assert [i for i in folder(tmp_path, val_fraction=0.3).split_ids("val") if i in ids] == val


def test_folder_tiny_set_still_gets_one_val_image(tmp_path):
    make_folder(tmp_path, ["x1.png,cat", "x2.png,dog"])
    ds = folder(tmp_path, val_fraction=0.01)
    assert len(ds.split_ids("val")) == 1 and len(ds.split_ids("train")) == 1


def test_folder_via_open_dataset_uses_params(tmp_path):
    make_folder(tmp_path, ["x1.png,cat"])
    data = dict(preset("tiny")["data"], dataset="folder", root=str(tmp_path), folder_val_fraction=0.0)
    assert open_dataset(data).split_ids("train") == ["x1"]


def test_folder_missing_csv_names_the_file(tmp_path):
    make_folder(tmp_path, ["x1.png,cat"])
    (tmp_path / "labels.csv").unlink()
    with pytest.raises(DatasetError, match=r"labels\.csv: labels CSV is missing"):
        folder(tmp_path)


def test_folder_missing_classes_file_names_the_file(tmp_path):
    make_folder(tmp_path, ["x1.png,cat"])
    (tmp_path / "classes.txt").unlink()
    with pytest.raises(DatasetError, match=r"classes\.txt: class list file is missing"):
        folder(tmp_path)


def test_folder_csv_without_the_columns_names_the_file(tmp_path):
    make_folder(tmp_path, ["x1.png,cat"])
    (tmp_path / "labels.csv").write_text("file,tags\nx1.png,cat\n")
    with pytest.raises(DatasetError, match=r"labels\.csv: header must name the columns 'image' and 'labels'"):
        folder(tmp_path)


def test_folder_unknown_class_name_names_the_csv_line(tmp_path):
    make_folder(tmp_path, ["x1.png,cat", "x2.png,dog;zebra"])
    with pytest.raises(DatasetError, match=r"labels\.csv:3 \(image x2\.png\): unknown class name 'zebra'"):
        folder(tmp_path).check_item("x2")


def test_folder_image_without_labels_names_the_csv_line(tmp_path):
    make_folder(tmp_path, ["x1.png,cat", "x2.png,"])
    with pytest.raises(DatasetError, match=r"labels\.csv:3 \(image x2\.png\): image has no labels"):
        folder(tmp_path).check_item("x2")


def test_folder_duplicate_ids_name_both_csv_lines(tmp_path):
    make_folder(tmp_path, ["x1.png,cat", "x2.png,dog", "x1.jpg,dog"], images=["x1.png", "x2.png"])
    with pytest.raises(DatasetError, match=r"labels\.csv lines \[2, 4\] \(image x1\.png\): duplicate image id 'x1'"):
        folder(tmp_path).scan("train", progress=False)


def test_folder_missing_image_file_names_csv_line_and_file(tmp_path):
    make_folder(tmp_path, ["x1.png,cat", "x2.png,dog"], images=["x1.png"])
    with pytest.raises(DatasetError, match=r"labels\.csv:3 \(image x2\.png\): .*images/x2\.png: image file is missing"):
        folder(tmp_path).check_item("x2")


def test_folder_mask_size_differs_from_image_size(tmp_path):
    make_folder(tmp_path, ["x1.png,cat"])
    save_mask(tmp_path / "masks" / "x1.png", np.zeros((H, W + 3), np.uint8))
    with pytest.raises(DatasetError, match=rf"masks/x1\.png: mask size {W + 3}x{H} != image size {W}x{H}"):
        folder(tmp_path).check_item("x1")


def test_folder_image_path_escaping_the_folder_is_refused(tmp_path):
    make_folder(tmp_path, ["x1.png,cat"])
    (tmp_path / "labels.csv").write_text("image,labels\n../secret.png,cat\n")
    with pytest.raises(DatasetError, match=r"labels\.csv:2: image path '\.\./secret\.png' must be relative"):
        folder(tmp_path)


def test_folder_class_list_with_background_not_first_is_refused(tmp_path):
    make_folder(tmp_path, ["x1.png,cat"], classes="cat\nbackground\n")
    with pytest.raises(DatasetError, match=r"classes\.txt:2: 'background' must be the first class"):
        folder(tmp_path)


# --- bad pixels: every kind of file is converted or refused with the file named -----------------
def test_garbage_bytes_image_is_refused_naming_the_file(tmp_path):
    p = tmp_path / "junk.jpg"
    p.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(DatasetError, match=r"junk\.jpg: cannot read image"):
        read_rgb(p)


def test_truncated_jpeg_is_refused_naming_the_file(tmp_path):
    p = tmp_path / "cut.jpg"
    Image.fromarray(rgb(0, 64, 64)).save(p, quality=90)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(DatasetError, match=r"cut\.jpg: cannot read image"):
        read_rgb(p)


def test_missing_image_is_refused_naming_the_file(tmp_path):
    with pytest.raises(DatasetError, match=r"gone\.png: image file is missing"):
        read_rgb(tmp_path / "gone.png")


def test_grayscale_image_becomes_three_equal_channels(tmp_path):
    g = np.arange(H * W, dtype=np.uint8).reshape(H, W)
    out = read_rgb(save_png(tmp_path / "g.png", g))
    assert out.shape == (H, W, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.repeat(g[..., None], 3, axis=2))


def test_rgba_image_is_composited_on_black(tmp_path):
    a = np.zeros((H, W, 4), np.uint8)
    a[..., :3] = 200
    a[..., 3] = 255
    a[:, : W // 2, 3] = 0
    out = read_rgb(save_png(tmp_path / "a.png", a))
    assert out.shape == (H, W, 3) and out.dtype == np.uint8
    assert (out[:, : W // 2] == 0).all() and (out[:, W // 2:] == 200).all()


def test_16bit_image_is_scaled_to_8bit(tmp_path):
    a = np.zeros((H, W), np.uint16)
    a[:, W // 2:] = 65535
    p = tmp_path / "d.png"
    Image.fromarray(a).save(p)
    out = read_rgb(p)
    assert out.shape == (H, W, 3) and out.dtype == np.uint8
    assert (out[:, : W // 2] == 0).all() and (out[:, W // 2:] == 255).all()


def test_float_image_in_unit_range_is_scaled_to_8bit(tmp_path):
    p = tmp_path / "f.tiff"
    Image.fromarray(np.full((H, W), 0.5, np.float32)).save(p)
    out = read_rgb(p)
    assert out.shape == (H, W, 3) and out.dtype == np.uint8 and (out == 128).all()


def test_decompression_bomb_is_a_dataset_error(tmp_path, monkeypatch):
    p = save_png(tmp_path / "big.png", rgb(0))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    with pytest.raises(DatasetError, match=r"big\.png: image too large"):
        read_rgb(p)


def test_odd_image_modes_pass_through_a_dataset_scan(tmp_path):
    make_folder(tmp_path, ["g.png,cat", "a.png,dog", "d.png,bird"], images=[])
    save_png(tmp_path / "images" / "g.png", np.zeros((H, W), np.uint8))
    save_png(tmp_path / "images" / "a.png", np.zeros((H, W, 4), np.uint8))
    Image.fromarray(np.full((H, W), 4000, np.uint16)).save(tmp_path / "images" / "d.png")
    ds = folder(tmp_path)
    assert [r.size for r in ds.scan("train", progress=False).records] == [(H, W)] * 3
    assert all(ds.load_image(i).shape == (H, W, 3) for i in ["g", "a", "d"])


# --- on_bad_item --------------------------------------------------------------------------------
def make_mixed_folder(root: Path) -> None:
    """Five rows: two good, then a missing image, a corrupt image, an unknown class."""
    make_folder(root, ["ok1.png,cat", "gone.png,cat", "bad.png,dog", "ok2.png,dog", "odd.png,zebra"],
                images=["ok1.png", "ok2.png", "odd.png"])
    (root / "images" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")


def test_on_bad_item_fail_raises_at_the_first_bad_item(tmp_path):
    make_mixed_folder(tmp_path)
    with pytest.raises(DatasetError, match=r"labels\.csv:3 \(image gone\.png\).*image file is missing"):
        folder(tmp_path).scan("train", on_bad_item="fail", progress=False)


def test_on_bad_item_skip_reports_every_skipped_item_with_its_reason(tmp_path):
    make_mixed_folder(tmp_path)
    res = folder(tmp_path).scan("train", on_bad_item="skip", progress=False)
    assert [r.id for r in res.records] == ["ok1", "ok2"]
    reasons = {s["id"]: s["reason"] for s in res.skipped}
    assert set(reasons) == {"gone", "bad", "odd"} and {s["split"] for s in res.skipped} == {"train"}
    assert "image file is missing" in reasons["gone"]
    assert "cannot read image" in reasons["bad"]
    assert "unknown class name 'zebra'" in reasons["odd"]


def test_split_with_no_usable_image_is_an_error_even_when_skipping(tmp_path):
    make_folder(tmp_path, ["gone.png,cat"], images=[])
    with pytest.raises(DatasetError, match="split 'train' has no usable images"):
        folder(tmp_path).scan("train", on_bad_item="skip", progress=False)

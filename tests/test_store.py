import numpy as np
import pytest
import zarr

from pipeline.store import ArraySpec, Store, StoreError, StoreWriter, write_store

IDS = ["a", "b", "c", "d", "e"]
SIZES = [(10, 7), (5, 12), (9, 9), (1, 1), (13, 4)]
SPECS = {"mask": ArraySpec("uint8", fill=255), "cam": ArraySpec("float16", stride=4, channels=3, fill=0)}


def _arrays(i):
    h, w = SIZES[i]
    rng = np.random.default_rng(i)
    mask = rng.integers(0, 4, (h, w)).astype(np.uint8)
    cam = rng.random((3,) + SPECS["cam"].grid((h, w))).astype(np.float16)
    return mask, cam


def _compute(idx):
    out = {"mask": [], "cam": []}
    for i in idx:
        m, c = _arrays(i)
        out["mask"].append(m)
        out["cam"].append(c)
    return out


def test_round_trip_keeps_each_image_at_its_true_size(tmp_path):
    path = write_store(tmp_path / "s.zarr", IDS, SIZES, SPECS, {"class_names": ["bg", "x", "y", "z"]}, _compute, shard_images=2)
    store = Store(path)
    assert store.ids == IDS
    for i, image_id in enumerate(IDS):
        m, c = _arrays(i)
        np.testing.assert_array_equal(store.read("mask", image_id), m)
        np.testing.assert_array_equal(store.read("cam", i), c)
    assert store.sizes.tolist() == [list(s) for s in SIZES]


def test_store_attributes_describe_the_arrays(tmp_path):
    path = write_store(tmp_path / "s.zarr", IDS, SIZES, SPECS, {"class_names": ["bg", "x", "y", "z"], "stride": 4}, _compute)
    g = zarr.open_group(str(path), mode="r")
    assert g.attrs["class_names"] == ["bg", "x", "y", "z"]
    assert g.attrs["ignore_index"] == 255
    assert g.attrs["arrays"]["cam"]["stride"] == 4
    assert g["cam"].metadata.zarr_format == 3
    assert g["mask"].shards is not None  # sharded: few files


def test_sharding_keeps_file_count_low(tmp_path):
    ids = [f"im{i}" for i in range(64)]
    sizes = [(8, 8)] * 64
    path = write_store(tmp_path / "s.zarr", ids, sizes, {"mask": ArraySpec("uint8", fill=255)}, {},
                       lambda idx: {"mask": [np.zeros((8, 8), np.uint8) + (i % 3) for i in idx]}, shard_images=32)
    files = [p for p in path.rglob("*") if p.is_file()]
    assert len(files) < 12  # 2 shards + metadata, not one file per image


def test_interrupted_write_leaves_no_complete_store_and_resume_finishes_it(tmp_path):
    path = tmp_path / "s.zarr"
    calls = []

    def failing(idx):
        calls.append(list(idx))
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return _compute(idx)

    with pytest.raises(KeyboardInterrupt):
        write_store(path, IDS, SIZES, SPECS, {"p": 1}, failing, shard_images=2)
    assert not path.exists()
    assert (tmp_path / "s.zarr.partial").exists()
    with pytest.raises(StoreError, match="incomplete"):
        Store(path)

    resumed = []

    def recording(idx):
        resumed.append(list(idx))
        return _compute(idx)

    write_store(path, IDS, SIZES, SPECS, {"p": 1}, recording, shard_images=2)
    assert resumed == [[2, 3], [4]]  # the first shard was not recomputed
    reference = write_store(tmp_path / "ref.zarr", IDS, SIZES, SPECS, {"p": 1}, _compute, shard_images=2)
    a, b = Store(path), Store(reference)
    for i in range(len(IDS)):
        np.testing.assert_array_equal(a.read("mask", i), b.read("mask", i))
        np.testing.assert_array_equal(a.read("cam", i), b.read("cam", i))


def test_changed_params_do_not_resume_a_stale_partial(tmp_path):
    path = tmp_path / "s.zarr"
    w = StoreWriter(path, IDS, SIZES, SPECS, {"p": 1}, shard_images=2)
    w.write_shard(0, _compute([0, 1]))
    w2 = StoreWriter(path, IDS, SIZES, SPECS, {"p": 2}, shard_images=2)
    assert w2.pending_shards() == [0, 1, 2]


def test_wrong_shape_is_refused_with_the_image_id(tmp_path):
    w = StoreWriter(tmp_path / "s.zarr", IDS, SIZES, SPECS, {}, shard_images=2)
    bad = _compute([0, 1])
    bad["mask"][1] = np.zeros((3, 3), np.uint8)
    with pytest.raises(StoreError, match="'b'.*shape"):
        w.write_shard(0, bad)


def test_commit_refuses_missing_shards(tmp_path):
    w = StoreWriter(tmp_path / "s.zarr", IDS, SIZES, SPECS, {}, shard_images=2)
    w.write_shard(0, _compute([0, 1]))
    with pytest.raises(StoreError, match="not written"):
        w.commit()


def test_missing_store_error_names_the_path(tmp_path):
    with pytest.raises(StoreError, match="nope.zarr"):
        Store(tmp_path / "nope.zarr")

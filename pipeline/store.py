"""Per-image array stores in zarr v3.

Layout of one store (a zarr v3 group, e.g. ``data/cams.zarr``)::

    <name>.zarr/
      zarr.json             group attrs: ids, class_names, stride, ignore_index, params, ...
      size                  (N, 2) int32   true image (height, width) in pixels
      <array>               (N, [C,] Hc, Wc) padded canvas; image i occupies
                            [i, ..., :ceil(h/stride), :ceil(w/stride)], the rest is fill
      shard_done            (n_shards,) bool  which write batches are complete (resume)

Every per-image array is chunked one image (and one channel) per chunk and sharded
``shard_images`` images per file, so a 10k-image store is a few hundred files, reads are
per-image random access and chunks that are all fill (absent classes, padding) cost nothing.

Writes are atomic per stage: a writer fills ``<path>.partial`` shard by shard and
:meth:`StoreWriter.commit` renames it to ``<path>`` (an older store is first renamed aside, then
deleted, so a kill never leaves a half-deleted store under the final name). An interrupted run
leaves only the ``.partial`` folder; a re-run resumes past finished shards only when the
fingerprint is the same: params, ids, sizes, the code (``pipeline.provenance.code_digest``) and the
``inputs`` the caller names in ``attrs["inputs"]`` (checkpoint digests, input stores' fingerprints,
the prepared data). Anything else discards the partial result, with a log line saying what changed.

A committed store lists the shard files it wrote (``shard_files``); reading an image whose shard
file is missing, or that zarr cannot decode, raises :class:`StoreError` naming the store and image.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from pipeline.labels import IGNORE_INDEX

FORMAT_VERSION = 1

log = logging.getLogger("wsss")


@dataclass(frozen=True)
class ArraySpec:
    """One per-image array of a store.

    channels: None for a (H, W) map per image, or C for (C, H, W).
    stride: the map's grid is ceil(h/stride) x ceil(w/stride) for an h x w image.
    """

    dtype: str
    stride: int = 1
    channels: int | None = None
    fill: float | int = 0

    def grid(self, size: Sequence[int]) -> tuple[int, int]:
        h, w = int(size[0]), int(size[1])
        return math.ceil(h / self.stride), math.ceil(w / self.stride)

    def image_shape(self, size: Sequence[int]) -> tuple[int, ...]:
        gh, gw = self.grid(size)
        return (gh, gw) if self.channels is None else (self.channels, gh, gw)

    def compressor(self):
        if np.dtype(self.dtype).kind == "f":
            # byte shuffle groups exponent bytes of smooth float maps: ~2x better than plain zstd
            return BloscCodec(cname="zstd", clevel=5, shuffle="shuffle", typesize=np.dtype(self.dtype).itemsize)
        return ZstdCodec(level=5)


def fingerprint(*parts: Any) -> str:
    """Stable short hash of JSON-able parts (params, ids, sizes) that identify a store's content."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class StoreError(RuntimeError):
    pass


def _partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


OLD_MARK = ".old-wsss-"  # a replaced folder waits under <final>.old-wsss-<pid> until it is deleted


def replace_dir(new: str | Path, final: str | Path) -> Path:
    """Publish folder ``new`` as ``final``. An existing ``final`` is renamed aside first (atomic) and
    deleted after, so at every instant ``final`` is either the old complete folder, absent, or the
    new complete folder, never a half-deleted one. Leftover ``<final>.old-wsss-*`` folders of killed
    runs go too; nothing else (a user's ``<final>.old-run1`` is not ours to delete)."""
    new, final = Path(new), Path(final)
    for stale in final.parent.glob(final.name + OLD_MARK + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    old = None
    if final.exists():
        old = final.with_name(f"{final.name}{OLD_MARK}{os.getpid()}")
        final.rename(old)
    new.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


class StoreWriter:
    """Writes a store batch-by-batch into ``<path>.partial``; ``commit()`` publishes it.

    Usage::

        w = StoreWriter(path, ids, sizes, {"mask": ArraySpec("uint8", fill=255)}, attrs, shard_images=32)
        for shard in w.pending_shards():
            idx = w.shard_indices(shard)
            w.write_shard(shard, {"mask": [compute(i) for i in idx]})
        w.commit()
    """

    def __init__(
        self,
        path: str | Path,
        ids: Sequence[str],
        sizes: np.ndarray | Sequence[Sequence[int]],
        arrays: dict[str, ArraySpec],
        attrs: dict[str, Any],
        shard_images: int = 32,
        resume: bool = True,
    ):
        self.path = Path(path)
        if self.path.is_symlink():
            raise StoreError(f"{self.path} is a symbolic link to {os.readlink(self.path)}: a store is published by "
                             "renaming a new folder into its place, which would replace the link with a folder "
                             "here. Remove the link (or link the whole data/ folder instead)")
        self.tmp = _partial(self.path)
        self.ids = list(ids)
        self.sizes = np.asarray(sizes, dtype=np.int32).reshape(-1, 2)
        if len(self.ids) != len(self.sizes):
            raise StoreError(f"{self.path}: {len(self.ids)} ids but {len(self.sizes)} sizes")
        if len(set(self.ids)) != len(self.ids):
            raise StoreError(f"{self.path}: duplicate image ids")
        self.specs = dict(arrays)
        self.shard_images = int(shard_images)
        n = len(self.ids)
        self.n_shards = max(1, math.ceil(n / self.shard_images))
        from pipeline.provenance import code_digest

        attrs = dict(attrs, inputs={**attrs.get("inputs", {}), "code": code_digest()})
        fp = fingerprint(FORMAT_VERSION, self.ids, self.sizes.tolist(), attrs, {k: vars(s) for k, s in self.specs.items()}, self.shard_images)
        self.attrs = dict(attrs, ids=self.ids, fingerprint=fp, format_version=FORMAT_VERSION,
                          ignore_index=IGNORE_INDEX, shard_images=self.shard_images,
                          arrays={k: vars(s) for k, s in self.specs.items()})
        self.resumed_shards = 0
        if resume and self.tmp.exists():
            try:
                g = zarr.open_group(str(self.tmp), mode="r+")
                old = dict(g.attrs)
            except Exception as e:  # a half-created group: start over
                log.warning("%s: cannot resume from %s (%s: %s); starting over", self.path.name, self.tmp,
                            type(e).__name__, e)
            else:
                if old.get("fingerprint") == fp:
                    self.group = g
                    self.resumed_shards = int(np.asarray(g["shard_done"][:]).sum())
                    return
                log.info("%s: discarding the partial result in %s: made from other %s", self.path.name, self.tmp,
                         _what_changed(old, self.attrs))
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.group = self._create(n)

    def _create(self, n: int):
        g = zarr.open_group(str(self.tmp), mode="w", zarr_format=3)
        g.create_array("size", data=self.sizes, chunks=(max(n, 1), 2))
        for name, spec in self.specs.items():
            grids = np.array([spec.grid(s) for s in self.sizes]) if n else np.zeros((0, 2), int)
            gh, gw = (int(grids[:, 0].max()), int(grids[:, 1].max())) if n else (1, 1)
            lead = () if spec.channels is None else (spec.channels,)
            shape = (max(n, 1),) + lead + (gh, gw)
            chunks = (1,) + (1,) * len(lead) + (gh, gw)
            shards = (min(self.shard_images, max(n, 1)),) + lead + (gh, gw)
            g.create_array(name, shape=shape, chunks=chunks, shards=shards, dtype=spec.dtype,
                           fill_value=spec.fill, compressors=[spec.compressor()],
                           dimension_names=("image",) + (("channel",) if lead else ()) + ("y", "x"))
        g.create_array("shard_done", shape=(self.n_shards,), chunks=(self.n_shards,), dtype="bool", fill_value=False)
        g.attrs.update(self.attrs)
        return g

    def shard_indices(self, shard: int) -> range:
        lo = shard * self.shard_images
        return range(lo, min(lo + self.shard_images, len(self.ids)))

    def pending_shards(self) -> list[int]:
        done = np.asarray(self.group["shard_done"][:])
        return [k for k in range(self.n_shards) if not done[k] and len(self.shard_indices(k))]

    def write_shard(self, shard: int, values: dict[str, Sequence[np.ndarray]]) -> None:
        """Write every image of ``shard`` at once (one shard file rewrite per array)."""
        idx = self.shard_indices(shard)
        for name, spec in self.specs.items():
            if name not in values:
                raise StoreError(f"{self.path}: write_shard({shard}) is missing array {name!r}")
            arrs = values[name]
            if len(arrs) != len(idx):
                raise StoreError(f"{self.path}: array {name!r} got {len(arrs)} images for shard {shard} of {len(idx)}")
            z = self.group[name]
            block = np.full((len(idx),) + z.shape[1:], spec.fill, dtype=spec.dtype)
            for j, (i, a) in enumerate(zip(idx, arrs)):
                expect = spec.image_shape(self.sizes[i])
                a = np.asarray(a)
                if a.shape != expect:
                    raise StoreError(f"{self.path}: array {name!r} for image {self.ids[i]!r} has shape {a.shape}, expected {expect}")
                block[(j,) + (slice(None),) * (a.ndim - 2) + (slice(0, expect[-2]), slice(0, expect[-1]))] = a
            try:
                z[idx.start:idx.stop] = block
            except OSError as e:  # a full disk, a read-only or vanished folder: say where and why
                raise StoreError(f"{self.path}: cannot write array {name!r} of shard {shard} in {self.tmp}: "
                                 f"{e.strerror or e}") from e
        try:
            self.group["shard_done"][shard] = True
        except OSError as e:
            raise StoreError(f"{self.path}: cannot record shard {shard} as written in {self.tmp}: {e.strerror or e}") from e

    def commit(self) -> Path:
        """Check every shard is written, then atomically publish ``<path>``."""
        if self.pending_shards():
            raise StoreError(f"{self.path}: cannot commit, shards {self.pending_shards()} are not written")
        self.group.attrs["shard_files"] = {name: _shard_files(self.tmp, name) for name in self.specs}
        return replace_dir(self.tmp, self.path)


def _what_changed(old: dict, new: dict) -> str:
    """The fingerprint inputs that differ between two stores' attrs, e.g. ``inputs.code, params``."""
    from pipeline.provenance import describe_change

    keys = [k for k in set(old) | set(new) if k not in ("fingerprint", "shard_files")]
    return describe_change({k: old.get(k) for k in keys}, {k: new.get(k) for k in keys})


def _shard_files(store_dir: Path, name: str) -> list[int]:
    """Image-axis indices of the shard files an array has on disk (shards that are all fill have none)."""
    base = store_dir / name / "c"
    return sorted(int(p.name) for p in base.iterdir() if p.name.isdigit()) if base.is_dir() else []


class Store:
    """Read side of a committed store: per-image random access at the image's true size."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_symlink() and not self.path.exists():
            raise StoreError(f"{self.path}: a symbolic link to {os.readlink(self.path)}, which does not exist "
                             "(moved or unmounted?)")
        if not self.path.exists():
            if _partial(self.path).exists():
                raise StoreError(f"{self.path}: incomplete (only {_partial(self.path).name} exists); re-run the stage that writes it")
            raise StoreError(f"store not found: {self.path}; run the stage that writes it (see dvc.yaml)")
        self.group = zarr.open_group(str(self.path), mode="r")
        self.attrs = dict(self.group.attrs)
        self.ids: list[str] = list(self.attrs["ids"])
        self.sizes = np.asarray(self.group["size"][:]).reshape(-1, 2)[: len(self.ids)]
        self._index = {k: i for i, k in enumerate(self.ids)}
        self.specs = {k: ArraySpec(**v) for k, v in self.attrs["arrays"].items()}

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._index

    def index(self, image_id: str) -> int:
        try:
            return self._index[image_id]
        except KeyError:
            raise StoreError(f"{self.path}: no image {image_id!r}") from None

    def read(self, name: str, image: int | str) -> np.ndarray:
        """The array ``name`` of one image, cropped to its true grid: (H, W) or (C, H, W).

        Raises StoreError naming the store and the image when its shard file is missing or unreadable
        (zarr alone would return fill values)."""
        i = self.index(image) if isinstance(image, str) else int(image)
        return self._crop(name, i, self._read_block(name, i, i + 1)[0])

    def iter(self, name: str, indices: Iterable[int] | None = None):
        """(index, array) for ``indices`` (default: every image), as :meth:`read` gives them; reading all
        images goes one shard-sized block at a time (about 10x faster than image by image)."""
        if indices is not None:
            for i in indices:
                yield i, self.read(name, i)
            return
        step = self.shard_images
        for lo in range(0, len(self.ids), step):
            hi = min(lo + step, len(self.ids))
            block = self._read_block(name, lo, hi)
            for j in range(hi - lo):
                yield lo + j, self._crop(name, lo + j, block[j])

    @property
    def shard_images(self) -> int:
        return max(1, int(self.attrs.get("shard_images", 1)))

    def _crop(self, name: str, i: int, a: np.ndarray) -> np.ndarray:
        gh, gw = self.specs[name].grid(self.sizes[i])
        return a[..., :gh, :gw]

    def _read_block(self, name: str, lo: int, hi: int) -> np.ndarray:
        """Images lo..hi-1 of array ``name`` (padded canvas), after checking their shard files exist."""
        spec = self.specs[name]
        expected = self._expected_shards(name)
        for shard in range(lo // self.shard_images, (hi - 1) // self.shard_images + 1):
            key = "/".join([name, "c", str(shard)] + ["0"] * (2 if spec.channels is None else 3))
            if shard in expected and not (self.path / key).is_file():
                a, b = shard * self.shard_images, (shard + 1) * self.shard_images
                raise StoreError(f"{self.path}: shard file {key} is missing (images {self.ids[a:b]}); "
                                 "re-run the stage that writes it")
        try:
            return np.asarray(self.group[name][lo:hi])
        except Exception as e:
            raise StoreError(f"{self.path}: cannot read array {name!r} of images {self.ids[lo:hi]} "
                             f"(shard {lo // self.shard_images}): {type(e).__name__}: {e}") from e

    def _expected_shards(self, name: str) -> frozenset:
        cache = self.__dict__.setdefault("_shard_sets", {})
        if name not in cache:
            cache[name] = frozenset(self.attrs.get("shard_files", {}).get(name, ()))
        return cache[name]


def write_store(path, ids, sizes, arrays: dict[str, ArraySpec], attrs: dict, compute, shard_images: int = 32,
                progress: str | None = None) -> Path:
    """Fill a store by calling ``compute(indices) -> {name: [arrays]}`` shard by shard; resumes and commits."""
    from pipeline.progress import progress_bar

    w = StoreWriter(path, ids, sizes, arrays, attrs, shard_images=shard_images)
    pending = w.pending_shards()
    with progress_bar(total=len(ids), desc=progress or Path(path).name, unit="img") as bar:
        bar.update(len(ids) - sum(len(w.shard_indices(s)) for s in pending))
        for shard in pending:
            idx = w.shard_indices(shard)
            w.write_shard(shard, compute(list(idx)))
            bar.update(len(idx))
    return w.commit()

"""The dataset adapter that ``data.dataset`` names, built from the ``data`` params.

Every adapter is built with its classmethod ``from_params(data, prepared_dir)`` when it has one (the
built-ins do), else as ``cls(data["root"])``. The registry imports only the adapter named.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.datasets.base import Dataset
from pipeline.datasets.imageio import DatasetError
from pipeline.registry import DATASETS, RegistryError


def dataset_class(name: str) -> type[Dataset]:
    """The Dataset subclass registered, advertised or importable as ``name`` (param ``data.dataset``).
    Raises DatasetError naming the param when there is none (or the plugin fails to load)."""
    try:
        cls = DATASETS.get(name)
    except RegistryError as e:
        raise DatasetError(str(e)) from (e.__cause__ or e)
    if not (isinstance(cls, type) and issubclass(cls, Dataset)):
        raise DatasetError(f"param data.dataset: {name!r} resolves to {cls!r}, which is not a Dataset subclass")
    return cls


def open_dataset(data: dict, prepared_dir: str | Path = "data/prepared") -> Dataset:
    """The adapter named by ``data.dataset``, built from the ``data`` params."""
    cls = dataset_class(data["dataset"])
    build = getattr(cls, "from_params", None)
    return build(data, Path(prepared_dir)) if build is not None else cls(data["root"])

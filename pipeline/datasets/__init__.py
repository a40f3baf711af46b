"""Dataset adapters behind one interface (see :mod:`pipeline.datasets.base`), registered in
``pipeline.registry.DATASETS`` and picked by ``data.dataset``.

The built-ins ``demo``, ``voc``, ``coco`` and ``folder`` (modules of the same names) are imported by
the registry when first named, not by this package. A plugin adds a :class:`Dataset` subclass the
same way as a CAM method (``@DATASETS.register``, an entry point ``dataset.<name>`` in group
``wsss.plugins``, or a dotted path in ``data.dataset``); :func:`open_dataset` builds it with its
classmethod ``from_params(data, prepared_dir)`` when it has one, else as ``cls(data["root"])``.
"""
from __future__ import annotations

from pipeline.datasets.base import Dataset, Record, ScanResult, check_id
from pipeline.datasets.imageio import DatasetError
from pipeline.datasets.open import dataset_class, open_dataset
from pipeline.datasets.prepared import PreparedData

__all__ = ["Dataset", "DatasetError", "PreparedData", "Record", "ScanResult", "check_id", "dataset_class",
           "open_dataset"]

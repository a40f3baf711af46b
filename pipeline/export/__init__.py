"""Export the pseudo masks for another team: VOC PNGs, COCO RLE json or a zarr store, and the
instance pseudo masks as COCO instance annotations (``coco_instances``).

:func:`run_export` is the one entry used by the ``export`` stage and by ``wsss export``. Every
export folder holds the masks, ``manifest.json`` and a datasheet ``README.md``. Writes are safe:
image ids cannot name files outside the folder, a non-empty target is refused unless it
holds a previous export (an export ``manifest.json``, or format sub-folders with one each) and
``force`` is given, and everything is written into a temporary sibling folder that is renamed into
place only when complete.
"""
from __future__ import annotations

from pipeline.export.formats import (FORMATS, READERS, WRITERS, ExportError, read_coco, read_coco_instances, read_voc,
                                     read_zarr, safe_member)
from pipeline.export.run import iter_store_masks, read_export, run_export
from pipeline.export.target import clean_killed_exports

__all__ = ["FORMATS", "ExportError", "READERS", "WRITERS", "clean_killed_exports", "iter_store_masks", "read_coco",
           "read_coco_instances", "read_export", "read_voc", "read_zarr", "run_export", "safe_member"]

"""Where an export goes, safely: which folders may be replaced (an empty one, or a previous export
holding only what its format wrote, and then only with ``force``), publishing by rename, and the
leftovers of killed exports."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

from pipeline.export.formats import FORMAT_ENTRIES, FORMATS, ExportError

log = logging.getLogger("wsss")


def _export_manifest_format(folder: Path) -> str | None:
    """The format named by ``folder/manifest.json`` when it is the manifest of an export, else None."""
    try:
        m = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if isinstance(m, dict) and "manifest_version" in m and m.get("format") in FORMATS and "files" in m:
        return m["format"]
    return None


def _foreign_entries(folder: Path, fmt: str) -> list[str]:
    """Entries of a one-format export folder that its format does not write (a user's files)."""
    expected = FORMAT_ENTRIES[fmt] | {"manifest.json", "README.md"}
    return sorted(e.name for e in folder.iterdir() if e.name not in expected)


def _previous_export(folder: Path) -> str | None:
    """Why ``folder`` is not a previous export (None when it is one and may be replaced).

    An export is a folder with an export ``manifest.json`` (one format) holding only what that format
    writes, or a folder whose entries are all such format sub-folders (voc, coco, zarr) with one
    each (what the ``export`` stage writes)."""
    fmt = _export_manifest_format(folder)
    if fmt is not None:
        foreign = _foreign_entries(folder, fmt)
        if foreign:
            return f"it holds {', '.join(foreign[:3])}{' and more' if len(foreign) > 3 else ''}, which no export wrote"
        return None
    if (folder / "manifest.json").exists():
        return "its manifest.json is not an export manifest"
    entries = sorted(folder.iterdir())
    foreign = [e.name for e in entries if not (e.is_dir() and not e.is_symlink() and e.name in FORMATS
                                                and _export_manifest_format(e) == e.name)]
    foreign += [f"{e.name}/{x}" for e in entries if e.name in FORMATS and e.is_dir() and not e.is_symlink()
                and _export_manifest_format(e) == e.name for x in _foreign_entries(e, e.name)]
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        return f"it holds {shown}, which no export wrote"
    return None


def _check_writable(out_dir: Path) -> None:
    """Refuse before any work when the folder that receives ``out_dir`` cannot be made or written."""
    parent = out_dir.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ExportError(f"export target {out_dir}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"export target {out_dir}: no write permission in {parent}")


def _check_target(out_dir: Path, force: bool, protected: Sequence[Path]) -> None:
    """Refuse a target that is a file, holds / is an input or the cwd, or is a non-empty folder
    other than a previous export (that one only with force). Raises ExportError naming the folder."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"export target {out_dir} exists and is not a folder")
    target = out_dir.resolve()
    for p in [Path.cwd(), *protected]:
        p = Path(p).resolve()
        if target == p or target in p.parents:
            raise ExportError(f"export target {out_dir} is or contains {p}; pick a new folder")
    if out_dir.is_dir():
        try:
            empty = not any(out_dir.iterdir())
            why = None if empty else _previous_export(out_dir)
        except OSError as e:
            raise ExportError(f"export target {out_dir} cannot be read: {e.strerror or e}") from e
        if why is not None:
            raise ExportError(f"export target {out_dir} is not empty and is not a previous export ({why}); "
                              "refusing to replace it even with --force: pick a new or empty folder")
        if not empty and not force:
            raise ExportError(f"export target {out_dir} is not empty (a previous export); pass --force "
                              "(force=True) to replace it")
    _check_writable(out_dir)


def _os_reason(e: OSError) -> str:
    """``[Errno 16] Device or resource busy`` -> ``device or resource busy`` (the path is named by the caller)."""
    return (e.strerror or str(e)).lower()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _hidden_name(out_dir: Path) -> str:
    """Prefix of the hidden folders an export works in beside ``out_dir``: ``.<name>.<pid>.``."""
    return f".{out_dir.name}.{os.getpid()}."


def clean_killed_exports(out_dir: Path) -> list[str]:
    """What a killed export left beside ``out_dir``: its hidden ``.<name>.<pid>.*.partial`` work folder
    (removed) and, when the kill fell between the two renames of :func:`_publish`, the previous export
    in ``.<name>.<pid>.*.old`` while ``out_dir`` is absent (renamed back). Only folders of processes
    that are gone are touched. Returns a line per action."""
    pattern = re.compile(rf"\.{re.escape(out_dir.name)}\.(\d+)\.[a-z0-9_]+\.(partial|old)")
    done = []
    if not out_dir.parent.is_dir():
        return done
    for leftover in sorted(out_dir.parent.iterdir()):
        m = pattern.fullmatch(leftover.name)
        if not m or not leftover.is_dir() or _pid_alive(int(m.group(1))):
            continue
        if m.group(2) == "old" and not out_dir.exists() and _previous_export(leftover) is None:
            leftover.rename(out_dir)
            done.append(f"recovered the previous export {out_dir} from {leftover.name} (a killed export)")
        else:
            shutil.rmtree(leftover, ignore_errors=True)
            done.append(f"removed {leftover.name}, left by a killed export")
    for line in done:
        log.warning("export: %s", line)
    return done


def _publish(tmp: Path, out_dir: Path) -> None:
    """Rename ``tmp`` to ``out_dir``; an existing ``out_dir`` is moved aside first and removed after."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=_hidden_name(out_dir), suffix=".old", dir=out_dir.parent))
        old.rmdir()
        out_dir.rename(old)
    try:
        tmp.rename(out_dir)
    except OSError:
        if old is not None:
            old.rename(out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

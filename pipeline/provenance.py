"""What a result was made from: digests of the code, of files (checkpoints, weights) and of the data.

Every resumable result (a store's ``.partial`` folder, a training stage's ``resume.pt``) carries a
fingerprint. A re-run resumes only when the fingerprint is the same, so it must change with
everything that shapes the result:

- the params that stage reads (passed in by each caller);
- the code: :func:`code_digest`, the source of every module of ``pipeline/`` and ``stages/`` and of the plugin modules params name
  (added by :class:`pipeline.store.StoreWriter` and :class:`pipeline.training.ResumePoint` themselves);
- the inputs: the prepared data (:func:`prepared_digest`, which includes the dataset files' content,
  see :func:`dataset_digest`), model checkpoints (:func:`file_digest`), input stores' fingerprints,
  the training labels.

:func:`dataset_digest` also feeds the ``digest_data`` DVC stage, so an edited image or labels file
makes ``dvc repro`` re-run ``prepare`` and what follows.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent.parent
CODE_PACKAGES = ("pipeline", "stages")


def _hash_file(h, path: Path) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def file_digest(path: str | Path) -> str:
    """sha256 (16 hex digits) of a file's bytes."""
    h = hashlib.sha256()
    _hash_file(h, Path(path))
    return h.hexdigest()[:16]


@lru_cache(maxsize=1)
def library_digest() -> str:
    """sha256 (16 hex digits) over the path and source of every ``.py`` file of the library and the
    stage scripts (read once per process)."""
    h = hashlib.sha256()
    for package in CODE_PACKAGES:
        for path in sorted((_ROOT / package).rglob("*.py")):
            h.update(str(path.relative_to(_ROOT)).encode() + b"\0")
            _hash_file(h, path)
    return h.hexdigest()[:16]


def code_digest() -> str:
    """The library's digest, combined with the source of every plugin module the params named
    (:func:`pipeline.registry.plugin_source_files`): any code edit between an interrupted run and its
    re-run discards the partial result."""
    from pipeline.registry import plugin_source_files

    plugins = plugin_source_files()
    if not plugins:
        return library_digest()
    h = hashlib.sha256(library_digest().encode())
    for path in plugins:
        h.update(b"\0plugin\0" + str(path).encode() + b"\0")
        _hash_file(h, path)
    return h.hexdigest()[:16]


def weights_digest(spec: str) -> str:
    """A weights param (``imagenet``, ``none``, a path): the file's digest when it names a file, else itself."""
    return f"file:{file_digest(spec)}" if spec and Path(spec).is_file() else str(spec)


def prepared_digest(prepared_dir: str | Path) -> str:
    """Digest of a prepared dataset: its index (ids, sizes, labels, the dataset files' digest) and its GT store."""
    prepared_dir = Path(prepared_dir)
    h = hashlib.sha256()
    _hash_file(h, prepared_dir / "index.json")
    gt_attrs = prepared_dir / "gt.zarr" / "zarr.json"
    if gt_attrs.is_file():
        h.update(str(json.loads(gt_attrs.read_text()).get("attributes", {}).get("fingerprint")).encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- dataset files

def _dataset_files(root: Path) -> list[Path]:
    """Every regular file under ``root`` (hidden files and folders skipped), sorted; symlinked folders
    and files are followed (a dataset often links its images from elsewhere), each real folder once."""
    if root.is_file():
        return [root]
    out, seen = [], set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link back into a folder already walked
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [Path(folder) / f for f in files if not f.startswith(".") and os.path.isfile(Path(folder) / f)]
    return sorted(out)


# data params naming files or folders a dataset reads besides data.root (absolute, or relative to it)
DATASET_PATH_PARAMS = {"folder": ("folder_csv", "folder_classes", "folder_images"),
                       "coco": ("coco_train_json", "coco_val_json", "coco_train_images", "coco_val_images")}


def dataset_inputs_outside_root(data: dict) -> list[Path]:
    """The files and folders the dataset params name that lie outside ``data.root`` (an absolute
    ``data.folder_images``, a symlink to elsewhere is followed by the walk itself)."""
    root = Path(os.path.abspath(data["root"]))
    out = []
    for key in DATASET_PATH_PARAMS.get(data["dataset"], ()):
        path = Path(os.path.normpath(root / data[key]))
        if path.exists() and not path.is_relative_to(root):  # under the root (even through a link): walked already
            out.append(path.resolve())
    return sorted(set(out))


# datasets the prepare stage generates from the data params into its own output (no files to digest)
GENERATED_DATASETS = ("demo", "demo_stuff")


def dataset_digest(data: dict, cache_file: str | Path | None = None) -> dict:
    """Content digest of the dataset files under ``data.root`` (every file, sha256 each).

    Returns ``{"dataset", "root", "files", "bytes", "digest"}``; ``digest`` changes when any file's
    content, name or presence changes. The demos are generated from params, so their digest covers
    the ``data`` params that make them only. ``cache_file``: a JSON of (size, mtime) -> sha256 from an earlier call;
    files whose size and mtime are unchanged are not read again (how DVC's own state works).
    """
    if data["dataset"] in GENERATED_DATASETS:
        made_by = {k: v for k, v in data.items() if k.startswith("demo_")}
        if data["dataset"] != "demo":  # the object demo's digest stays what it was
            made_by.update(dataset=data["dataset"], folder_val_fraction=data["folder_val_fraction"])
        blob = json.dumps(made_by, sort_keys=True).encode()
        return {"dataset": data["dataset"], "root": None, "files": 0, "bytes": 0,
                "digest": hashlib.sha256(blob).hexdigest()[:16]}
    root = Path(data["root"])
    if not root.is_dir():
        raise FileNotFoundError(f"param data.root: dataset folder {root} does not exist")
    extra = dataset_inputs_outside_root(data)
    out = {"dataset": data["dataset"], "root": str(root), **files_digest(root, cache_file, extra_roots=extra)}
    if extra:
        out["outside_root"] = [str(p) for p in extra]
    return out


def files_digest(root: Path, cache_file: str | Path | None = None, extra_roots: list[Path] = ()) -> dict:
    """``{"files", "bytes", "digest"}`` over every file under ``root`` and under each of ``extra_roots``
    (files or folders outside it, keyed by their absolute path; see :func:`dataset_digest`)."""
    cache: dict[str, list] = {}
    if cache_file is not None and Path(cache_file).is_file():
        try:
            cache = json.loads(Path(cache_file).read_text())
        except ValueError:
            cache = {}
    fresh: dict[str, list] = {}
    h = hashlib.sha256()
    total = 0
    named = [(path, path.relative_to(root).as_posix()) for path in _dataset_files(root)]
    for extra in extra_roots:
        named += [(path, f"{extra}::{path.relative_to(extra).as_posix() if extra.is_dir() else ''}")
                  for path in _dataset_files(Path(extra))]
    for path, rel in named:
        st = path.stat()
        known = cache.get(rel)
        if known and known[0] == st.st_size and known[1] == st.st_mtime_ns:
            digest = known[2]
        else:
            digest = file_digest(path)
        fresh[rel] = [st.st_size, st.st_mtime_ns, digest]
        h.update(f"{rel}\0{digest}\n".encode())
        total += st.st_size
    if cache_file is not None:
        Path(cache_file).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(str(cache_file) + ".tmp")
        tmp.write_text(json.dumps(fresh))
        tmp.replace(cache_file)
    return {"files": len(fresh), "bytes": total, "digest": h.hexdigest()[:16]}


def describe_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    """Which top-level keys of two fingerprint inputs differ, e.g. ``"code, inputs.model"``."""
    keys = sorted(set(old) | set(new))
    changed = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += [f"{k}.{s}" for s in sorted(set(a) | set(b)) if a.get(s) != b.get(s)]
        elif a != b:
            changed.append(k)
    return ", ".join(changed) or "unknown"


def state_digest(model) -> str:
    """sha256 (16 hex digits) of a model's state dict (names, shapes, values): the weights a result came from."""
    import torch

    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}\0{tuple(t.shape)}\0{t.dtype}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def git_revision_status(repo_dir: str | Path = ".") -> tuple[dict | None, str | None]:
    """``({"commit": sha, "dirty": bool}, None)`` of the git work tree at ``repo_dir``, or
    ``(None, why)`` when there is none (not a git repository, no commit yet, git missing)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--verify", "HEAD"], cwd=repo_dir, capture_output=True, text=True,
                             timeout=10)
    except OSError as e:
        return None, f"git could not run in {repo_dir}: {e.strerror or e}"
    except subprocess.TimeoutExpired:
        return None, f"git rev-parse HEAD timed out in {repo_dir}"
    if sha.returncode != 0:
        err = sha.stderr.strip().splitlines()
        if any("not a git repository" in line for line in err):
            return None, f"{repo_dir} is not a git repository"
        return None, f"git rev-parse HEAD failed in {repo_dir} (no commit yet?): {err[0] if err else sha.returncode}"
    revision = {"commit": sha.stdout.strip(), "dirty": None}
    try:
        st = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo_dir,
                            capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        revision["dirty_unavailable"] = f"git status failed: {e}"
        return revision, None
    if st.returncode == 0:
        revision["dirty"] = bool(st.stdout.strip())
    else:
        revision["dirty_unavailable"] = f"git status failed: {st.stderr.strip().splitlines()[:1] or st.returncode}"
    return revision, None


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")

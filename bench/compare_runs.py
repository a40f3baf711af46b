"""Compare two finished runs of the graph (e.g. the demo before and after a refactor): every zarr store
array-equal, every metrics file identical except timings, every model's weights equal.

    python bench/compare_runs.py RUN_A RUN_B
    python bench/compare_runs.py --digests RUN > digests.json     # one digest per array, metrics file, model

Prints one line per file and exits 1 when anything differs. ``run_digests`` is what a test compares
with digests recorded from an earlier revision (tests/fixtures/tiny_demo_digests.json)."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import zarr

TIMING_KEYS = {"seconds", "images_per_s", "img_per_s", "time", "times", "created", "wall_s", "duration", "elapsed",
               "samples_per_s", "throughput"}


def strip_timings(obj):
    if isinstance(obj, dict):
        return {k: strip_timings(v) for k, v in obj.items()
                if k not in TIMING_KEYS and "seconds" not in k and not k.endswith(("_s", "_per_s"))}
    if isinstance(obj, list):
        return [strip_timings(v) for v in obj]
    return obj


def arrays(group: zarr.Group, prefix: str = ""):
    for name, item in group.members():
        if isinstance(item, zarr.Group):
            yield from arrays(item, f"{prefix}{name}/")
        else:
            yield f"{prefix}{name}", item


def compare_store(a: Path, b: Path) -> list[str]:
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    out = []
    aa, bb = dict(arrays(ga)), dict(arrays(gb))
    if set(aa) != set(bb):
        out.append(f"arrays differ: {sorted(set(aa) ^ set(bb))}")
    for name in sorted(set(aa) & set(bb)):
        if not np.array_equal(aa[name][...], bb[name][...]):
            out.append(f"array {name} differs")
    ids_a, ids_b = ga.attrs.get("ids"), gb.attrs.get("ids")
    if ids_a != ids_b:
        out.append("ids differ")
    return out


def compare_model(a: Path, b: Path) -> list[str]:
    import torch

    sa, sb = torch.load(a, weights_only=True, map_location="cpu"), torch.load(b, weights_only=True, map_location="cpu")
    state_a, state_b = sa.get("state_dict", sa), sb.get("state_dict", sb)
    if set(state_a) != set(state_b):
        return ["weight names differ"]
    return [f"weights {k} differ" for k in state_a
            if torch.is_tensor(state_a[k]) and not torch.equal(state_a[k], state_b[k])]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def run_digests(run: str | Path) -> dict[str, str]:
    """{what: digest} of a finished run: each store array (values and shape) and id list, each metrics
    file without timings, each model's weights, and the exported masks' content (VOC PNG pixels,
    COCO annotations and categories; manifests carry times and are left out)."""
    import torch

    run = Path(run)
    out = {}
    for store in sorted(p for p in run.glob("data/**/*.zarr") if p.is_dir() and not p.name.endswith(".partial")):
        rel = store.relative_to(run).as_posix()
        group = zarr.open_group(str(store), mode="r")
        out[f"{rel} ids"] = _sha(json.dumps(group.attrs.get("ids")).encode())
        for name, array in arrays(group):
            values = np.ascontiguousarray(array[...])
            out[f"{rel}/{name}"] = _sha(str((values.shape, values.dtype.str)).encode() + values.tobytes())
    for f in sorted(run.glob("metrics/*.json")):
        out[f.relative_to(run).as_posix()] = _sha(json.dumps(strip_timings(json.loads(f.read_text())), sort_keys=True).encode())
    for f in sorted(run.glob("models/**/*.pt")):
        ckpt = torch.load(f, weights_only=True, map_location="cpu")
        state = ckpt.get("state_dict", ckpt)
        blob = b"".join(k.encode() + state[k].numpy().tobytes() for k in sorted(state) if torch.is_tensor(state[k]))
        out[f.relative_to(run).as_posix()] = _sha(blob)
    for f in sorted(run.glob("exports/**/SegmentationClass/*.png")):
        from PIL import Image

        out[f.relative_to(run).as_posix()] = _sha(np.asarray(Image.open(f)).tobytes())
    for f in sorted(run.glob("exports/**/annotations/*.json")):
        doc = json.loads(f.read_text())
        out[f.relative_to(run).as_posix()] = _sha(json.dumps([doc["annotations"], doc["categories"], doc["images"]],
                                                             sort_keys=True).encode())
    return out


def main() -> None:
    if sys.argv[1] == "--digests":
        print(json.dumps(run_digests(sys.argv[2]), indent=1, sort_keys=True))
        return
    a, b = (Path(p) for p in sys.argv[1:3])
    differ = 0
    stores = sorted(p.relative_to(a) for p in a.glob("data/**/*.zarr") if p.is_dir() and not p.name.endswith(".partial"))
    for rel in stores:
        problems = compare_store(a / rel, b / rel) if (b / rel).is_dir() else [f"missing in {b}"]
        differ += bool(problems)
        print(f"{'DIFFERS' if problems else 'equal  '} store {rel} {'; '.join(problems)}")
    for rel in sorted(p.relative_to(a) for p in a.glob("metrics/*.json")):
        ja = strip_timings(json.loads((a / rel).read_text()))
        jb = strip_timings(json.loads((b / rel).read_text())) if (b / rel).is_file() else None
        same = ja == jb
        differ += not same
        print(f"{'equal  ' if same else 'DIFFERS'} metrics {rel}")
        if not same and jb is not None:
            keys = sorted(k for k in set(ja) | set(jb) if ja.get(k) != jb.get(k))
            print(f"          keys that differ: {keys}")
    for rel in sorted(p.relative_to(a) for p in a.glob("models/**/*.pt")):
        problems = compare_model(a / rel, b / rel) if (b / rel).is_file() else [f"missing in {b}"]
        differ += bool(problems)
        print(f"{'DIFFERS' if problems else 'equal  '} model {rel} {'; '.join(problems[:3])}")
    print(f"{differ} file(s) differ")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()

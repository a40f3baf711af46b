"""The fully-supervised upper bound: the same segmenter trained on GT masks, as part of this run.

``seg.upper_bound: true`` makes the upper_bound stage train the segmenter with this run's ``seg``
params on the GT of ``data.train_split`` and score it on ``data.eval_split``; its metrics carry their
provenance (code revision, a digest of the params that define the bound, the date). With ``false``
the stage records that nothing was measured, unless ``seg.upper_bound_from`` names the metrics file
of another run (e.g. an experiment's ``metrics/segmenter_gt.json``), which is copied with the
provenance it carries. The report shows a bound as this run's only when its provenance equals this
run's (:func:`provenance_matches`); otherwise it is marked "from another run", in red.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

# the params that define the bound: the segmenter's training and evaluation, the data it sees, the seed
BOUND_PARAMS = {"seg": ("backbone", "weights", "epochs", "batch_size", "lr", "weight_decay", "crop_size", "head_lr_mult",
                        "scale_min", "scale_max", "aspp_rates", "aspp_channels", "decoder", "saliency_weight",
                        "frozen_levels", "freeze_bn", "dropout", "eval_scales", "eval_flip", "eval_crf"),
                "data": ("dataset", "root", "background", "train_split", "eval_split", "max_images"),
                "compute": ("seed",)}


def bound_params_digest(params: dict) -> str:
    """A digest of the params that define the upper bound (:data:`BOUND_PARAMS`)."""
    picked = {ns: {k: params[ns][k] for k in keys} for ns, keys in BOUND_PARAMS.items()}
    return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]


def run_provenance(params: dict, repo_dir: str | Path = ".") -> dict:
    """What identifies this run's bound: the code that ran (:func:`pipeline.provenance.code_digest`,
    the library's and plugins' sources) with its git revision for people (None, and why, outside a
    git checkout), the params digest and the date."""
    from pipeline.provenance import code_digest, git_revision_status, utc_now

    revision, why = git_revision_status(repo_dir)
    return {"code_digest": code_digest(), "code_revision": (revision or {}).get("commit"),
            "code_revision_unavailable": why, "params_digest": bound_params_digest(params), "created": utc_now()}


def provenance_matches(bound: dict | None, params: dict, repo_dir: str | Path = ".") -> tuple[bool, list[str]]:
    """(whether ``bound`` — an upper-bound metrics dict — was measured by this run's code and params,
    the differences in words). A bound without provenance never matches."""
    if not bound:
        return False, ["no upper bound"]
    prov = bound.get("provenance")
    if not prov:
        return False, ["it records no provenance (code revision, params, date)"]
    here = run_provenance(params, repo_dir)
    why = []
    if prov.get("params_digest") != here["params_digest"]:
        why.append(f"params digest {prov.get('params_digest')} ≠ this run's {here['params_digest']}")
    if prov.get("code_digest") != here["code_digest"]:
        why.append(f"code {prov.get('code_digest')} (revision {str(prov.get('code_revision'))[:12]}) ≠ this run's "
                   f"{here['code_digest']} (revision {str(here['code_revision'])[:12]})")
    if bound.get("source"):
        why.append(f"copied from {bound['source']}")
    return not why, why


def bound_for_report(bound: dict | None, params: dict, repo_dir: str | Path = ".") -> tuple[dict | None, str | tuple]:
    """(the bound to show, marked ``foreign`` when :func:`provenance_matches` fails, or None when
    nothing was measured; the report's note about it — a ("foreign", text) pair to be drawn red)."""
    if not bound or bound.get("measured", True) is False or bound.get("miou") is None:
        return None, "Upper bound: not measured in this run; set seg.upper_bound: true to train the same segmenter on GT."
    same, why = provenance_matches(bound, params, repo_dir)
    prov = bound.get("provenance") or {}
    if same:
        return {**bound, "foreign": False}, ("Upper bound: measured by this run (stage upper_bound: same code and "
                                             f"params, {prov.get('created')}).")
    return {**bound, "foreign": True}, ("foreign", f"Upper bound FROM ANOTHER RUN, not this one: {'; '.join(why)}. It "
                                        f"was measured {prov.get('created', 'at an unknown date')} with code revision "
                                        f"{str(prov.get('code_revision'))[:12]}, params digest {prov.get('params_digest')}.")


def not_measured(reason: str) -> dict:
    """The metrics of a run that measured no bound."""
    return {"measured": False, "reason": reason, "miou": None}


def copy_foreign_bound(path: str | Path) -> dict:
    """An upper bound from another run's metrics file, marked with where it came from."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"param seg.upper_bound_from: {path} does not exist")
    try:
        bound = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"param seg.upper_bound_from: {path} is not JSON: {e}") from e
    if not isinstance(bound, dict) or bound.get("miou") is None:
        raise ValueError(f"param seg.upper_bound_from: {path} holds no measured upper bound (no 'miou')")
    return {**bound, "measured": True, "source": str(path.resolve())}


def run_upper_bound(prepared, params: dict, classifier: str | Path | None, out: str | Path, *, device,
                    resume: str | Path, repo_dir: str | Path = ".", saliency: str | Path | None = None) -> dict:
    """What the upper_bound stage does. With ``seg.upper_bound``: train the segmenter on GT into
    ``out/segmenter.pt`` (its saliency head, with ``seg.saliency_weight``, on the store ``saliency``),
    predict the eval split into ``out/predictions.zarr``, return its
    metrics with ``provenance`` and ``measured`` True. Otherwise the foreign bound of
    ``seg.upper_bound_from`` or :func:`not_measured`; ``out`` then holds only ``NOT_TRAINED.txt``
    saying why (no model that could pass for one)."""
    from pipeline.segment import run_evaluate, run_train_seg

    seg, out_dir = params["seg"], Path(out)
    if not seg["upper_bound"]:
        reason = ("seg.upper_bound is false: no GT-trained segmenter in this run"
                  + (f"; the bound shown is copied from {seg['upper_bound_from']}" if seg["upper_bound_from"] else
                     "; set seg.upper_bound: true to measure it"))
        result = copy_foreign_bound(seg["upper_bound_from"]) if seg["upper_bound_from"] else not_measured(reason)
        shutil.rmtree(out_dir, ignore_errors=True)  # no model of an earlier run may pass for this run's
        out_dir.mkdir(parents=True)
        (out_dir / "NOT_TRAINED.txt").write_text(reason + "\n")
        return result
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "NOT_TRAINED.txt").unlink(missing_ok=True)
    gt_params = {**params, "seg": {**seg, "labels": "gt"}}
    checkpoint = out_dir / "segmenter.pt"
    trained = run_train_seg(prepared, gt_params, None, classifier, checkpoint,
                            device=device, resume=resume, saliency=saliency)
    result = run_evaluate(prepared, gt_params, checkpoint, out_dir / "predictions.zarr", device=device)
    return {**result["metrics"], "measured": True, "train": trained["metrics"],
            "provenance": run_provenance(params, repo_dir)}

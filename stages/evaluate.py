"""Stage evaluate: segmenter on the eval split -> data/predictions.zarr, metrics/segmenter.json,
metrics/labels.json (cam + crf + rw merged), plots/evaluate/*.csv and reports/ (index.html and the
worst-first page). The upper bound comes from the upper_bound stage (metrics/segmenter_gt.json) and
is shown as this run's only when its provenance matches this run's code and params.
"""
from pipeline.datasets import PreparedData
from pipeline.metrics import read_json, write_csv, write_json
from pipeline.progress import stage_timer
from pipeline.report import build_run_report, merge_label_metrics
from pipeline.segment import run_evaluate
from stages.common import (CAMS, LABEL_METRICS, METRICS, PLOTS, PREDICTIONS, PREPARED, PSEUDO, REPORTS,
                           SEEDS, SEG_METRICS, SEG_MODEL, start, torch_device)

UPPER_BOUND = METRICS["upper_bound"]


def main() -> None:
    params = start("evaluate")
    device = torch_device(params)
    prepared = PreparedData(params["data"], PREPARED)
    with stage_timer("evaluate") as t:
        result = run_evaluate(prepared, params, SEG_MODEL / "segmenter.pt", PREDICTIONS, device=device)
        m, on = result["metrics"], result["checkpoint"]["labels"]
        t.n = m["images"]
        t.extra = (f"segmenter (trained on {on}) {m['split']} "
                   + (f"mIoU {m['miou']}%" if m["ground_truth"] else "not scored: no ground truth"))
    write_json(SEG_METRICS, m)
    labels = merge_label_metrics({key: METRICS[key] for key in ("cam", "crf", "rw")})
    write_json(LABEL_METRICS, labels)
    rows = build_run_report(prepared, params, result, labels, read_json(UPPER_BOUND),
                            {"cam": CAMS, "crf": SEEDS, "rw": PSEUDO, "segmenter": PREDICTIONS}, REPORTS, device)
    write_csv(PLOTS / "evaluate" / "per_class_iou.csv", [{"class": c, "iou": v} for c, v in m["per_class_iou"].items()])
    write_csv(PLOTS / "evaluate" / "stages.csv", rows, ["stage", "miou"])


if __name__ == "__main__":
    main()

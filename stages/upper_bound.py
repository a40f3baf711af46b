"""Stage upper_bound: with seg.upper_bound, the segmenter trained on GT -> models/seg_gt/, metrics/segmenter_gt.json
(with its provenance); without, metrics/segmenter_gt.json says nothing was measured (or copies seg.upper_bound_from)."""
from pipeline.metrics import write_json
from pipeline.paths import UPPER_BOUND_MODEL
from pipeline.progress import stage_timer
from pipeline.upper_bound import run_upper_bound
from stages.common import CAM_MODEL, METRICS, PREPARED, SALIENCY, resume_file, start, torch_device


def main() -> None:
    params = start("upper_bound")
    device = torch_device(params, params["seg"]["num_workers"], seed=True)
    with stage_timer("upper_bound") as t:
        m = run_upper_bound(PREPARED, params, CAM_MODEL / "classifier.pt", UPPER_BOUND_MODEL, device=device,
                            resume=resume_file(UPPER_BOUND_MODEL), saliency=SALIENCY)
        t.n = m.get("images", 0)
        t.extra = (f"GT-trained segmenter {m['split']} mIoU {m['miou']}%" if m.get("provenance") else
                   f"copied from {m['source']}: mIoU {m['miou']}%" if m.get("source") else m["reason"])
    write_json(METRICS["upper_bound"], m)


if __name__ == "__main__":
    main()

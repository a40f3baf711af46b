"""Stage train_seg: pseudo masks (or GT, seg.labels=gt) -> models/seg/segmenter.pt + plots/train_seg/history.csv."""
import csv

from pipeline.compute import resolve_device, seed_everything, set_torch_threads
from pipeline.datasets import PreparedData
from pipeline.models.segmenter import build_segmenter
from pipeline.progress import stage_timer
from pipeline.provenance import prepared_digest
from pipeline.segment import SegTrainSet, mask_source, save_segmenter, train_segmenter
from pipeline.store import Store
from pipeline.training import clear_resume
from stages.common import PLOTS, PREPARED, PSEUDO, SEG_MODEL, resume_file, start

RESUME = resume_file(SEG_MODEL)


def main() -> None:
    params = start("train_seg")
    seg, data, compute = params["seg"], params["data"], params["compute"]
    seed_everything(compute["seed"])
    device = resolve_device(compute["device"])
    set_torch_threads(compute, device, seg["num_workers"])
    prepared = PreparedData(data, PREPARED)
    ids = prepared.ids(data["train_split"])
    masks = mask_source(seg["labels"], prepared, PSEUDO, ids)
    train_set = SegTrainSet(prepared, ids, masks, seg["crop_size"], seg["scale_min"], seg["scale_max"], compute["seed"])
    model = build_segmenter(prepared.num_classes, seg)
    with stage_timer("train_seg") as t:
        labels = Store(PSEUDO).attrs.get("fingerprint") if seg["labels"] == "pseudo" else "gt"
        history = train_segmenter(model, train_set, seg, device, compute["seed"], RESUME,
                                  {"labels": labels, "prepared": prepared_digest(PREPARED)})
        t.n = len(ids) * seg["epochs"]
        t.extra = f"labels {seg['labels']}, {seg['epochs']} epochs on {device}, final loss {history[-1]['loss']:.4f}"
    save_segmenter(SEG_MODEL / "segmenter.pt", model, seg, prepared.class_names, seg["labels"], history)
    clear_resume(RESUME)
    out = PLOTS / "train_seg" / "history.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["epoch", "loss", "images_per_s"])
        w.writeheader()
        w.writerows({k: round(r[k], 5) for k in w.fieldnames} for r in history)


if __name__ == "__main__":
    main()

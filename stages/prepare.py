"""Stage prepare: dataset (or demo) -> data/prepared/{index.json, gt.zarr, skipped.json}."""
from pipeline.datasets import PreparedData
from pipeline.metrics import write_json
from pipeline.prepare import class_statistics, prepare_dataset, save_contact_sheet
from pipeline.progress import stage_timer
from pipeline.provenance import dataset_digest
from stages.common import DIGEST_CACHE, METRICS, PLOTS, PREPARED, start


def main() -> None:
    params = start("prepare")
    data = params["data"]
    with stage_timer("prepare") as t:
        summary = prepare_dataset(data, PREPARED, shard_images=params["compute"]["shard_images"],
                                  source=dataset_digest(data, cache_file=DIGEST_CACHE))
        t.n = sum(summary["images"].values())
        t.extra = f"{summary['skipped']} skipped (see {PREPARED / 'skipped.json'})"
    prepared = PreparedData(data, PREPARED)
    summary["train_classes"] = class_statistics(prepared, data["train_split"])
    write_json(METRICS["data"], summary)
    save_contact_sheet(prepared, data["train_split"], PLOTS / "data" / "contact_sheet.png")


if __name__ == "__main__":
    main()

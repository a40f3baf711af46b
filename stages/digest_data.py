"""Stage digest_data (always runs, takes seconds): dataset files under data.root -> data/dataset_digest.json,
and what saliency.source reads (a folder's maps, the detector's model file) -> data/saliency_digest.json.

Each file holds a content digest, so `dvc repro` re-runs prepare (or the saliency stage) when an
image, mask, labels file, saliency map or model file is edited, and nothing when none is."""
from pipeline.metrics import write_json
from pipeline.progress import stage_timer
from pipeline.provenance import dataset_digest
from pipeline.saliency.sources import saliency_digest
from stages.common import DATASET_DIGEST, DIGEST_CACHE, SALIENCY_CACHE, SALIENCY_DIGEST, start


def main() -> None:
    params = start("digest_data")
    with stage_timer("digest_data") as t:
        digest = dataset_digest(params["data"], cache_file=DIGEST_CACHE)
        saliency = saliency_digest(params["saliency"], SALIENCY_CACHE)
        t.n = digest["files"]
        t.extra = f"{digest['bytes'] / 1e6:.1f} MB, digest {digest['digest']}"
    write_json(DATASET_DIGEST, digest)
    write_json(SALIENCY_DIGEST, saliency)


if __name__ == "__main__":
    main()

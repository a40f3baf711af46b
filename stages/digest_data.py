"""Stage digest_data (always runs, takes seconds): dataset files under data.root -> data/dataset_digest.json.

The file holds a content digest of every dataset file, so `dvc repro` re-runs prepare (and what
follows) when an image, mask or labels file is edited, and nothing when none is."""
from pipeline.metrics import write_json
from pipeline.progress import stage_timer
from pipeline.provenance import dataset_digest
from stages.common import DATASET_DIGEST, DIGEST_CACHE, start


def main() -> None:
    params = start("digest_data")
    with stage_timer("digest_data") as t:
        digest = dataset_digest(params["data"], cache_file=DIGEST_CACHE)
        t.n = digest["files"]
        t.extra = f"{digest['bytes'] / 1e6:.1f} MB, digest {digest['digest']}"
    write_json(DATASET_DIGEST, digest)


if __name__ == "__main__":
    main()

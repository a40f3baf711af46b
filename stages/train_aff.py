"""Stage train_aff: data/seeds.zarr (+ the CAM classifier) -> models/affinity/affinity.pt, plots/train_aff/history.csv."""
import csv

from pipeline.compute import resolve_device, seed_everything, set_torch_threads
from pipeline.models.affinity import build_affinity_net
from pipeline.progress import stage_timer
from pipeline.refine.affinity_training import train_affinity
from pipeline.refine.common import open_prepared
from pipeline.store import Store
from stages.common import AFF_MODEL, CAM_MODEL, PLOTS, PREPARED, SEEDS, resume_file, start

RESUME = resume_file(AFF_MODEL)


def main() -> None:
    params = start("train_aff")
    aff, compute = params["affinity"], params["compute"]
    seed_everything(compute["seed"])
    device = resolve_device(compute["device"])
    set_torch_threads(compute, device, aff["num_workers"])
    prepared = open_prepared(PREPARED, params["data"])
    seeds = Store(SEEDS)
    model, backbone_name = build_affinity_net(params["cam"]["backbone"], aff["init"], aff["stride"],
                                              CAM_MODEL / "classifier.pt", aff["embed_dim"], aff["frozen_levels"])
    with stage_timer("train_aff") as t:
        history = train_affinity(model, prepared, seeds, seeds.ids, aff, device, compute["seed"], backbone_name,
                                 AFF_MODEL / "affinity.pt", RESUME)
        t.n = len(seeds.ids) * aff["epochs"]
        t.extra = f"final loss {history[-1]['loss']:.4f}"
    out = PLOTS / "train_aff" / "history.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(history[0]))
        w.writeheader()
        w.writerows(history)


if __name__ == "__main__":
    main()

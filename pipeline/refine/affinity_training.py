"""Training AffinityNet on pixel-pair labels derived from CRF seeds."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, RandomSampler

from pipeline.augment import normalise, random_scale_crop_flip
from pipeline.models.affinity import AffinityNet, displacement_loss
from pipeline.models.pairs import pair_labels, pair_offsets, seed_to_grid
from pipeline.distributed import rank_loader
from pipeline.store import Store

log = logging.getLogger("wsss")


# The displacement branch's lr relative to affinity.lr. Its L1 loss in grid cells gives steps of
# about lr per weight whatever the error: at the heads' 10x lr (0.5 on the demo) SGD oscillated and
# the field stayed near zero (loss 4.3 -> 4.2 in 5 epochs); 0.1x learned (tests/test_instances.py).
DISPLACEMENT_LR_MULT = 0.1


class SeedCrops(Dataset):
    """(image, seed) pairs -> random scale/crop/flip -> {"image": (3, S, S) float, "seed": (S/s, S/s) long}.

    The seed grid samples each stride cell's centre pixel; padding and 255 seeds are ignored pairs.
    """

    def __init__(self, prepared, seeds: Store, ids, crop: int, stride: int, scale_min: float, scale_max: float, seed: int):
        self.prepared, self.seeds, self.ids = prepared, seeds, list(ids)
        self.crop, self.stride = crop, stride
        self.scale_min, self.scale_max = scale_min, scale_max
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng((self.seed, self.epoch, i))
        image = self.prepared.image(self.ids[i])
        seed = self.seeds.read("seed", self.ids[i])
        if seed.shape != image.shape[:2]:
            raise ValueError(f"{self.seeds.path}: seed of {self.ids[i]!r} is {seed.shape}, image is {image.shape[:2]}")
        image, (seed,), _ = random_scale_crop_flip(rng, image, [seed], self.crop, self.scale_min, self.scale_max)
        return {"image": normalise(image), "seed": torch.from_numpy(seed_to_grid(seed, self.stride).astype(np.int64))}


def affinity_param_groups(model: AffinityNet, aff: dict) -> list[dict]:
    """SGD param groups: the backbone at ``affinity.lr``; the heads at the multiplier the model names
    (``model.head_lr_param``): ``head_lr_mult`` x lr (AffinityNet) or ``boundary_lr_mult`` x lr
    (IRNet's boundary model: its loss on the boundary logits grows linearly, and at the heads' 10x
    the demo's loss went to NaN in epoch 1; IRNet trains its boundary branch at 1x); the
    displacement branch at DISPLACEMENT_LR_MULT x lr."""
    from pipeline.training import param_groups

    groups = param_groups(model.backbone, model.head_parameters(), aff["lr"], aff["weight_decay"],
                          aff[model.head_lr_param])
    disp_lr = aff["lr"] * DISPLACEMENT_LR_MULT
    groups.append({"params": list(model.displacement_head.parameters()), "lr": disp_lr, "base_lr": disp_lr,
                   "weight_decay": aff["weight_decay"]})
    return groups


def train_affinity(model: AffinityNet, prepared, seeds: Store, ids, aff: dict, device: torch.device, seed: int,
                   backbone_name: str, out_path: str | Path, resume_path: str | Path | None = None) -> list[dict]:
    """Train ``model`` with the ``affinity`` params; save the checkpoint to ``out_path``; return the per-epoch history.

    Loss per batch: the model's pair loss (``model.pair_loss``: :func:`affinity_loss`, on the boundary
    logits for IRNet's model) + IRNet's displacement
    loss (:func:`displacement_loss`, on detached features: it trains only the displacement branch).

    ``resume_path``: per-epoch resume checkpoint (see :class:`pipeline.training.ResumePoint`), removed
    once ``out_path`` is saved; it resumes only for the same params, ids, seeds store, prepared data,
    initial weights (e.g. the CAM classifier's) and code."""
    from pipeline.provenance import prepared_digest, state_digest
    from pipeline.store import fingerprint
    from pipeline.models.affinity import save_affinity_net
    from pipeline.training import ResumePoint, images_to, to_device, train_loop

    offsets = pair_offsets(aff["radius"])
    data = SeedCrops(prepared, seeds, ids, aff["crop_size"], model.stride, aff["scale_min"], aff["scale_max"], seed)
    gen = torch.Generator().manual_seed(seed)
    loader = rank_loader(data, RandomSampler(data, generator=gen), aff["batch_size"], "affinity.batch_size",
                         num_workers=aff["num_workers"], generator=gen, persistent_workers=False)
    model = to_device(model, device)
    opt = torch.optim.SGD(affinity_param_groups(model, aff), lr=aff["lr"], momentum=0.9)
    resume = None
    if resume_path:
        resume = ResumePoint(resume_path, fingerprint(dict(aff), seed, backbone_name, list(ids)), "train_aff",
                             generator=gen, inputs={"seeds": seeds.attrs.get("fingerprint"),
                                                    "prepared": prepared_digest(prepared.dir),
                                                    "initial_weights": state_digest(model)})
    counts = {"bg_pos": 0, "fg_pos": 0, "neg": 0}  # pairs seen by this process (not restored on resume)

    def step(batch):
        x = images_to(batch["image"], device)
        s = batch["seed"].to(device)
        bg, fg, neg = pair_labels(s, offsets, prepared.background)
        loss, n, d = model.training_outputs(x, offsets, bg, fg, neg)
        for k in counts:
            counts[k] += n[k]
        return loss + displacement_loss(d.float(), bg, fg, offsets)

    def epoch_end(epoch, loss):
        log.info("train_aff epoch %d: pairs so far bg+ %d, fg+ %d, neg %d", epoch + 1, counts["bg_pos"],
                 counts["fg_pos"], counts["neg"])

    history = train_loop(model, loader, step, opt, aff["epochs"], device, "train_aff",
                         on_epoch_start=lambda epoch: setattr(data, "epoch", epoch), on_epoch_end=epoch_end,
                         resume=resume)
    mean = set_displacement_mean(model, prepared, ids, device)
    log.info("train_aff: displacement field mean (dy, dx) = (%.3f, %.3f) grid cells over %d training images, "
             "subtracted from now on", mean[0], mean[1], len(ids))
    save_affinity_net(out_path, model.cpu(), backbone_name, aff["radius"], {"params": dict(aff), "pairs": dict(counts)})
    if resume:
        resume.clear()
    return history


def set_displacement_mean(model: AffinityNet, prepared, ids, device: torch.device) -> list[float]:
    """IRNet's last step of training: the displacement field is learnt only up to a constant (its loss
    sees differences), so its mean over the training images (each whole image, eval mode, every
    image weighted alike) is stored in ``model.displacement_head.mean``, which the branch subtracts
    from then on. Returns the mean (dy, dx) in grid cells."""
    from pipeline.models.pairs import grid_size
    from pipeline.progress import progress_bar

    head = model.displacement_head
    head.mean.zero_()
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad(), progress_bar(len(ids), "displacement mean", unit="img") as bar:
        for image_id in ids:
            x = normalise(prepared.image(image_id))[None].to(device)
            d = head(model.levels(x), grid_size(x.shape[-2:], model.stride))
            total += d.double().mean((0, 2, 3)).cpu()
            bar.update(1)
    head.mean.copy_((total / max(len(ids), 1)).to(head.mean.dtype))
    return [float(v) for v in head.mean]


def run_train_aff(prepared, params: dict, seeds: str | Path, classifier: str | Path, out: str | Path, *,
                  device: torch.device, resume: str | Path) -> dict:
    """What the train_aff stage does: build the AffinityNet (``affinity.init``, e.g. from the CAM
    classifier checkpoint ``classifier``; ``rw.affinity: irn`` for IRNet's boundary-based one), train
    it on the seed store ``seeds``, save the checkpoint ``out``, clear the resume file.
    Returns {"history", "metrics"}."""
    from pipeline.datasets.prepared import prepared_folder
    from pipeline.models.affinity import build_affinity_net
    from pipeline.refine.feature_affinity import TRAINED_KINDS
    from pipeline.refine.runner import open_prepared

    prepared_dir, seeds_path, classifier_path = prepared_folder(prepared), seeds, classifier
    checkpoint, resume_path = out, resume
    aff = params["affinity"]
    seeds = Store(seeds_path)
    if params["rw"]["affinity"] == "features":
        return save_untrained_backbone(params, classifier_path, checkpoint, len(seeds.ids))
    model, backbone_name = build_affinity_net(params["cam"]["backbone"], aff["init"], aff["stride"], classifier_path,
                                              aff["embed_dim"], aff["frozen_levels"],
                                              TRAINED_KINDS.get(params["rw"]["affinity"], params["rw"]["affinity"]))
    history = train_affinity(model, open_prepared(prepared_dir, params["data"]), seeds, seeds.ids, aff, device,
                             params["compute"]["seed"], backbone_name, checkpoint, resume_path)
    return {"history": history, "metrics": {"train_images": len(seeds.ids), "epochs": aff["epochs"], "model": model.kind,
                                            "final_loss": round(history[-1]["loss"], 5)}}



def save_untrained_backbone(params: dict, classifier_path: str | Path, checkpoint: str | Path, images: int) -> dict:
    """``rw.affinity: features``: nothing to train; save the backbone ``affinity.init`` names (frozen)
    for the walk's training-free affinities. Returns {"history": [], "metrics"}."""
    from pipeline.models.backbones import build_backbone
    from pipeline.refine.feature_affinity import save_feature_affinity

    aff = params["affinity"]
    if aff["init"] == "classifier":
        from pipeline.models.classifier import classifier_backbone

        backbone, name = classifier_backbone(classifier_path, "affinity.init")
    else:
        backbone, name = build_backbone(params["cam"]["backbone"], aff["init"]), params["cam"]["backbone"]
    save_feature_affinity(checkpoint, backbone, name, aff["stride"], aff["radius"], {"params": dict(aff)})
    log.info("train_aff: rw.affinity features needs no training; saved the %s backbone (affinity.init %s)", name,
             aff["init"])
    return {"history": [], "metrics": {"train_images": images, "epochs": 0, "model": "features", "final_loss": None}}

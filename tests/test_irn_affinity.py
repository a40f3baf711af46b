"""IRNet's boundary-based affinities (rw.affinity: irn): the path rule by hand, training on pair
labels separates two regions, and checkpoints rebuild the right model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.models.affinity import (AffinityNet, BoundaryAffinityNet, affinity_checkpoint, affinity_loss,
                                      build_affinity_net, load_affinity_net)
from pipeline.models.pairs import pair_labels, pair_offsets, segment_points
from pipeline.checkpoint import save_checkpoint


def test_segment_points_cover_the_straight_line_between_the_pair():
    assert segment_points(0, 3) == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert segment_points(2, -2) == [(0, 0), (1, -1), (2, -2)]
    assert segment_points(1, 0) == [(0, 0), (1, 0)]


def test_path_affinity_is_one_minus_the_largest_boundary_on_the_segment():
    boundary = torch.zeros(1, 1, 1, 6)
    boundary[..., 2] = 0.9
    boundary[..., 5] = 0.3
    aff = BoundaryAffinityNet.path_affinities(boundary, [(0, 1), (0, 4)])
    # offset (0, 1): cells x and x+1 -> 1 - max(B[x], B[x+1]); outside the grid -> 0
    np.testing.assert_allclose(aff[0, 0, 0].numpy(), [1.0, 0.1, 0.1, 1.0, 0.7, 0.0], atol=1e-6)
    # offset (0, 4): x=0 crosses the 0.9 at x=2; x=1 reaches x=5 (0.3) and crosses x=2
    np.testing.assert_allclose(aff[0, 1, 0].numpy(), [0.1, 0.1, 0.0, 0.0, 0.0, 0.0], atol=1e-6)


def test_training_on_pair_labels_puts_the_boundary_between_two_regions():
    torch.manual_seed(0)
    model, _ = build_affinity_net("tiny", "none", 4, kind="irn")
    assert isinstance(model, BoundaryAffinityNet) and model.kind == "irn"
    x = torch.zeros(1, 3, 32, 32)
    x[:, 0, :, 16:] = 2.0  # two halves of different colour
    seeds = torch.zeros(1, 8, 8, dtype=torch.long)
    seeds[:, :, 4:] = 1
    offsets = pair_offsets(3)
    bg, fg, neg = pair_labels(seeds, offsets)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    first = None
    for _ in range(40):
        loss, _, _ = model.training_outputs(x, offsets, bg, fg, neg)  # what train_aff minimises
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    model.eval()
    with torch.no_grad():
        aff = model(x, offsets)
    assert aff[neg].mean() < 0.5 < aff[bg | fg].mean()


def test_checkpoint_rebuilds_the_boundary_model_and_old_ones_stay_affinitynets(tmp_path):
    torch.manual_seed(0)
    model, _ = build_affinity_net("tiny", "none", 4, kind="irn")
    model.eval()
    save_checkpoint(tmp_path / "irn.pt", affinity_checkpoint(model, "tiny", radius=3))
    loaded = load_affinity_net(tmp_path / "irn.pt")
    x = torch.randn(1, 3, 24, 24)
    assert isinstance(loaded, BoundaryAffinityNet)
    torch.testing.assert_close(loaded(x, pair_offsets(3)), model(x, pair_offsets(3)))
    plain, _ = build_affinity_net("tiny", "none", 4)
    ck = affinity_checkpoint(plain, "tiny", radius=3)
    del ck["kind"]
    save_checkpoint(tmp_path / "old.pt", ck)
    assert type(load_affinity_net(tmp_path / "old.pt")) is AffinityNet
    with pytest.raises(ValueError, match="rw.affinity"):
        build_affinity_net("tiny", "none", 4, kind="edges")


def test_the_boundary_loss_on_logits_is_the_affinity_loss_and_stays_finite_when_saturated():
    torch.manual_seed(0)
    model, _ = build_affinity_net("tiny", "none", 4, kind="irn")
    x = torch.randn(2, 3, 24, 24)
    seeds = torch.randint(0, 3, (2, 6, 6))
    offsets = pair_offsets(3)
    bg, fg, neg = pair_labels(seeds, offsets)
    levels = model.levels(x)
    on_logits, counts = model.pair_loss(x, levels, offsets, bg, fg, neg)
    on_probs, same = affinity_loss(model.pair_affinities(x, levels, offsets), bg, fg, neg)
    assert counts == same and counts["neg"] > 0
    torch.testing.assert_close(on_logits, on_probs, rtol=1e-3, atol=1e-4)
    # a boundary map driven to 0 (logit -40): every affinity is exactly 1.0; on the probabilities the
    # negatives' gradient vanishes (sigmoid'(-40) ~ 4e-18), so the map could never come back; on the
    # logits they still pull with a gradient of order 1
    with torch.no_grad():
        model.edge.bias.fill_(-40.0)
        model.edge.weight.zero_()
    assert (model(x, offsets)[bg | fg | neg] == 1.0).all()
    stuck, _ = affinity_loss(model.pair_affinities(x, model.levels(x), offsets), bg, fg, neg)
    stuck.backward()
    assert model.edge.bias.grad.abs().item() < 1e-6
    model.zero_grad()
    loss, _ = model.pair_loss(x, model.levels(x), offsets, bg, fg, neg)
    loss.backward()
    assert torch.isfinite(loss) and 0.1 < model.edge.bias.grad.abs().item() <= 1.0


def test_the_boundary_heads_train_at_their_own_lr_multiplier():
    from pipeline.config import defaults
    from pipeline.refine.affinity_training import DISPLACEMENT_LR_MULT, affinity_param_groups

    aff = {**defaults()["affinity"], "lr": 0.05, "head_lr_mult": 10.0, "boundary_lr_mult": 1.0}
    for kind, head_lr in (("affinitynet", 0.5), ("irn", 0.05)):
        model, _ = build_affinity_net("tiny", "none", 4, kind=kind)
        backbone, heads, displacement = affinity_param_groups(model, aff)
        assert backbone["lr"] == 0.05 and heads["lr"] == pytest.approx(head_lr)
        assert displacement["lr"] == pytest.approx(0.05 * DISPLACEMENT_LR_MULT)
        if kind == "irn":
            assert any(p is model.edge.weight for p in heads["params"])
        # every trainable parameter is in exactly one group
        ids = [id(p) for g in (backbone, heads, displacement) for p in g["params"]]
        assert sorted(ids) == sorted(id(p) for p in model.parameters() if p.requires_grad)

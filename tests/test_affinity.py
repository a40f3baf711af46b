"""AffinityNet: pair offsets, pair labels, affinities, loss, training and checkpoints."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.models.affinity import AffinityNet, affinity_loss, build_affinity_net, load_affinity_net
from pipeline.models.pairs import pair_labels, pair_offsets, seed_to_grid
from pipeline.models.backbones import build_backbone
from synthetic import tiny_data_with_gt_seeds
from pipeline.store import Store


def test_radius_five_gives_34_half_plane_offsets():
    offs = pair_offsets(5)
    assert len(offs) == 34 and len(set(offs)) == 34
    assert all((-dy, -dx) not in offs for dy, dx in offs)  # each unordered pair once
    assert all(0 < dy * dy + dx * dx < 25 for dy, dx in offs)


def test_pair_labels_follow_the_seeds():
    seed = torch.tensor([[[0, 0, 1, 1, 255, 2]]])  # one row
    bg, fg, neg = pair_labels(seed, [(0, 1)])
    assert bg[0, 0, 0].tolist() == [True, False, False, False, False, False]
    assert fg[0, 0, 0].tolist() == [False, False, True, False, False, False]
    assert neg[0, 0, 0].tolist() == [False, True, False, False, False, False]  # 255 ends and the last column: ignored


def test_affinities_are_one_for_equal_features_and_zero_outside_the_grid():
    emb = torch.ones(1, 4, 3, 5)
    emb[:, :, :, 3:] = 5.0
    aff = AffinityNet.affinities(emb, [(0, 1), (1, 0)])
    assert aff.shape == (1, 2, 3, 5)
    assert torch.allclose(aff[0, 0, :, :2], torch.ones(3, 2))
    assert torch.allclose(aff[0, 0, :, 2], torch.full((3,), float(np.exp(-4.0))))
    assert (aff[0, 0, :, 4] == 0).all() and (aff[0, 1, 2] == 0).all()


def test_loss_rewards_high_positive_and_low_negative_affinity():
    ones = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    none = torch.zeros_like(ones)
    good, _ = affinity_loss(torch.full((1, 1, 2, 2), 0.99), ones, none, none)
    bad, _ = affinity_loss(torch.full((1, 1, 2, 2), 0.01), ones, none, none)
    assert good < bad
    neg_good, _ = affinity_loss(torch.full((1, 1, 2, 2), 0.01), none, none, ones)
    assert neg_good < bad


def test_seed_grid_samples_cell_centres():
    seed = np.zeros((10, 9), np.uint8)
    seed[4:8, :] = 3
    grid = seed_to_grid(seed, 4)
    assert grid.shape == (3, 3)
    assert grid[:, 0].tolist() == [0, 3, 0]


def test_a_few_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = AffinityNet(build_backbone("tiny", "none"), stride=4, freeze_bn=False)
    x = torch.randn(2, 3, 32, 32)
    x[:, :, :, 16:] += 2.0
    seed = torch.zeros(2, 8, 8, dtype=torch.long)
    seed[:, :, 4:] = 1
    offs = pair_offsets(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for _ in range(8):
        loss, _ = affinity_loss(model(x, offs), *pair_labels(seed, offs))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_classifier_init_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="affinity.init"):
        build_affinity_net("tiny", "classifier", 4, tmp_path / "missing.pt")


def test_training_writes_a_checkpoint_that_reloads(tmp_path):
    from pipeline.refine.affinity_training import train_affinity

    torch.manual_seed(0)
    torch.set_num_threads(1)
    params, prepared, ids = tiny_data_with_gt_seeds(tmp_path)
    aff = dict(params["affinity"], epochs=2, batch_size=2, crop_size=32)
    model, name = build_affinity_net("tiny", "none", aff["stride"])
    history = train_affinity(model, prepared, Store(tmp_path / "seeds.zarr"), ids, aff, torch.device("cpu"), 0, name,
                             tmp_path / "aff" / "affinity.pt")
    assert [h["epoch"] for h in history] == [1, 2] and all(np.isfinite(h["loss"]) for h in history)
    loaded = load_affinity_net(tmp_path / "aff" / "affinity.pt")
    x = torch.randn(1, 3, 20, 28)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(x, pair_offsets(3)), model(x, pair_offsets(3)), atol=1e-6)
    assert loaded.radius == aff["radius"] and loaded.stride == aff["stride"]


def test_interrupted_training_resumes_to_the_same_weights(tmp_path, monkeypatch):
    from pipeline.refine import affinity_training
    from pipeline.refine.affinity_training import SeedCrops, train_affinity

    torch.set_num_threads(1)
    params, prepared, ids = tiny_data_with_gt_seeds(tmp_path)
    seeds = Store(tmp_path / "seeds.zarr")
    aff = dict(params["affinity"], epochs=3, batch_size=2, crop_size=32)

    def run(out, resume=None):
        torch.manual_seed(0)
        model, name = build_affinity_net("tiny", "none", aff["stride"])
        history = train_affinity(model, prepared, seeds, ids, aff, torch.device("cpu"), 0, name, out, resume)
        return model, history

    straight, _ = run(tmp_path / "a.pt")

    class Killed(Exception):
        pass

    class CrashingCrops(SeedCrops):  # the run dies as epoch 3 starts, after epochs 1-2 were saved
        def __setattr__(self, key, value):
            if key == "epoch" and value == 2:
                raise Killed
            super().__setattr__(key, value)

    resume = tmp_path / "partial" / "resume.pt"
    monkeypatch.setattr(affinity_training, "SeedCrops", CrashingCrops)
    with pytest.raises(Killed):
        run(tmp_path / "b.pt", resume)
    assert resume.is_file() and not (tmp_path / "b.pt").exists()
    monkeypatch.setattr(affinity_training, "SeedCrops", SeedCrops)
    resumed, history = run(tmp_path / "b.pt", resume)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert not resume.exists() and not resume.parent.exists()  # cleared once the checkpoint is saved
    for name, v in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], v, msg=name)

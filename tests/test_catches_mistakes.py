"""Checks against expectations built independently of the code under test (issue 12).

Each test compares the project's code with hand-computed numbers or with a reference written
here the way the published code does it (PSA's dense random walk, IRNet's cam_to_ir_label, a
direct pydensecrf call), so that a one-line slip in the project's helpers cannot hide behind a
reference that reuses the same helper:

- the random walk's affinity exponent beta (T = D^-1 A^beta),
- IRNet seeds: foreground from ``crf.fg_threshold``, background from ``crf.bg_threshold``,
- the background channel (1 - max_c CAM_c)^alpha (max, not mean),
- the dense CRF's kernel parameters, and ``crf.scale`` rescaling the spatial kernel widths.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.labels import with_background
from pipeline.models.pairs import pair_offsets
from pipeline.refine.crf import CrfSettings, crf_marginals, label_crf
from pipeline.refine.random_walk import pseudo_mask, random_walk
from pipeline.refine.seeds import AffinityNetSeeds, IRNetSeeds, merge_seeds, seeds_for_image

torch.set_num_threads(1)


# ---------------------------------------------------------------- random walk (PSA) -----------------

def psa_dense_walk(scores: np.ndarray, aff: np.ndarray, offsets, beta: float, logt: int) -> np.ndarray:
    """PSA's random walk (infer_aff.py), written out densely in float64.

    The affinity matrix holds, for every grid cell and every half-plane offset whose partner lies on
    the grid, ``aff[p, y, x]`` at (i, j) and (j, i), and 1 on the diagonal; then ``A ** beta``, the
    column-normalised transition ``A / A.sum(0)``, ``logt`` squarings with torch.matmul and
    ``scores_vec @ trans``.
    """
    c, h, w = scores.shape
    n = h * w
    a = torch.zeros(n, n, dtype=torch.float64)
    for p, (dy, dx) in enumerate(offsets):
        for y in range(h):
            for x in range(w):
                y2, x2 = y + dy, x + dx
                if 0 <= y2 < h and 0 <= x2 < w:
                    i, j = y * w + x, y2 * w + x2
                    a[i, j] = a[j, i] = float(aff[p, y, x])
    a += torch.eye(n, dtype=torch.float64)
    a = torch.pow(a, beta)
    trans = a / a.sum(0, keepdim=True)
    for _ in range(logt):
        trans = torch.matmul(trans, trans)
    vec = torch.as_tensor(scores, dtype=torch.float64).reshape(c, n)
    return torch.matmul(vec, trans).reshape(c, h, w).numpy()


def test_walk_one_step_on_two_cells_by_hand():
    # one pair, affinity 0.5, beta 3: A = [[1, 1/8], [1/8, 1]], rows sum to 9/8
    aff = np.array([[[0.5, 0.0]]], np.float32)  # (P=1, h=1, w=2), offset (0, 1)
    scores = np.array([[[1.0, 0.0]]], np.float32)
    out = random_walk(scores, aff, [(0, 1)], beta=3.0, logt=0)
    np.testing.assert_allclose(out[0, 0], [8 / 9, 1 / 9], atol=1e-6)
    # two steps: T^2 = [[65, 16], [16, 65]] / 81
    out = random_walk(scores, aff, [(0, 1)], beta=3.0, logt=1)
    np.testing.assert_allclose(out[0, 0], [65 / 81, 16 / 81], atol=1e-6)


@pytest.mark.parametrize("beta,logt", [(3.0, 3), (8.0, 4)])
def test_walk_matches_psa_dense_reference(beta, logt):
    offsets = pair_offsets(5)
    h, w = 12, 15
    rng = np.random.default_rng(7)
    # partners outside the grid get non-zero values too: the walk must ignore them
    aff = rng.uniform(0.05, 1.0, (len(offsets), h, w)).astype(np.float32)
    cams = rng.random((2, h, w)).astype(np.float32)
    bg = (1.0 - cams.max(0)) ** 4.0  # background score written out: (1 - max CAM)^alpha
    scores = np.concatenate([bg[None], cams]).astype(np.float32)
    ours = random_walk(scores, aff, offsets, beta=beta, logt=logt)
    ref = psa_dense_walk(scores, aff, offsets, beta, logt)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-6)


def test_pseudo_mask_walk_matches_psa_reference_labels():
    """The whole path (background channel, walk, argmax, class ids) at stride 1, against PSA."""
    offsets = pair_offsets(4)
    h, w = 12, 15
    rng = np.random.default_rng(3)
    aff = rng.uniform(0.05, 1.0, (len(offsets), h, w)).astype(np.float32)
    cams = rng.uniform(0.0, 0.2, (2, h, w)).astype(np.float32)
    cams[0, :, :5] += 0.7  # one class on the left, the other on the right, background between
    cams[1, :, 10:] += 0.7
    rw = {"enabled": True, "beta": 3.0, "logt": 3, "alpha": 1.5, "ignore_below": 0.0, "final_crf": False}
    got = pseudo_mask(np.zeros((h, w, 3), np.uint8), cams, 1, [5, 9], rw, {}, aff=aff, offsets=offsets, aff_stride=1)
    scores = np.concatenate([((1.0 - cams.max(0)) ** 1.5)[None], cams])
    walked = psa_dense_walk(scores, aff, offsets, 3.0, 3)
    expect = np.array([0, 5, 9], np.uint8)[walked.argmax(0)]
    assert len(np.unique(expect)) == 3  # the case exercises all three labels
    top2 = np.sort(walked, 0)[-2:]
    assert (top2[1] - top2[0]).min() > 1e-4  # and no pixel is a near-tie
    np.testing.assert_array_equal(got, expect)


# ---------------------------------------------------------------- background channel ---------------

def test_background_channel_is_one_minus_max_to_the_alpha():
    cams = np.array([[[0.2, 0.0, 1.0]], [[0.6, 0.3, 0.5]]], np.float32)  # (K=2, 1, 3)
    out = with_background(cams, 2.0)
    assert out.shape == (3, 1, 3) and out.dtype == np.float32
    # (1 - 0.6)^2 = 0.16, (1 - 0.3)^2 = 0.49, (1 - 1.0)^2 = 0
    np.testing.assert_allclose(out[0, 0], [0.16, 0.49, 0.0], atol=1e-6)
    np.testing.assert_array_equal(out[1:], cams)
    np.testing.assert_allclose(with_background(cams, 16.0)[0, 0], [0.4 ** 16, 0.7 ** 16, 0.0], rtol=1e-5)


def test_background_channel_without_classes_is_all_ones():
    out = with_background(np.zeros((0, 2, 3), np.float32), 5.0)
    assert out.shape == (1, 2, 3)
    np.testing.assert_array_equal(out[0], 1.0)


def test_disabled_walk_labels_follow_max_background_by_hand():
    # one pixel, classes 0.1 and 0.55, alpha 1: background 1 - max = 0.45 < 0.55 -> the second class
    # (1 - mean = 0.675 would win and make it background)
    cam = np.array([[[0.1]], [[0.55]]], np.float32)
    rw = {"enabled": False, "beta": 8.0, "logt": 0, "alpha": 1.0, "ignore_below": 0.0, "final_crf": False}
    got = pseudo_mask(np.zeros((1, 1, 3), np.uint8), cam, 1, [4, 6], rw, {})
    assert got.tolist() == [[6]]


# ---------------------------------------------------------------- seeds -----------------------------

# a CRF whose pairwise terms weigh nothing: the label CRF then returns its input labelling
NO_PAIRWISE = {"iterations": 5, "gaussian_sxy": 3.0, "gaussian_compat": 0.0, "bilateral_sxy": 50.0,
               "bilateral_srgb": 5.0, "bilateral_compat": 0.0, "gt_prob": 0.7, "merge": "published", "scale": 1.0}


def test_merge_rules_by_hand():
    fg = np.array([[1, 0, 0, 2, 2]])
    bg = np.array([[1, 1, 0, 0, 2]])
    # IRNet cam_to_ir_label: conf = fg; conf[fg == 0] = 255; conf[fg + bg == 0] = 0
    assert merge_seeds(fg, bg, "published", background_wins=False).tolist() == [[1, 255, 0, 2, 2]]
    # PSA: class where the low-alpha CRF says one, background wherever the high-alpha CRF says background
    assert merge_seeds(fg, bg, "published", background_wins=True).tolist() == [[1, 255, 0, 0, 2]]
    assert merge_seeds(fg, bg, "agree", background_wins=False).tolist() == [[1, 255, 0, 255, 2]]


IRNET_CAMS = np.array([[[0.9, 0.6, 0.2, 0.1, 0.04, 0.0, 0.02, 0.25]],
                       [[0.1, 0.7, 0.1, 0.2, 0.01, 0.0, 0.03, 0.5]]], np.float32)  # (2 classes, 1, 8)
# IRNet's rule at fg 0.30 / bg 0.05 (no value sits on a threshold), written out per pixel:
#   fg labelling (max >= 0.30 -> argmax class): 3 7 bg bg bg bg bg 7
#   bg labelling (max >= 0.05 -> argmax class): 3 7 3  7  bg bg bg 7
#   merged: class where fg has one; background where both say background; else 255
IRNET_EXPECT = [[3, 7, 255, 255, 0, 0, 0, 7]]


def test_irnet_seeds_follow_cam_to_ir_label_by_hand():
    crf = dict(NO_PAIRWISE, mode="irnet", fg_threshold=0.3, bg_threshold=0.05)
    image = np.full((1, 8, 3), 128, np.uint8)
    seed = IRNetSeeds(crf)(image, IRNET_CAMS, [3, 7])
    assert seed.dtype == np.uint8 and seed.tolist() == IRNET_EXPECT


def test_irnet_seeds_through_seeds_for_image():
    crf = dict(NO_PAIRWISE, enabled=True, mode="irnet", fg_threshold=0.3, bg_threshold=0.05)
    image = np.full((1, 8, 3), 128, np.uint8)
    assert seeds_for_image(image, IRNET_CAMS, 1, [3, 7], crf).tolist() == IRNET_EXPECT


def test_label_crf_without_pairwise_terms_keeps_the_labels():
    labels = np.array([[0, 1, 2, 1, 0, 2]])
    image = np.random.default_rng(0).integers(0, 255, (1, 6, 3), dtype=np.uint8)
    out = label_crf(image, labels, 3, 0.7, CrfSettings.from_params(NO_PAIRWISE))
    np.testing.assert_array_equal(out, labels)


def test_affinitynet_seeds_by_hand():
    # one class; background (1 - m)^4 for the foreground-confident CRF, (1 - m)^32 for the background one
    #   m = 0.9 : 1e-4 < 0.9 and ~0 < 0.9                 -> class in both -> class
    #   m = 0.5 : 0.0625 < 0.5 and 2e-10 < 0.5            -> class
    #   m = 0.1 : 0.656 > 0.1 (bg) ; 0.9^32 = 0.034 < 0.1 -> fg-CRF bg, bg-CRF class -> 255
    #   m = 0.01: 0.96 > 0.01 ; 0.99^32 = 0.725 > 0.01    -> background in both -> 0
    cam = np.array([[[0.9, 0.5, 0.1, 0.01]]], np.float32)
    crf = dict(NO_PAIRWISE, mode="affinitynet", alpha_fg=4.0, alpha_bg=32.0)
    seed = AffinityNetSeeds(crf)(np.full((1, 4, 3), 90, np.uint8), cam, [2])
    assert seed.tolist() == [[2, 2, 255, 0]]


# ---------------------------------------------------------------- dense CRF -------------------------

CRF_SETTINGS = CrfSettings(iterations=5, gaussian_sxy=3.0, gaussian_compat=3.0, bilateral_sxy=10.0,
                           bilateral_srgb=13.0, bilateral_compat=10.0)


def textured_case(h: int, w: int, block: int = 1, seed: int = 0):
    """Noise + a vertical and a diagonal colour edge; 3-label scores from smooth ramps + noise.
    ``block`` > 1 makes both constant on block x block squares."""
    rng = np.random.default_rng(seed)
    bh, bw = h // block, w // block
    yy, xx = np.mgrid[0:bh, 0:bw]
    img = rng.normal(0, 25, (bh, bw, 3))
    img += np.where(xx[..., None] < bw // 2, [180, 60, 60], [50, 60, 190])
    img += np.where((yy + xx)[..., None] > bh, [0, 90, 0], [0, 0, 0])
    img = np.clip(img, 0, 255).astype(np.uint8)
    logits = np.stack([xx / bw * 3, 1.5 - xx / bw * 3, (yy + xx) / (bh + bw) * 2]) + rng.normal(0, 0.8, (3, bh, bw))
    probs = np.exp(logits) / np.exp(logits).sum(0, keepdims=True)
    probs = probs.astype(np.float32)
    if block > 1:
        img = img.repeat(block, 0).repeat(block, 1)
        probs = probs.repeat(block, 1).repeat(block, 2)
    return np.ascontiguousarray(img), np.ascontiguousarray(probs)


def direct_pydensecrf(image, probs, iterations, gaussian_sxy, gaussian_compat, bilateral_sxy, bilateral_srgb,
                      bilateral_compat):
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    n, h, w = probs.shape
    d = dcrf.DenseCRF2D(w, h, n)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    d.addPairwiseGaussian(sxy=gaussian_sxy, compat=gaussian_compat)
    d.addPairwiseBilateral(sxy=bilateral_sxy, srgb=bilateral_srgb, rgbim=np.ascontiguousarray(image),
                           compat=bilateral_compat)
    return np.asarray(d.inference(iterations), np.float32).reshape(n, h, w)


def test_crf_marginals_match_direct_pydensecrf():
    image, probs = textured_case(36, 48)
    got = crf_marginals(image, probs, CRF_SETTINGS)
    ref = direct_pydensecrf(image, probs, 5, 3.0, 3.0, 10.0, 13.0, 10.0)
    assert np.abs(ref - probs).max() > 0.2  # the pairwise terms do change the marginals here
    np.testing.assert_allclose(got, ref, atol=1e-5)


def upsample2_linear(q: np.ndarray) -> np.ndarray:
    """(L, h, w) -> (L, 2h, 2w), bilinear with half-pixel centres and edge clamping: output pixel
    2i reads 0.75 q[i] + 0.25 q[i - 1], pixel 2i + 1 reads 0.75 q[i] + 0.25 q[i + 1]."""
    def along(a, axis):
        prev = np.concatenate([np.take(a, [0], axis), np.take(a, range(a.shape[axis] - 1), axis)], axis)
        nxt = np.concatenate([np.take(a, range(1, a.shape[axis]), axis), np.take(a, [-1], axis)], axis)
        even, odd = 0.75 * a + 0.25 * prev, 0.75 * a + 0.25 * nxt
        out = np.stack([even, odd], axis + 1)
        shape = list(a.shape)
        shape[axis] *= 2
        return out.reshape(shape)

    return along(along(q.astype(np.float64), 1), 2)


def test_crf_at_half_scale_is_the_half_size_crf_with_halved_widths():
    """crf.scale 0.5 (crf.py docstring): the CRF runs on the half-size image with the spatial kernel
    widths (both sxy) halved, colour width unchanged, and the marginals are resized back (bilinear).
    Image and scores are constant on 2x2 squares, so the half-size inputs are exactly the squares."""
    image, probs = textured_case(36, 48, block=2, seed=1)
    half_image, half_probs = image[::2, ::2], probs[:, ::2, ::2]
    ref_half = direct_pydensecrf(half_image, half_probs, 5, 1.5, 3.0, 5.0, 13.0, 10.0)
    got = crf_marginals(image, probs, CrfSettings(**{**vars(CRF_SETTINGS), "scale": 0.5}))
    assert got.shape == probs.shape
    np.testing.assert_allclose(got, upsample2_linear(ref_half), atol=1e-5)
    # widths not halved would be a different CRF on this image
    unscaled = direct_pydensecrf(half_image, half_probs, 5, 3.0, 3.0, 10.0, 13.0, 10.0)
    assert np.abs(unscaled - ref_half).max() > 1e-2


def test_label_crf_matches_direct_pydensecrf():
    """IRNet's label CRF: one-hot labels trusted with gt_prob, the rest spread evenly, -log as unary."""
    image, probs = textured_case(30, 40, seed=2)
    labels = probs.argmax(0)
    got = label_crf(image, labels, 3, 0.7, CRF_SETTINGS)
    onehot = np.where(np.arange(3)[:, None, None] == labels[None], 0.7, 0.15).astype(np.float32)
    ref = direct_pydensecrf(image, onehot, 5, 3.0, 3.0, 10.0, 13.0, 10.0).argmax(0)
    assert (ref != labels).any()  # the CRF changes some labels here
    np.testing.assert_array_equal(got, ref)

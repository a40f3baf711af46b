import json

import numpy as np
import pytest

from pipeline.metrics import ConfusionMatrix, update_metrics_file


def test_miou_matches_hand_computed_values():
    gt = np.array([[0, 0, 1, 1], [0, 2, 2, 255]])
    pred = np.array([[0, 1, 1, 1], [0, 2, 0, 1]])
    cm = ConfusionMatrix(3)
    cm.update(pred, gt)
    # class 0: tp 2, fp 1 (gt 2 -> 0), fn 1 (gt 0 -> 1): IoU 2/4
    # class 1: tp 2, fp 1, fn 0: IoU 2/3 ; class 2: tp 1, fp 0, fn 1: IoU 1/2
    np.testing.assert_allclose(cm.per_class_iou(), [0.5, 2 / 3, 0.5])
    assert cm.miou() == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)
    np.testing.assert_allclose(cm.precision(), [2 / 3, 2 / 3, 1.0])
    np.testing.assert_allclose(cm.recall(), [2 / 3, 1.0, 0.5])


def test_accumulating_images_equals_one_big_image():
    rng = np.random.default_rng(0)
    a_gt, a_pr = rng.integers(0, 4, (2, 5, 5))
    b_gt, b_pr = rng.integers(0, 4, (2, 3, 7))
    split = ConfusionMatrix(4)
    split.update(a_pr, a_gt)
    split.update(b_pr, b_gt)
    whole = ConfusionMatrix(4)
    whole.update(np.r_[a_pr.ravel(), b_pr.ravel()], np.r_[a_gt.ravel(), b_gt.ravel()])
    np.testing.assert_array_equal(split.matrix, whole.matrix)


def test_unlabelled_predictions_count_as_coverage_not_errors():
    gt = np.array([1, 1, 0, 0])
    pred = np.array([1, 255, 0, 255])
    cm = ConfusionMatrix(2)
    cm.update(pred, gt)
    s = cm.summary(["background", "thing"])
    assert s["coverage"] == 50.0
    assert s["miou"] == 100.0


def test_classes_absent_everywhere_are_left_out_of_the_mean():
    cm = ConfusionMatrix(3)
    cm.update(np.array([0, 1]), np.array([0, 1]))
    assert cm.miou() == 1.0
    assert cm.summary(["a", "b", "c"])["per_class_iou"]["c"] is None


def test_out_of_range_label_raises():
    with pytest.raises(ValueError, match="out of range"):
        ConfusionMatrix(2).update(np.array([5]), np.array([1]))


def test_update_metrics_file_keeps_other_keys(tmp_path):
    p = tmp_path / "m.json"
    update_metrics_file(p, "cam", {"miou": 1})
    update_metrics_file(p, "rw", {"miou": 2})
    assert json.loads(p.read_text()) == {"cam": {"miou": 1}, "rw": {"miou": 2}}

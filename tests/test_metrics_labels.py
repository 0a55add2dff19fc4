import numpy as np
import pytest

from handsoff.metrics.labels import confusion_matrix, depth_errors, merge_classes, miou, pck


def test_miou_is_dataset_level_with_background_and_absent_classes_left_out():
    # Image 1: 2x2, image 2: 1x2; classes 0 (bg), 1, 2; class 3 appears nowhere.
    t1, p1 = np.array([[0, 1], [1, 1]]), np.array([[0, 1], [0, 1]])
    t2, p2 = np.array([[2, 0]]), np.array([[2, 2]])
    conf = confusion_matrix(p1, t1, 4) + confusion_matrix(p2, t2, 4)
    out = miou(conf, ["bg", "a", "b", "c"])
    # bg: inter 1, union |gt bg|=2 + |pred bg|=2 - 1 = 3 -> 1/3; a: inter 2, union 3 + 2 - 2 = 3 -> 2/3;
    # b: inter 1, union 1 + 2 - 1 = 2 -> 1/2; c: absent -> None.
    assert out["iou"]["bg"] == pytest.approx(1 / 3) and out["iou"]["a"] == pytest.approx(2 / 3)
    assert out["iou"]["b"] == pytest.approx(0.5) and out["iou"]["c"] is None
    assert out["miou"] == pytest.approx((1 / 3 + 2 / 3 + 0.5) / 3)
    # Dataset-level, as HandsOff scores: not the mean of per-image mIoUs (0.5 vs (7/12 + 1/4) / 2 here).
    per_image = [miou(confusion_matrix(p, t, 4), ["bg", "a", "b", "c"])["miou"] for p, t in ((p1, t1), (p2, t2))]
    assert per_image == pytest.approx([7 / 12, 1 / 4]) and out["miou"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="sizes differ"):
        confusion_matrix(p1, t2, 4)


def test_class_merge():
    lut = np.array([0, 1, 1, 2])
    np.testing.assert_array_equal(merge_classes(np.array([[3, 2], [1, 0]]), lut), [[2, 1], [1, 0]])


def test_pck_by_hand():
    target = np.array([[[10, 10, 2], [20, 20, 2], [30, 30, 1], [5, 5, 2]]], float)
    pred = np.array([[[10, 16, 1], [20, 22, 1], [0, 0, 1], [5, 5, 0]]], float)
    out = pck(pred, target, image_size=(50, 100))  # longer side 100: thresholds 10, 5, 2 px
    # distances of visible points: 6, 2, 0 (the occluded target is ignored)
    assert out["count"] == 3
    assert out["pck@0.1"] == pytest.approx(1) and out["pck@0.05"] == pytest.approx(2 / 3)
    assert out["pck@0.02"] == pytest.approx(2 / 3)
    strict = pck(pred, target, image_size=(50, 100), strict=True)  # the point predicted invisible is a miss
    assert strict["pck@0.1"] == pytest.approx(2 / 3) and strict["pck@0.02"] == pytest.approx(1 / 3)


def test_pck_per_keypoint_by_hand():
    # Two images, three keypoints; longer side 100 -> thresholds 10, 5, 2 px.
    target = np.array([[[10, 10, 2], [20, 20, 2], [30, 30, 1]],
                       [[10, 10, 2], [20, 20, 0], [30, 30, 1]]], float)
    pred = np.array([[[10, 13, 1], [20, 29, 1], [0, 0, 1]],
                     [[10, 11, 1], [0, 0, 1], [30, 30, 1]]], float)
    out = pck(pred, target, image_size=100, names=["nose", "chin", "ear"])["per_keypoint"]
    assert out["nose"] == {"pck@0.1": 1.0, "pck@0.05": 1.0, "pck@0.02": 0.5, "count": 2}  # distances 3 and 1
    assert out["chin"] == {"pck@0.1": 1.0, "pck@0.05": 0.0, "pck@0.02": 0.0, "count": 1}  # one visible, 9 px
    assert out["ear"] == {"pck@0.1": None, "pck@0.05": None, "pck@0.02": None, "count": 0}  # never visible


def test_depth_errors_by_hand():
    t = np.array([[1.0, 2.0], [4.0, np.nan]])
    p = np.array([[1.0, 3.0], [4.0, 7.0]])
    out = depth_errors([p], [t])
    assert out["mse"] == pytest.approx(1 / 3) and out["rmse"] == pytest.approx((1 / 3) ** 0.5)
    assert out["rmse_log"] == pytest.approx((np.log(1.5) ** 2 / 3) ** 0.5)
    var = ((np.array([1, 2, 4]) - 7 / 3) ** 2).sum()
    assert out["nmse"] == pytest.approx(1 / var)

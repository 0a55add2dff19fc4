"""Label metrics: dataset-level mIoU, PCK, depth errors. Inputs are NumPy arrays or tensors.

* mIoU (HandsOff's protocol): intersections and unions are summed over the whole dataset, then IoU is averaged
  over classes *including background*; a class that appears in neither predictions nor ground truth of the
  whole dataset has no IoU and is left out of the mean (reported as None).
* PCK@t: share of visible ground-truth keypoints (COCO v == 2) whose predicted location lies within t * (longer
  image side) pixels. The predicted location counts whatever visibility the model predicts for it (the usual
  definition); ``strict=True`` counts points predicted invisible as misses instead.
* Depth on valid pixels (finite, > 0 ground truth): MSE, RMSE, RMSE of log depth, and nMSE = per image
  sum((pred - gt)^2) / sum((gt - mean gt)^2), averaged over images (scale-aware, 1.0 for predicting the mean).
"""

from __future__ import annotations

import math

import numpy as np
import torch

# A class is present in an image when it covers at least this share of its pixels (0.2%: 9 pixels at 64 px, 525
# at 512 px); the one definition used by GAN evaluation, generation statistics and class quotas, and the report.
PRESENCE_FRACTION = 0.002


def presence_pixels(image_pixels: int) -> int:
    """The fewest pixels of a class that count as present in an image of ``image_pixels`` pixels."""
    return max(1, math.ceil(PRESENCE_FRACTION * image_pixels))


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def confusion_matrix(pred, target, n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) counts, rows = ground truth, columns = prediction; any shape of id arrays."""
    p, t = _np(pred).reshape(-1).astype(np.int64), _np(target).reshape(-1).astype(np.int64)
    if p.shape != t.shape:
        raise ValueError(f"prediction and target sizes differ: {p.shape} vs {t.shape}")
    bad = (t < 0) | (t >= n_classes) | (p < 0) | (p >= n_classes)
    if bad.any():
        raise ValueError(f"class ids outside 0..{n_classes - 1}")
    return np.bincount(t * n_classes + p, minlength=n_classes**2).reshape(n_classes, n_classes)


def miou(confusion: np.ndarray, class_names: list[str] | None = None) -> dict:
    """{'miou': float, 'iou': {class: IoU or None}} from a dataset-level confusion matrix."""
    inter = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - inter
    names = class_names or [str(i) for i in range(len(inter))]
    iou = {n: (float(i / u) if u > 0 else None) for n, i, u in zip(names, inter, union)}
    present = [v for v in iou.values() if v is not None]
    return {"miou": float(np.mean(present)) if present else float("nan"), "iou": iou}


def merge_classes(mask, lut) -> np.ndarray:
    """Map class ids through a lookup table (e.g. ``ClassMapping.lut``): 19 CelebAMask classes -> 8."""
    return np.asarray(lut)[_np(mask)]


def pck(pred, target, image_size: int | tuple[int, int], thresholds=(0.1, 0.05, 0.02), strict: bool = False,
        names: list[str] | None = None) -> dict:
    """PCK over all images: pred (N, K, 2 or 3) pixels (a third column <= 0 marks 'not visible', used only with
    ``strict``), target (N, K, 3) with COCO visibility; image_size: side or (H, W).
    Returns {'pck@t': share, ..., 'count': n}; with ``names`` (K keypoint names) also 'per_keypoint':
    {name: {'pck@t': share or None, 'count': n}} (None where the keypoint is never visible)."""
    p, t = _np(pred).astype(np.float64), _np(target).astype(np.float64)
    longer = max(image_size) if isinstance(image_size, tuple) else image_size
    visible = t[..., 2] == 2
    dist = np.linalg.norm(p[..., :2] - t[..., :2], axis=-1)
    if strict and p.shape[-1] > 2:
        dist = np.where(p[..., 2] > 0, dist, np.inf)
    n = int(visible.sum())
    out = {f"pck@{th:g}": (float((dist[visible] <= th * longer).mean()) if n else float("nan"))
           for th in thresholds}
    out["count"] = n
    if names is not None:
        out["per_keypoint"] = {
            name: {**{f"pck@{th:g}": (float((dist[:, k][visible[:, k]] <= th * longer).mean())
                                      if visible[:, k].any() else None) for th in thresholds},
                   "count": int(visible[:, k].sum())}
            for k, name in enumerate(names)}
    return out


def depth_errors(pred_list, target_list) -> dict:
    """Depth errors over images (lists of (H, W) arrays), on pixels where the target is finite and > 0."""
    se, se_log, count, nmse = 0.0, 0.0, 0, []
    for pred, target in zip(pred_list, target_list):
        p, t = _np(pred).astype(np.float64), _np(target).astype(np.float64)
        valid = np.isfinite(t) & (t > 0)
        if not valid.any():
            continue
        d = p[valid] - t[valid]
        se += float((d**2).sum())
        se_log += float(((np.log(np.clip(p[valid], 1e-12, None)) - np.log(t[valid])) ** 2).sum())
        count += int(valid.sum())
        var = float(((t[valid] - t[valid].mean()) ** 2).sum())
        nmse.append(float((d**2).sum()) / var if var > 0 else float("nan"))
    if count == 0:
        return {"mse": float("nan"), "rmse": float("nan"), "rmse_log": float("nan"), "nmse": float("nan")}
    return {"mse": se / count, "rmse": (se / count) ** 0.5, "rmse_log": (se_log / count) ** 0.5,
            "nmse": float(np.nanmean(nmse)) if nmse else float("nan")}


HEADLINE = ("miou", "pck@0.1", "pck@0.05", "pck@0.02", "depth_mse", "depth_rmse", "depth_rmse_log")
# Headline metrics where lower is better (the rest: higher is better).
LOWER_IS_BETTER = frozenset({"depth_mse", "depth_rmse", "depth_rmse_log"})


def metric_table(rows: dict[str, dict], columns: tuple[str, ...] = HEADLINE) -> str:
    """A plain-text table: one row per method, one column per headline metric present in any row.

    A cell is a float, or a dict {"mean", "std"} (printed as mean +- std); missing cells print as '-'.
    """
    cols = [c for c in columns if any(c in r for r in rows.values())]

    def cell(v) -> str:
        if isinstance(v, dict):
            return f"{v['mean']:.3f} ± {v['std']:.3f}"
        return "-" if v is None else f"{v:.4f}"

    width = max([len(name) for name in rows] + [8]) + 2
    cells = {name: [cell(r.get(c)) for c in cols] for name, r in rows.items()}
    col_w = [max([len(c)] + [len(cells[n][i]) for n in rows]) + 2 for i, c in enumerate(cols)]
    lines = [" " * width + "".join(c.rjust(w) for c, w in zip(cols, col_w))]
    lines += [name.ljust(width) + "".join(v.rjust(w) for v, w in zip(cells[name], col_w)) for name in rows]
    return "\n".join(lines)


def results_table(methods: dict[str, dict]) -> str:
    """The headline table, then (where the methods have "iou") a table of IoU per class: what the CLI prints
    and the benchmark writes. Cells as in ``metric_table`` (floats or {"mean", "std"})."""
    text = metric_table(methods)
    per_class = {name: m["iou"] for name, m in methods.items() if "iou" in m}
    if per_class:
        text += f"\n\nIoU per class\n{metric_table(per_class, columns=tuple(next(iter(per_class.values()))))}"
    return text

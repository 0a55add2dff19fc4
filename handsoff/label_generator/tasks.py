"""Tasks of the label generator: what a task predicts per pixel, its loss, its decoding and its uncertainty.

Each task owns ``out_channels`` of the ensemble's output. The trainer calls ``targets`` and ``loss`` on sampled
pixels; prediction calls ``decode`` on dense outputs. One interface serves segmentation, keypoints and depth:

    targets(sample, pixel_indices, size) -> per-pixel targets for the flat label-pixel indices (P,)
    loss(outputs (P, M, out_channels), targets) -> scalar (mean over members and pixels)
    decode(outputs (M, out_channels, H, W)) -> {"label": ..., "uncertainty": (H, W), "score": float, ...}

M is the number of ensemble members.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from handsoff.errors import DataError, UsageError

KEYPOINT_SIGMA = 1.5  # Gaussian heatmap sigma, in label pixels (label generator and downstream network)

TOP_FRACTION = 0.1  # image uncertainty score = mean of its most uncertain 10% of pixels (HandsOff)


def top_fraction_mean(values: torch.Tensor, fraction: float = TOP_FRACTION) -> float:
    flat = values.reshape(-1)
    k = max(1, int(math.ceil(fraction * flat.numel())))
    return float(flat.topk(k).values.mean())


def gaussian_heat(keypoints: torch.Tensor, x: torch.Tensor, y: torch.Tensor, sigma: float) -> torch.Tensor:
    """exp(-d^2 / 2 sigma^2) of labeled (v > 0) keypoints at pixel coordinates (x, y), broadcasting x and y against
    ``keypoints[..., 0]``; unlabeled keypoints give zero heat."""
    d2 = (x - keypoints[..., 0]) ** 2 + (y - keypoints[..., 1]) ** 2
    return torch.exp(-d2 / (2 * sigma**2)) * (keypoints[..., 2] > 0).float()


def entropy(p: torch.Tensor, dim: int) -> torch.Tensor:
    return -(p * p.clamp(min=1e-12).log()).sum(dim)


class Segmentation:
    """K-class segmentation: cross-entropy per member; label = mode of the members' votes; uncertainty =
    Jensen-Shannon divergence of the members' distributions, H(mean p) - mean H(p_m), per pixel.

    min_class_pixels: in each training mask, classes covering fewer pixels become background (HandsOff uses 30
    at 512 px; None scales that to the label resolution, at least 1 pixel).
    """

    name = "seg"

    def __init__(self, classes: list[str], min_class_pixels: int | None = None):
        self.classes = list(classes)
        self.out_channels = len(classes)
        self.min_class_pixels = min_class_pixels

    def config(self) -> dict:
        return {"name": self.name, "classes": self.classes, "min_class_pixels": self.min_class_pixels}

    def clean_mask(self, mask: np.ndarray) -> np.ndarray:
        size = mask.shape[0]
        threshold = self.min_class_pixels if self.min_class_pixels is not None else \
            max(1, round(30 * (size / 512) ** 2))
        counts = np.bincount(mask.reshape(-1), minlength=self.out_channels)
        small = (counts > 0) & (counts < threshold)
        small[0] = False
        return np.where(small[mask], 0, mask) if small.any() else mask

    def prepare(self, sample: dict, size: int) -> torch.Tensor:
        mask = sample["mask"]
        if mask.shape != (size, size):
            raise DataError(f"{sample['name']}: mask is {mask.shape[1]}x{mask.shape[0]}, labels must be "
                            f"{size}x{size}")
        return torch.from_numpy(self.clean_mask(mask).astype(np.int64)).reshape(-1)

    def targets(self, prepared: torch.Tensor, indices: torch.Tensor, size: int) -> torch.Tensor:
        return prepared[indices]

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        p, m, k = outputs.shape
        return F.cross_entropy(outputs.reshape(p * m, k), targets.repeat_interleave(m))

    def constant_loss(self, targets: torch.Tensor) -> float:
        freq = torch.bincount(targets, minlength=self.out_channels).double() / len(targets)
        return float(entropy(freq, 0))

    def decode(self, outputs: torch.Tensor) -> dict:
        probs = outputs.float().softmax(1)                       # (M, K, H, W)
        votes = F.one_hot(probs.argmax(1), self.out_channels).sum(0).float()  # (H, W, K)
        mean = probs.mean(0)                                     # (K, H, W)
        label = (votes + 1e-3 * mean.permute(1, 2, 0)).argmax(-1)  # ties go to the higher mean probability
        js = (entropy(mean, 0) - entropy(probs, 1).mean(0)).clamp(min=0)
        return {"label": label, "probabilities": mean, "uncertainty": js, "score": top_fraction_mean(js)}


class Keypoints:
    """Keypoints as Gaussian heatmaps (one channel each, peak 1, ``sigma`` pixels); MSE regression.

    Decoding: argmax of the members' mean heatmap refined to sub-pixel precision by a parabola through the peak
    and its neighbours (per axis); visible when the peak exceeds ``visibility_threshold`` (set by
    ``fit_visibility`` after training: regressed heatmaps peak well below the targets' 1); uncertainty per
    keypoint = RMS distance (pixels) of the members' own argmaxes from the decoded point. Targets use every
    labeled keypoint (COCO v > 0); a keypoint with v == 0 has an all-zero heatmap.
    """

    name = "kp"

    def __init__(self, names: list[str], sigma: float = KEYPOINT_SIGMA, visibility_threshold: float = 0.3):
        self.names = list(names)
        self.out_channels = len(names)
        self.sigma, self.visibility_threshold = sigma, visibility_threshold

    def config(self) -> dict:
        return {"name": self.name, "names": self.names, "sigma": self.sigma,
                "visibility_threshold": self.visibility_threshold}

    def prepare(self, sample: dict, size: int) -> torch.Tensor:
        kp = torch.from_numpy(np.asarray(sample["keypoints"], np.float32))
        if kp.shape != (self.out_channels, 3):
            raise DataError(f"{sample['name']}: {kp.shape[0]} keypoints, expected {self.out_channels}")
        scale = size / sample["image"].shape[0]
        return torch.cat([kp[:, :2] * scale, kp[:, 2:]], 1)   # in label pixels

    def heatmap_at(self, keypoints: torch.Tensor, indices: torch.Tensor, size: int) -> torch.Tensor:
        """Target heat (P, K) at flat label-pixel indices for keypoints (K, 3) in label pixels (centres at +0.5)."""
        y = (indices // size).float()[:, None] + 0.5
        x = (indices % size).float()[:, None] + 0.5
        return gaussian_heat(keypoints, x, y, self.sigma)

    def targets(self, prepared: torch.Tensor, indices: torch.Tensor, size: int) -> torch.Tensor:
        return self.heatmap_at(prepared, indices, size)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (outputs - targets[:, None]).square().mean()

    def constant_loss(self, targets: torch.Tensor) -> float:
        return float((targets - targets.mean(0)).square().mean())

    @staticmethod
    def peak(heatmaps: torch.Tensor) -> torch.Tensor:
        """Sub-pixel peaks of heatmaps (..., H, W): (..., 3) as (x, y, peak value), pixel centres at +0.5."""
        *lead, h, w = heatmaps.shape
        flat = heatmaps.reshape(-1, h, w).float()
        idx = flat.reshape(len(flat), -1).argmax(1)
        py, px = idx // w, idx % w
        rows = torch.arange(len(flat))

        def offset(minus, centre, plus):  # vertex of the parabola through three samples, within half a pixel
            denom = minus - 2 * centre + plus
            off = torch.where(denom < 0, 0.5 * (minus - plus) / denom.clamp(max=-1e-12), torch.zeros_like(denom))
            return off.clamp(-0.5, 0.5)

        centre = flat[rows, py, px]
        dx = offset(flat[rows, py, (px - 1).clamp(min=0)], centre, flat[rows, py, (px + 1).clamp(max=w - 1)])
        dy = offset(flat[rows, (py - 1).clamp(min=0), px], centre, flat[rows, (py + 1).clamp(max=h - 1), px])
        dx = torch.where((px == 0) | (px == w - 1), torch.zeros_like(dx), dx)
        dy = torch.where((py == 0) | (py == h - 1), torch.zeros_like(dy), dy)
        out = torch.stack([px.float() + 0.5 + dx, py.float() + 0.5 + dy, centre], -1)
        return out.reshape(*lead, 3)

    def fit_visibility(self, peaks: torch.Tensor, labeled: torch.Tensor) -> float:
        """Set ``visibility_threshold`` from predicted peak values (N, K) on training images and whether each
        keypoint is labeled there (N, K) bool: the threshold with the best balanced accuracy when both kinds
        occur, else half the 10th percentile of the labeled keypoints' peaks (so nearly all of them count as
        visible, with margin). Returns the threshold."""
        peaks, labeled = peaks.float().reshape(-1), labeled.reshape(-1).bool()
        if labeled.all() or not labeled.any():
            ref = peaks[labeled] if labeled.any() else peaks
            self.visibility_threshold = 0.5 * float(torch.quantile(ref, 0.1))
            return self.visibility_threshold
        candidates = torch.unique(peaks)
        candidates = (candidates[1:] + candidates[:-1]) / 2 if len(candidates) > 1 else candidates
        above = peaks[None] > candidates[:, None]                                  # (T, N*K)
        balanced = 0.5 * ((above & labeled).sum(1) / labeled.sum() + (~above & ~labeled).sum(1) / (~labeled).sum())
        self.visibility_threshold = float(candidates[balanced.argmax()])
        return self.visibility_threshold

    def decode(self, outputs: torch.Tensor) -> dict:
        heat = outputs.float()                                  # (M, K, H, W)
        mean = heat.mean(0)
        peaks = self.peak(mean)                                 # (K, 3)
        members = self.peak(heat)                               # (M, K, 3)
        spread = (members[..., :2] - peaks[None, :, :2]).square().sum(-1).mean(0).sqrt()  # (K,)
        visible = peaks[:, 2] > self.visibility_threshold
        keypoints = torch.cat([peaks[:, :2], torch.where(visible, 2.0, 0.0)[:, None]], 1)
        pixel_var = heat.var(0, unbiased=False).sum(0)         # (H, W)
        score = float(spread[visible].mean()) if visible.any() else float(spread.mean())
        return {"label": keypoints, "heatmaps": mean, "spread": spread, "uncertainty": pixel_var, "score": score}


class Depth:
    """Per-pixel depth regression in a normalized log space: t = (log(d) - mean) / std, with mean and std of
    log depth over the training labels; the inverse is d = exp(t * std + mean). MSE on valid (finite, > 0)
    pixels; label = inverse of the members' mean; uncertainty = the members' variance (in t units)."""

    name = "depth"
    out_channels = 1

    def __init__(self, log_mean: float = 0.0, log_std: float = 1.0):
        self.log_mean, self.log_std = float(log_mean), float(log_std)

    def config(self) -> dict:
        return {"name": self.name, "log_mean": self.log_mean, "log_std": self.log_std}

    def fit_normalization(self, depths: list[np.ndarray]) -> None:
        logs = np.concatenate([np.log(d[np.isfinite(d) & (d > 0)]) for d in depths])
        if logs.size == 0:
            raise DataError("no valid (finite, positive) depth values in the training labels")
        self.log_mean, self.log_std = float(logs.mean()), float(max(logs.std(), 1e-6))

    def forward_transform(self, depth: torch.Tensor) -> torch.Tensor:
        return (depth.clamp(min=1e-12).log() - self.log_mean) / self.log_std

    def inverse(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(t * self.log_std + self.log_mean)

    def prepare(self, sample: dict, size: int) -> torch.Tensor:
        depth = torch.from_numpy(np.asarray(sample["depth"], np.float32))
        if depth.shape != (size, size):
            raise DataError(f"{sample['name']}: depth is {depth.shape[1]}x{depth.shape[0]}, labels must be "
                            f"{size}x{size}")
        valid = torch.isfinite(depth) & (depth > 0)
        t = torch.where(valid, self.forward_transform(torch.where(valid, depth, torch.ones_like(depth))),
                        torch.full_like(depth, float("nan")))
        return t.reshape(-1)

    def targets(self, prepared: torch.Tensor, indices: torch.Tensor, size: int) -> torch.Tensor:
        return prepared[indices]

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        valid = torch.isfinite(targets)
        if not valid.any():
            return outputs.sum() * 0
        return (outputs[valid, :, 0] - targets[valid, None]).square().mean()

    def constant_loss(self, targets: torch.Tensor) -> float:
        t = targets[torch.isfinite(targets)]
        return float((t - t.mean()).square().mean())

    def decode(self, outputs: torch.Tensor) -> dict:
        t = outputs.float()[:, 0]                               # (M, H, W)
        var = t.var(0, unbiased=False)
        return {"label": self.inverse(t.mean(0)), "uncertainty": var, "score": top_fraction_mean(var)}


TASKS = {"seg": Segmentation, "kp": Keypoints, "depth": Depth}
ALIASES = {"segmentation": "seg", "keypoints": "kp", "seg": "seg", "kp": "kp", "depth": "depth"}


def task_from_config(config: dict):
    kwargs = {k: v for k, v in config.items() if k != "name"}
    return TASKS[config["name"]](**kwargs)


def parse_task_names(text: str) -> list[str]:
    """'seg,kp,depth' (or full names) -> canonical names, in that order, no duplicates."""
    names = []
    for part in (p.strip().lower() for p in text.split(",") if p.strip()):
        if part not in ALIASES:
            raise UsageError(f"unknown task {part!r}; choose from seg, kp, depth")
        if ALIASES[part] not in names:
            names.append(ALIASES[part])
    if not names:
        raise UsageError("no task given; choose from seg, kp, depth")
    return names

"""Keypoints: K named points per image (dataset layout: COCO ``keypoints.json``, pixel coordinates, v in 0/1/2)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from handsoff.errors import DataError
from handsoff.metrics.labels import pck
from handsoff.tasks.base import TaskBase

KEYPOINT_SIGMA = 1.5  # Gaussian heatmap sigma, in label pixels (label generator and downstream network)
KEYPOINT_LOSS_WEIGHT = 100.0  # downstream: heatmap MSE is tiny next to cross-entropy; this brings it to scale
DOWNSTREAM_VISIBILITY = 0.3  # downstream: a keypoint is predicted visible where its heatmap peaks above this


def gaussian_heat(keypoints: torch.Tensor, x: torch.Tensor, y: torch.Tensor, sigma: float) -> torch.Tensor:
    """exp(-d^2 / 2 sigma^2) of labeled (v > 0) keypoints at pixel coordinates (x, y), broadcasting x and y against
    ``keypoints[..., 0]``; unlabeled keypoints give zero heat."""
    d2 = (x - keypoints[..., 0]) ** 2 + (y - keypoints[..., 1]) ** 2
    return torch.exp(-d2 / (2 * sigma**2)) * (keypoints[..., 2] > 0).float()


def heatmaps(keypoints: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """Gaussian heatmaps (B, K, size, size) for keypoints (B, K, 3) in pixels; labeled (v > 0) only."""
    centres = torch.arange(size, dtype=torch.float32, device=keypoints.device) + 0.5
    return gaussian_heat(keypoints[:, :, None, None, :], centres, centres[:, None], sigma)


def peak(heat: torch.Tensor) -> torch.Tensor:
    """Sub-pixel peaks of heatmaps (..., H, W): (..., 3) as (x, y, peak value), pixel centres at +0.5."""
    *lead, h, w = heat.shape
    flat = heat.reshape(-1, h, w).float()
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


class Keypoints(TaskBase):
    """Keypoints as Gaussian heatmaps (one channel each, peak 1, ``sigma`` pixels); MSE regression.

    Label generator decoding: argmax of the members' mean heatmap refined to sub-pixel precision by a parabola
    through the peak and its neighbours (per axis); visible when the peak exceeds ``visibility_threshold`` (set by
    ``calibrate`` after training: regressed heatmaps peak well below the targets' 1); uncertainty per keypoint =
    RMS distance (pixels) of the members' own argmaxes from the decoded point. Targets use every labeled keypoint
    (COCO v > 0); a keypoint with v == 0 has an all-zero heatmap.
    Downstream: heatmap MSE times ``KEYPOINT_LOSS_WEIGHT``; metrics: PCK@0.1/0.05/0.02 overall and per keypoint.
    """

    name = "kp"
    aliases = ("keypoints",)
    sample_key = "keypoints"
    card_field = "keypoint_names"
    card_label = "keypoints"
    fitted = ("visibility_threshold",)  # config keys a fit computes (not inputs to it)
    peak = staticmethod(peak)

    def __init__(self, names: list[str], sigma: float = KEYPOINT_SIGMA, visibility_threshold: float = 0.3):
        self.names = list(names)
        self.out_channels = len(names)
        self.sigma, self.visibility_threshold = sigma, visibility_threshold

    @classmethod
    def from_card(cls, card, keypoint_sigma: float = KEYPOINT_SIGMA, **_) -> Keypoints:
        cls.require(card)
        return cls(card.keypoint_names, sigma=keypoint_sigma)

    @property
    def label_names(self) -> list[str]:
        return self.names

    @classmethod
    def names_in(cls, card) -> list[str] | None:
        return getattr(card, cls.card_field)

    def config(self) -> dict:
        return {"name": self.name, "names": self.names, "sigma": self.sigma,
                "visibility_threshold": self.visibility_threshold}

    # --- label generator ---------------------------------------------------------------------------------------

    def prepare(self, sample: dict, size: int) -> torch.Tensor:
        kp = torch.from_numpy(np.asarray(sample["keypoints"], np.float32))
        if kp.shape != (self.out_channels, 3):
            raise DataError(f"{sample['name']}: {kp.shape[0]} keypoints, expected {self.out_channels}")
        scale = size / sample["image"].shape[0]
        return torch.cat([kp[:, :2] * scale, kp[:, 2:]], 1)   # in label pixels

    def resize_label(self, value: np.ndarray, shape: tuple[int, int], size: int) -> np.ndarray:
        """Keypoints (K, 3) of an (H, W) image in the pixels of its size x size version (visibility kept)."""
        h, w = shape
        out = np.asarray(value, np.float32).copy()
        out[:, 0] *= size / w
        out[:, 1] *= size / h
        return out

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

    @torch.no_grad()
    def calibrate(self, model, ws: torch.Tensor, prepared: list[torch.Tensor], limit: int = 16) -> dict:
        """Fit the visibility threshold on (at most ``limit``) training images' predictions."""
        n = min(len(ws), limit)
        result = model.predict(ws[:n])
        peaks = torch.stack([peak(r["heatmaps"])[:, 2] for r in result[self.name]])
        labeled = torch.stack([prepared[i][:, 2] > 0 for i in range(n)])
        return {"keypoint_visibility_threshold": self.fit_visibility(peaks.cpu(), labeled.cpu())}

    def decode(self, outputs: torch.Tensor) -> dict:
        heat = outputs.float()                                  # (M, K, H, W)
        mean = heat.mean(0)
        peaks = peak(mean)                                      # (K, 3)
        members = peak(heat)                                    # (M, K, 3)
        spread = (members[..., :2] - peaks[None, :, :2]).square().sum(-1).mean(0).sqrt()  # (K,)
        visible = peaks[:, 2] > self.visibility_threshold
        keypoints = torch.cat([peaks[:, :2], torch.where(visible, 2.0, 0.0)[:, None]], 1)
        pixel_var = heat.var(0, unbiased=False).sum(0)         # (H, W)
        score = float(spread[visible].mean()) if visible.any() else float(spread.mean())
        return {"label": keypoints, "heatmaps": mean, "spread": spread, "uncertainty": pixel_var, "score": score}

    def label(self, decoded: dict) -> np.ndarray:
        return decoded["label"].cpu().numpy().astype(np.float32)

    def card_fields(self) -> dict:
        return {"keypoint_names": self.names}

    # --- downstream ----------------------------------------------------------------------------------------------

    def downstream_loss(self, output: torch.Tensor, batch: dict) -> torch.Tensor:
        return KEYPOINT_LOSS_WEIGHT * F.mse_loss(output, heatmaps(batch["keypoints"], output.shape[-1], self.sigma))

    def metric_update(self, state, output: torch.Tensor, batch: dict):
        peaks = peak(output)
        predicted = torch.cat([peaks[..., :2], torch.where(peaks[..., 2:] > DOWNSTREAM_VISIBILITY, 2.0, 0.0)], -1)
        state = state or ([], [])
        state[0].append(predicted)
        state[1].append(batch["keypoints"])
        return state

    def metric_result(self, state, image_size: int) -> dict:
        result = {"keypoints": pck(torch.cat(state[0]), torch.cat(state[1]), image_size, names=self.names)}
        result.update({k: v for k, v in result["keypoints"].items() if k.startswith("pck")})
        return result

"""Keypoints: K named points per image (dataset layout: COCO ``keypoints.json``, pixel coordinates, v in 0/1/2)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from handsoff.data.layout import DatasetError
from handsoff.errors import DataError
from handsoff.fileio import atomic_write_json
from handsoff.metrics.labels import pck
from handsoff.tasks.base import TaskBase, name_permutation

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
    card_name = "keypoints"
    card_attributes = ("keypoint_names", "skeleton", "keypoint_flip_pairs")
    fitted = ("visibility_threshold",)  # config keys a fit computes (not inputs to it)
    dataset_file = "keypoints.json"
    shard_suffix = "kp.json"
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

    @classmethod
    def from_legacy_config(cls, config: dict) -> Keypoints:
        return cls(config["keypoint_names"], sigma=config.get("sigma", KEYPOINT_SIGMA))

    def config(self) -> dict:
        return {"name": self.name, "names": self.names, "sigma": self.sigma,
                "visibility_threshold": self.visibility_threshold}

    # --- dataset layout: every sample's keypoints in one COCO file ---------------------------------------------

    @classmethod
    def write_dataset_file(cls, root: Path, card, labels: list[tuple[str, tuple[int, int], np.ndarray]]) -> None:
        """``keypoints.json`` of (name, (H, W), keypoints (K, 3)) in sample order: COCO images, annotations (ids
        from 1, the annotation id is the image id) and the one category with the card's names and skeleton."""
        index = {n: i + 1 for i, n in enumerate(card.keypoint_names)}
        images, annotations = [], []
        for image_id, (name, (h, w), value) in enumerate(labels, start=1):
            kp = np.asarray(value, np.float64)
            images.append({"id": image_id, "file_name": f"{name}.png", "width": w, "height": h})
            annotations.append({"id": image_id, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                                "keypoints": [round(float(v), 3) for v in kp.reshape(-1)],
                                "num_keypoints": int((kp[:, 2] > 0).sum())})
        atomic_write_json(root / cls.dataset_file, {
            "images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "object", "keypoints": card.keypoint_names,
                            "skeleton": [[index[a], index[b]] for a, b in card.skeleton]}]})

    @classmethod
    def read_dataset_file(cls, root: Path, card) -> dict[str, np.ndarray]:
        """{image name: keypoints (K, 3) float32} from ``keypoints.json``, every annotation checked."""
        path = root / cls.dataset_file
        if not path.is_file():
            raise DatasetError(f"{path}: missing, but dataset.json declares keypoints")
        k = len(card.keypoint_names)
        try:
            coco = json.loads(path.read_text())
            by_id = {im["id"]: Path(im["file_name"]).stem for im in coco["images"]}
            annotations = [(ann["id"], ann["image_id"], np.asarray(ann["keypoints"], np.float32))
                           for ann in coco["annotations"]]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
            raise DatasetError(f"{path}: not a COCO keypoints file ({type(e).__name__}: {e})") from None
        out = {}
        for ann_id, image_id, kp in annotations:
            if kp.size != 3 * k:
                raise DatasetError(f"{path}: annotation {ann_id} has {kp.size // 3} keypoints, expected {k}")
            if not np.isfinite(kp).all():
                raise DatasetError(f"{path}: annotation {ann_id} holds NaN or infinite keypoint values; every "
                                   "x, y, v must be a finite number (an unlabeled keypoint is 0, 0, 0)")
            if not np.isin(kp[2::3], (0, 1, 2)).all():
                raise DatasetError(f"{path}: annotation {ann_id} has visibility flags other than 0, 1, 2")
            if image_id not in by_id:
                raise DatasetError(f"{path}: annotation {ann_id} refers to image id {image_id}, which is not listed")
            out[by_id[image_id]] = kp.reshape(k, 3)
        return out

    @classmethod
    def read_label(cls, root: Path, card, name: str, shape: tuple[int, int], image_name: str, index: dict
                   ) -> np.ndarray:
        """(K, 3) [x, y, v] in pixels of sample ``name``, from ``index`` (``read_dataset_file``)."""
        if name not in index:
            raise DatasetError(f"{root / cls.dataset_file}: no keypoints for image {name}")
        return index[name].copy()

    @classmethod
    def to_bytes(cls, value: np.ndarray) -> bytes:
        return json.dumps({"keypoints": [[round(float(v), 3) for v in row] for row in np.asarray(value)]}).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> np.ndarray:
        return np.asarray(json.loads(data)["keypoints"], np.float32)

    @classmethod
    def card_json(cls, card) -> dict:
        return {"keypoints": None if card.keypoint_names is None else {
            "names": card.keypoint_names, "skeleton": [list(p) for p in card.skeleton],
            "flip_pairs": [list(p) for p in card.keypoint_flip_pairs]}}

    @classmethod
    def card_from_json(cls, data: dict, path) -> dict:
        kp = data.get("keypoints")
        return {"keypoint_names": None if kp is None else list(kp["names"]),
                "skeleton": [tuple(p) for p in (kp or {}).get("skeleton", [])],
                "keypoint_flip_pairs": [tuple(p) for p in (kp or {}).get("flip_pairs", [])]}

    @classmethod
    def flip_permutation(cls, card) -> np.ndarray:
        return name_permutation(card.keypoint_names, card.keypoint_flip_pairs)

    @classmethod
    def transform(cls, value, rows, cols, box, out_size, flip, permutation) -> torch.Tensor:
        """(K, 3) float32 in output pixels by the crop's affine map; left/right names swapped on flips; visibility 0
        once outside the output."""
        (x0, y0, bw, bh), (out_h, out_w) = box, out_size
        kp = np.asarray(value, np.float32).copy()
        kp[:, 0] = (kp[:, 0] - x0) * out_w / bw
        kp[:, 1] = (kp[:, 1] - y0) * out_h / bh
        if flip:
            kp[:, 0] = out_w - kp[:, 0]
            if permutation is not None:
                kp = kp[permutation]
        outside = (kp[:, 0] < 0) | (kp[:, 0] >= out_w) | (kp[:, 1] < 0) | (kp[:, 1] >= out_h)
        kp[outside, 2] = 0
        return torch.from_numpy(kp)

    @classmethod
    def mark(cls, draw, value: np.ndarray, origin: tuple[int, int], scale: int) -> None:
        """Labeled keypoints as dots on the overlay: filled green where visible (v = 2), red rings where occluded."""
        for x, y, v in value:
            if v <= 0:
                continue
            cx, cy, r = origin[0] + x * scale, origin[1] + y * scale, max(scale, 2)
            fill = (0, 255, 0) if v == 2 else None
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=(255, 0, 0) if v == 1 else fill)

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

    def label(self, decoded: dict, void_top: float = 0.0) -> np.ndarray:
        """(K, 3) keypoints; ``void_top`` is for dense labels (keypoints carry their own visibility)."""
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

    @classmethod
    def breakdown(cls, metrics: dict) -> dict:
        per_keypoint = metrics.get("keypoints", {}).get("per_keypoint")
        return {} if per_keypoint is None else {"pck_per_keypoint": per_keypoint}

"""Depth: one value per pixel (dataset layout: ``depth/NAME.npy`` float or ``depth/NAME.png`` 16-bit)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from handsoff.data.layout import DatasetError, read_label_png
from handsoff.distributed import total
from handsoff.errors import DataError
from handsoff.fileio import atomic_save
from handsoff.metrics.labels import depth_errors
from handsoff.tasks.base import TaskBase, most_uncertain, pixel_label_transform, top_fraction_mean

NORMALIZATION_SAMPLES = 200  # depth maps per dataset that fix the downstream network's normalization


class Depth(TaskBase):
    """Per-pixel depth regression in a normalized log space: t = (log(d) - mean) / std, with mean and std of
    log depth over the training labels (``fit``); the inverse is d = exp(t * std + mean). MSE on valid (finite,
    > 0) pixels. Label generator: label = inverse of the members' mean; uncertainty = the members' variance (in t
    units). Downstream metrics: MSE, RMSE, RMSE-log and nMSE on valid pixels."""

    name = "depth"
    sample_key = "depth"
    card_field = "depth_format"
    card_label = "depth maps"
    card_name = "depth"
    card_attributes = ("depth_format", "depth_scale", "depth_unit")
    fitted = ("log_mean", "log_std")  # config keys a fit computes (not inputs to it)
    folder = "depth"
    shard_suffix = "depth.npy"
    out_channels = 1

    def __init__(self, log_mean: float = 0.0, log_std: float = 1.0):
        self.log_mean, self.log_std = float(log_mean), float(log_std)

    @classmethod
    def from_card(cls, card, **_) -> Depth:
        cls.require(card)
        return cls()

    @classmethod
    def from_legacy_config(cls, config: dict) -> Depth:
        return cls(**{k: v for k, v in config["depth"].items() if k != "name"})

    def config(self) -> dict:
        return {"name": self.name, "log_mean": self.log_mean, "log_std": self.log_std}

    def fit(self, samples) -> None:
        """Normalization from the depth maps of ``samples`` (an iterable of sample dicts)."""
        self.fit_normalization([np.asarray(s["depth"]) for s in samples])

    def fit_normalization(self, depths: list[np.ndarray]) -> None:
        logs = np.concatenate([np.log(d[np.isfinite(d) & (d > 0)]) for d in depths])
        if logs.size == 0:
            raise DataError("no valid (finite, positive) depth values in the training labels")
        self.log_mean, self.log_std = float(logs.mean()), float(max(logs.std(), 1e-6))

    def forward_transform(self, depth: torch.Tensor) -> torch.Tensor:
        return (depth.clamp(min=1e-12).log() - self.log_mean) / self.log_std

    def inverse(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(t * self.log_std + self.log_mean)

    # --- dataset layout ----------------------------------------------------------------------------------------

    @classmethod
    def card_json(cls, card) -> dict:
        return {"depth": None if card.depth_format is None else {
            "format": card.depth_format, "scale": card.depth_scale, "unit": card.depth_unit}}

    @classmethod
    def card_from_json(cls, data: dict, path) -> dict:
        depth = data.get("depth")
        return {"depth_format": None if depth is None else depth["format"],
                "depth_scale": 1.0 if depth is None else float(depth.get("scale", 1.0)),
                "depth_unit": "m" if depth is None else depth.get("unit", "m")}

    @classmethod
    def label_path(cls, root: Path, card, name: str) -> Path:
        return root / cls.folder / f"{name}.{'npy' if card.depth_format == 'npy' else 'png'}"

    @classmethod
    def write_label(cls, root: Path, card, name: str, value: np.ndarray) -> None:
        """As .npy float32, or as a 16-bit PNG of depth * card.depth_scale (rounded, clipped to 0..65535)."""
        path = cls.label_path(root, card, name)
        if card.depth_format == "png16":
            png = np.clip(np.round(np.asarray(value) * card.depth_scale), 0, 65535).astype(np.uint16)
            atomic_save(path, lambda p: Image.fromarray(png).save(p, "PNG"))
        else:
            atomic_save(path, lambda p: np.save(p, np.asarray(value, np.float32)))

    @classmethod
    def read_label(cls, root: Path, card, name: str, shape: tuple[int, int], image_name: str, index=None
                   ) -> np.ndarray:
        """(H, W) float32 depth, checked against the image's ``shape``."""
        path = cls.existing_label_path(root, card, name, image_name)
        if card.depth_format == "npy":
            try:
                depth = np.load(path, allow_pickle=False)
            except (ValueError, OSError) as e:
                raise DatasetError(f"{path}: cannot read depth ({e})") from None
            if depth.dtype.kind not in "fiu":
                raise DatasetError(f"{path}: depth must be numbers, got {depth.dtype}")
        else:
            depth = read_label_png(path, "depth").astype(np.float32) / card.depth_scale
        if depth.shape != tuple(shape):
            raise DatasetError(f"{path}: depth is {depth.shape[1]}x{depth.shape[0]}, image is {shape[1]}x{shape[0]}")
        return depth.astype(np.float32)

    @classmethod
    def to_bytes(cls, value: np.ndarray) -> bytes:
        buf = io.BytesIO()
        np.save(buf, np.asarray(value, np.float32))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> np.ndarray:
        return np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32)

    @classmethod
    def transform(cls, value, rows, cols, box, out_size, flip, permutation) -> torch.Tensor:
        """(1, H, W) float32: measured values stay as they are (nearest neighbour)."""
        return torch.from_numpy(pixel_label_transform(value, rows, cols))[None].float()

    @classmethod
    def paint(cls, panels: list[np.ndarray], value: np.ndarray, colors) -> None:
        """A panel of its own: depth in a colour map."""
        from handsoff.visualize import depth_to_rgb

        panels.append(depth_to_rgb(value))

    # --- label generator ---------------------------------------------------------------------------------------

    def prepare(self, sample: dict, size: int) -> torch.Tensor:
        depth = torch.from_numpy(np.asarray(sample["depth"], np.float32))
        if depth.shape != (size, size):
            raise DataError(f"{sample['name']}: depth is {depth.shape[1]}x{depth.shape[0]}, labels must be "
                            f"{size}x{size}")
        valid = torch.isfinite(depth) & (depth > 0)
        t = torch.where(valid, self.forward_transform(torch.where(valid, depth, torch.ones_like(depth))),
                        torch.full_like(depth, float("nan")))
        return t.reshape(-1)

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

    def label(self, decoded: dict, void_top: float = 0.0) -> np.ndarray:
        """(H, W) depth; the ``void_top`` fraction of pixels the members disagree on most (variance) as NaN."""
        depth = decoded["label"].cpu().numpy().astype(np.float32)
        if void_top > 0:
            depth[most_uncertain(decoded["uncertainty"], void_top)] = np.nan
        return depth

    def card_fields(self) -> dict:
        return {"depth_format": "npy"}  # generated depth is stored exactly

    # --- downstream ----------------------------------------------------------------------------------------------

    def downstream_loss(self, output: torch.Tensor, batch: dict) -> torch.Tensor:
        d = batch["depth"]
        valid = torch.isfinite(d) & (d > 0)
        t = self.forward_transform(torch.where(valid, d, torch.ones_like(d)))
        # Mean over the valid pixels of the global batch (every worker's under torchrun).
        count = total(valid.sum().to(output.dtype))
        squared = total(torch.where(valid, output - t, torch.zeros_like(output)).square().sum())
        return squared / count if count > 0 else output.sum() * 0

    def metric_update(self, state, output: torch.Tensor, batch: dict):
        state = state or ([], [])
        state[0].extend(self.inverse(output[:, 0]))
        state[1].extend(batch["depth"][:, 0])
        return state

    def metric_result(self, state, image_size: int) -> dict:
        result = {"depth": depth_errors(*state)}
        result.update({f"depth_{k}": v for k, v in result["depth"].items()})
        return result

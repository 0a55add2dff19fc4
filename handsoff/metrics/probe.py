"""A measuring probe: a small CNN trained on *real* labeled images, used to judge generated ones.

No downloaded network (Inception for FID, an ImageNet segmenter) can be used here, so the project trains its own
instrument on real rendered data, where the truth is known exactly:

* a feature head: the global-average-pooled last encoder stage (``feature_dim`` values), trained to predict
  the scene's factors (pose, colours, hair style, accessories, class areas). Frechet distances are computed
  in this space: a "Frechet probe distance" (FPD). It is *not* FID and its values are not comparable with FID;
  the meaningful comparison is generated-vs-real against the real-vs-disjoint-real floor, on the same probe.
* a segmentation head (FPN-style decoder): an oracle segmenter, to measure class areas of generated images and
  whether a reconstruction shows the same parts as the real image.

Images are (B, 3, H, W) in [-1, 1]; inputs of another size are resized to the probe's ``resolution``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from handsoff.fileio import read_weights_folder, save_weights_folder


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Probe(nn.Module):
    """Encoder (4 stride-2 stages) + factor regressor on pooled features + FPN segmentation decoder.

    Keyword arguments (stored in ``config``): n_targets (factor vector length), n_classes, width (channels of the
    first stage; stages have width * (1, 2, 4, 8, 8)), resolution (input size the probe was trained at),
    target_mean / target_std (normalization of the factor targets, set by training).
    """

    def __init__(self, n_targets: int, n_classes: int, width: int = 24, resolution: int = 64,
                 target_mean: list[float] | None = None, target_std: list[float] | None = None):
        super().__init__()
        self.config = dict(n_targets=n_targets, n_classes=n_classes, width=width, resolution=resolution,
                           target_mean=target_mean, target_std=target_std)
        widths = [width, width * 2, width * 4, width * 8, width * 8]
        self.stem = nn.Sequential(_conv_bn(3, widths[0]), _conv_bn(widths[0], widths[0]))
        self.stages = nn.ModuleList(
            nn.Sequential(_conv_bn(widths[i], widths[i + 1], stride=2), _conv_bn(widths[i + 1], widths[i + 1]))
            for i in range(4))
        self.feature_dim = widths[-1]
        self.factor_head = nn.Linear(widths[-1], n_targets)
        decoder = width * 2
        self.lateral = nn.ModuleList(nn.Conv2d(c, decoder, 1) for c in widths)
        self.seg_head = nn.Sequential(_conv_bn(decoder, decoder), nn.Conv2d(decoder, n_classes, 1))

    def _encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        r = self.config["resolution"]
        if images.shape[-2:] != (r, r):
            images = F.interpolate(images, size=(r, r), mode="bilinear", align_corners=False, antialias=True)
        maps = [self.stem(images)]
        for stage in self.stages:
            maps.append(stage(maps[-1]))
        return maps

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Returns features (B, feature_dim), factors (B, n_targets) (normalized units), seg_logits
        (B, n_classes, r, r) at the probe's resolution."""
        maps = self._encode(images)
        features = maps[-1].mean(dim=(2, 3))
        top = self.lateral[-1](maps[-1])
        for lateral, skip in zip(reversed(self.lateral[:-1]), reversed(maps[:-1])):
            top = lateral(skip) + F.interpolate(top, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return {"features": features, "factors": self.factor_head(features), "seg_logits": self.seg_head(top)}

    @torch.no_grad()
    def analyze(self, images: torch.Tensor, batch: int = 256) -> tuple[np.ndarray, torch.Tensor]:
        """One pass over images (N, 3, H, W) in [-1, 1]: pooled features (N, feature_dim) float64, for Frechet
        distances, and class ids (N, H, W) int64 at the input's size (logits resized before the argmax)."""
        self.eval()
        feats, masks = [], []
        for i in range(0, len(images), batch):
            out = self(images[i:i + batch])
            feats.append(out["features"].double().cpu().numpy())
            logits = F.interpolate(out["seg_logits"], size=images.shape[-2:], mode="bilinear", align_corners=False)
            masks.append(logits.argmax(1).cpu())
        return np.concatenate(feats), torch.cat(masks)

    def features(self, images: torch.Tensor, batch: int = 256) -> np.ndarray:
        return self.analyze(images, batch)[0]

    def segment(self, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
        return self.analyze(images, batch)[1]


def train_probe(images: torch.Tensor, masks: torch.Tensor, targets: np.ndarray, n_classes: int, *,
                epochs: int = 6, batch: int = 64, lr: float = 2e-3, width: int = 24, seed: int = 0,
                progress: bool = True) -> Probe:
    """Fit a probe on real images (N, 3, r, r) in [-1, 1], their masks (N, r, r) and factor targets (N, T).

    Loss: cross-entropy on masks + MSE on standardized targets; AdamW with a cosine schedule. Deterministic for
    a seed on a given machine.
    """
    torch.manual_seed(seed)
    targets = np.asarray(targets, np.float64)
    mean, std = targets.mean(0), targets.std(0) + 1e-6
    probe = Probe(targets.shape[1], n_classes, width=width, resolution=images.shape[-1],
                  target_mean=mean.tolist(), target_std=std.tolist())
    y = torch.from_numpy((targets - mean) / std).float()
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * (len(images) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    order_rng = np.random.default_rng(seed)
    probe.train()
    with tqdm(total=steps, desc="training probe", unit="step", disable=not progress) as bar:
        for _ in range(epochs):
            order = torch.from_numpy(order_rng.permutation(len(images)))
            for i in range(0, len(images) - batch + 1, batch):
                idx = order[i:i + batch]
                out = probe(images[idx])
                loss_seg = F.cross_entropy(out["seg_logits"], masks[idx])
                loss_factor = F.mse_loss(out["factors"], y[idx])
                opt.zero_grad(set_to_none=True)
                (loss_seg + loss_factor).backward()
                opt.step()
                sched.step()
                bar.update(1)
                bar.set_postfix(seg=f"{loss_seg.item():.3f}", factors=f"{loss_factor.item():.3f}")
    return probe.eval()


def save_probe(probe: Probe, out_dir: str | os.PathLike, metadata: dict | None = None) -> Path:
    return save_weights_folder(out_dir, probe.state_dict(), {"probe": probe.config, "metadata": metadata or {}})


def load_probe(path: str | os.PathLike) -> Probe:
    """Load a probe saved by ``save_probe`` (a folder with config.json + model.safetensors)."""
    config, state = read_weights_folder(path, "a probe folder")
    probe = Probe(**config["probe"])
    probe.load_state_dict(state)
    return probe.eval()

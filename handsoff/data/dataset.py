"""A ``torch.utils.data.Dataset`` over the standard layout, with joint geometric augmentation.

Crop, resize and horizontal flip act on every label consistently: the image is resampled bilinearly
(antialiased), masks and depth by nearest neighbour (class ids stay ids, depth values stay measured values),
keypoints by the same affine map with left/right names swapped on flips and visibility 0 once outside.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F


def _flip_permutation(names: list[str], pairs) -> np.ndarray:
    perm = np.arange(len(names))
    index = {n: i for i, n in enumerate(names)}
    for a, b in pairs:
        perm[index[a]], perm[index[b]] = index[b], index[a]
    return perm


def joint_transform(sample: dict, out_size: tuple[int, int], box: tuple[float, float, float, float],
                    flip: bool, keypoint_perm: np.ndarray | None = None,
                    class_lut: np.ndarray | None = None) -> dict:
    """Crop ``box`` = (x0, y0, width, height) (rounded to whole pixels), resize to out_size = (H, W), flip.

    Returns tensors: image (3, H, W) float in [-1, 1]; mask (H, W) int64; depth (1, H, W) float32;
    keypoints (K, 3) float32 in output pixels with pixel centres at +0.5.
    """
    out_h, out_w = out_size
    x0, y0, bw, bh = (int(round(v)) for v in box)  # whole pixels, so image and labels see the same crop
    out = {"name": sample["name"]}
    img = torch.from_numpy(np.array(sample["image"])).permute(2, 0, 1).float()[None] / 127.5 - 1
    h, w = img.shape[-2:]
    if x0 < 0 or y0 < 0 or x0 + bw > w or y0 + bh > h:
        raise ValueError(f"crop box {box} outside the {w}x{h} image {sample['name']}")
    crop = img[..., y0:y0 + bh, x0:x0 + bw]
    image = F.interpolate(crop, size=out_size, mode="bilinear", align_corners=False, antialias=True)[0]
    # Nearest-neighbour source index of every output pixel centre.
    cols = np.clip(np.floor(x0 + (np.arange(out_w) + 0.5) * bw / out_w), 0, w - 1).astype(np.int64)
    rows = np.clip(np.floor(y0 + (np.arange(out_h) + 0.5) * bh / out_h), 0, h - 1).astype(np.int64)
    if flip:
        image = image.flip(-1)
        cols = cols[::-1]
    out["image"] = image.clamp(-1, 1)
    if "mask" in sample:
        mask = sample["mask"][rows[:, None], cols[None, :]]
        if flip and class_lut is not None:
            mask = class_lut[mask]
        out["mask"] = torch.from_numpy(np.ascontiguousarray(mask)).long()
    if "depth" in sample:
        depth = sample["depth"][rows[:, None], cols[None, :]]
        out["depth"] = torch.from_numpy(np.ascontiguousarray(depth))[None].float()
    if "keypoints" in sample:
        kp = sample["keypoints"].astype(np.float32).copy()
        kp[:, 0] = (kp[:, 0] - x0) * out_w / bw
        kp[:, 1] = (kp[:, 1] - y0) * out_h / bh
        if flip:
            kp[:, 0] = out_w - kp[:, 0]
            if keypoint_perm is not None:
                kp = kp[keypoint_perm]
        outside = (kp[:, 0] < 0) | (kp[:, 0] >= out_w) | (kp[:, 1] < 0) | (kp[:, 1] >= out_h)
        kp[outside, 2] = 0
        out["keypoints"] = torch.from_numpy(kp)
    return out


class LabeledImageDataset(torch.utils.data.Dataset):
    """Samples of a standard-layout dataset as tensors (see ``joint_transform`` for shapes and ranges).

    Args:
        root: dataset folder.
        size: output size (square), default the images' own size (then all images must share it).
        augment: random square crops covering ``crop_scale`` of the shorter side, and flips with ``flip_p``.
        seed: augmentation seed; sample i of epoch e is always transformed the same way.
    """

    def __init__(self, root: str | os.PathLike, size: int | None = None, augment: bool = False,
                 crop_scale: tuple[float, float] = (0.8, 1.0), flip_p: float = 0.5, seed: int = 0):
        from handsoff.data.webdataset import open_labeled

        self.folder = open_labeled(root)  # a standard-layout folder, or WebDataset shards
        self.card = self.folder.card
        self.size, self.augment, self.crop_scale, self.flip_p, self.seed = size, augment, crop_scale, flip_p, seed
        self.epoch = 0
        names = self.card.keypoint_names
        self.keypoint_perm = _flip_permutation(names, self.card.keypoint_flip_pairs) if names else None
        classes = self.card.classes
        self.class_lut = _flip_permutation(classes, self.card.class_flip_pairs) if classes else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> dict:
        sample = self.folder.load(self.folder.names[index])
        h, w = sample["image"].shape[:2]
        out_size = (self.size, self.size) if self.size else (h, w)
        box, flip = (0.0, 0.0, float(w), float(h)), False
        if self.augment:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            side = max(1, int(min(h, w) * rng.uniform(*self.crop_scale)))
            box = (int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1)), side, side)
            flip = bool(rng.uniform() < self.flip_p)
        return joint_transform(sample, out_size, box, flip, self.keypoint_perm, self.class_lut)

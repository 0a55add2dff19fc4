"""Semantic segmentation: K classes per pixel (dataset layout: ``masks/NAME.png`` of class ids)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from handsoff.data.layout import DatasetError, png_bytes, read_label_png
from handsoff.distributed import total
from handsoff.errors import DataError
from handsoff.fileio import atomic_save
from handsoff.metrics.labels import confusion_matrix, miou
from handsoff.tasks.base import (
    TaskBase,
    entropy,
    most_uncertain,
    name_permutation,
    pixel_label_transform,
    top_fraction_mean,
)

# A mask pixel with this id has no label (PASCAL VOC's "void"): losses and metrics skip it, flips keep it. Real
# datasets use it for unannotated pixels; generation writes it where the ensemble disagrees most (``void_top``).
VOID = 255


def soft_dice_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - mean soft Dice over the classes present in the batch's masks or predictions.

    logits (B, K, H, W), mask (B, H, W) int64 (``VOID`` pixels left out). Every class weighs the same, so a part of
    a few pixels (an eye at 64 px) pulls as hard as the background; with cross-entropy alone such parts are learned
    only after the large classes, far later in training (mIoU also weighs classes equally)."""
    valid = (mask != VOID)[:, None]
    probs = logits.softmax(1) * valid
    onehot = F.one_hot(mask.where(valid[:, 0], 0), logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype) * valid
    # Sums over the global batch: under torchrun, every worker's samples (``distributed.total``).
    inter = total((probs * onehot).sum((0, 2, 3)))
    union = total(probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3)))
    present = total(onehot.sum((0, 2, 3))) > 0
    dice = (2 * inter + 1.0) / (union + 1.0)
    return 1 - dice[present].mean() if present.any() else logits.sum() * 0  # a global batch of void pixels only


class Segmentation(TaskBase):
    """K-class segmentation.

    Label generator: cross-entropy per member; label = mode of the members' votes; uncertainty = Jensen-Shannon
    divergence of the members' distributions, H(mean p) - mean H(p_m), per pixel. ``min_class_pixels``: in each
    training mask, classes covering fewer pixels become background (HandsOff uses 30 at 512 px; None scales that
    to the label resolution, at least 1 pixel).
    Downstream: cross-entropy plus soft Dice; metrics: dataset-level mIoU and IoU per class. Pixels with id ``VOID``
    (255) carry no label anywhere (so a dataset has at most 255 classes).
    """

    name = "seg"
    aliases = ("segmentation",)
    sample_key = "mask"
    card_field = "classes"
    card_label = "masks"
    card_name = "segmentation"
    pixel_classes = True
    card_attributes = ("classes", "colors", "class_flip_pairs")
    fitted = ()  # config keys a fit computes (not inputs to it)
    folder = "masks"
    shard_suffix = "mask.png"

    def __init__(self, classes: list[str], min_class_pixels: int | None = None):
        self.classes = list(classes)
        self.out_channels = len(classes)
        self.min_class_pixels = min_class_pixels

    @classmethod
    def from_card(cls, card, min_class_pixels: int | None = None, **_) -> Segmentation:
        cls.require(card)
        return cls(card.classes, min_class_pixels)

    @property
    def label_names(self) -> list[str]:
        return self.classes

    @classmethod
    def names_in(cls, card) -> list[str] | None:
        return getattr(card, cls.card_field)

    @classmethod
    def from_legacy_config(cls, config: dict) -> Segmentation:
        return cls(config["classes"])

    def config(self) -> dict:
        return {"name": self.name, "classes": self.classes, "min_class_pixels": self.min_class_pixels}

    # --- dataset layout ----------------------------------------------------------------------------------------

    @classmethod
    def label_path(cls, root: Path, card, name: str) -> Path:
        return root / cls.folder / f"{name}.png"

    @classmethod
    def check_ids(cls, mask: np.ndarray, where: str) -> np.ndarray:
        """mask as class ids that fit a mask PNG (integers 0..255); DatasetError naming ``where`` otherwise, never a
        silent wrap-around."""
        mask = np.asarray(mask)
        if mask.dtype.kind not in "iub" or (mask.size and (mask.min() < 0 or mask.max() > 255)):
            bad = mask.dtype if mask.dtype.kind not in "iub" else f"ids {mask.min()}..{mask.max()}"
            raise DatasetError(f"{where} holds {bad}; class ids must be integers in 0..255 (merge classes with a "
                               "mapping)")
        return mask.astype(np.uint8)

    @classmethod
    def write_label(cls, root: Path, card, name: str, value: np.ndarray) -> None:
        mask = cls.check_ids(value, f"{root}: mask of {name!r}")
        atomic_save(cls.label_path(root, card, name), lambda p: Image.fromarray(mask).save(p, format="PNG"))

    @classmethod
    def read_label(cls, root: Path, card, name: str, shape: tuple[int, int], image_name: str, index=None
                   ) -> np.ndarray:
        """(H, W) int64 class ids, checked against the image's ``shape`` and the card's classes."""
        path = cls.existing_label_path(root, card, name, image_name)
        mask = read_label_png(path, "mask")
        if mask.ndim != 2 or mask.dtype.kind not in "iub":
            raise DatasetError(f"{path}: mask must be single-channel integer class ids, got {mask.dtype} of "
                               f"shape {mask.shape}")
        if mask.shape != tuple(shape):
            raise DatasetError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]}, image is {shape[1]}x{shape[0]}")
        if ((mask >= len(card.classes)) & (mask != VOID)).any():
            bad = sorted(set(np.unique(mask).tolist()) - set(range(len(card.classes))) - {VOID})
            raise DatasetError(f"{path}: unknown class ids {bad} (dataset has {len(card.classes)} classes)")
        return mask.astype(np.int64)

    @classmethod
    def to_bytes(cls, value: np.ndarray) -> bytes:
        return png_bytes(cls.check_ids(value, "a shard's mask"))

    @classmethod
    def from_bytes(cls, data: bytes) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(data))).astype(np.int64)

    @classmethod
    def card_json(cls, card) -> dict:
        from handsoff.data.layout import default_color

        return {"classes": None if card.classes is None else [
                    {"id": i, "name": n, "color": list(card.colors[i]) if card.colors else default_color(i)}
                    for i, n in enumerate(card.classes)],
                "class_flip_pairs": [list(p) for p in card.class_flip_pairs]}

    @classmethod
    def card_from_json(cls, data: dict, path) -> dict:
        from handsoff.data.layout import DatasetError

        classes = data.get("classes")
        if classes is not None and [c["id"] for c in classes] != list(range(len(classes))):
            raise DatasetError(f"{path}: class ids must be 0..{len(classes) - 1} in order")
        if classes is not None and len(classes) > VOID:
            raise DatasetError(f"{path}: {len(classes)} classes; at most {VOID} (id {VOID} means void, no label)")
        return {"classes": None if classes is None else [c["name"] for c in classes],
                "colors": None if classes is None else [tuple(c["color"]) for c in classes],
                "class_flip_pairs": [tuple(p) for p in data.get("class_flip_pairs", [])]}

    @classmethod
    def flip_permutation(cls, card) -> np.ndarray:
        """(256,): left/right classes swapped, every other id (VOID too) kept."""
        perm = name_permutation(card.classes, card.class_flip_pairs)
        return np.concatenate([perm, np.arange(len(perm), VOID + 1)])

    @classmethod
    def transform(cls, value, rows, cols, box, out_size, flip, permutation) -> torch.Tensor:
        """(H, W) int64 class ids, left/right classes swapped on flips."""
        mask = pixel_label_transform(value, rows, cols)
        return torch.from_numpy(permutation[mask] if permutation is not None else mask).long()

    @classmethod
    def paint(cls, panels: list[np.ndarray], value: np.ndarray, colors) -> None:
        """The mask's class colours blended into the overlay panel."""
        palette = np.full((VOID + 1, 3), 128, np.uint8)  # void (and any unnamed id) in grey
        palette[:len(colors)] = np.array(colors, np.uint8)
        panels[1][:] = (0.45 * panels[0] + 0.55 * palette[value]).astype(np.uint8)

    # --- label generator ---------------------------------------------------------------------------------------

    def clean_mask(self, mask: np.ndarray) -> np.ndarray:
        size = mask.shape[0]
        threshold = self.min_class_pixels if self.min_class_pixels is not None else \
            max(1, round(30 * (size / 512) ** 2))
        counts = np.bincount(mask.reshape(-1), minlength=self.out_channels)
        small = (counts > 0) & (counts < threshold)
        small[0] = False
        small[self.out_channels:] = False  # void stays void
        return np.where(small[mask], 0, mask) if small.any() else mask

    def prepare(self, sample: dict, size: int) -> torch.Tensor:
        mask = sample["mask"]
        if mask.shape != (size, size):
            raise DataError(f"{sample['name']}: mask is {mask.shape[1]}x{mask.shape[0]}, labels must be "
                            f"{size}x{size}")
        return torch.from_numpy(self.clean_mask(mask).astype(np.int64)).reshape(-1)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        valid = targets != VOID
        if not valid.any():
            return outputs.sum() * 0
        outputs, targets = outputs[valid], targets[valid]
        p, m, k = outputs.shape
        return F.cross_entropy(outputs.reshape(p * m, k), targets.repeat_interleave(m))

    def constant_loss(self, targets: torch.Tensor) -> float:
        targets = targets[targets != VOID]
        freq = torch.bincount(targets, minlength=self.out_channels).double() / max(len(targets), 1)
        return float(entropy(freq, 0))

    def decode(self, outputs: torch.Tensor) -> dict:
        probs = outputs.float().softmax(1)                       # (M, K, H, W)
        votes = F.one_hot(probs.argmax(1), self.out_channels).sum(0).float()  # (H, W, K)
        mean = probs.mean(0)                                     # (K, H, W)
        label = (votes + 1e-3 * mean.permute(1, 2, 0)).argmax(-1)  # ties go to the higher mean probability
        js = (entropy(mean, 0) - entropy(probs, 1).mean(0)).clamp(min=0)
        return {"label": label, "probabilities": mean, "uncertainty": js, "score": top_fraction_mean(js)}

    def label(self, decoded: dict, void_top: float = 0.0) -> np.ndarray:
        """(H, W) class ids; the ``void_top`` fraction of pixels the members disagree on most (JS) as ``VOID``."""
        label = decoded["label"].cpu().numpy().astype(np.int64)
        if void_top > 0:
            label[most_uncertain(decoded["uncertainty"], void_top)] = VOID
        return label

    def card_fields(self) -> dict:
        return {"classes": self.classes}

    # --- downstream ----------------------------------------------------------------------------------------------

    def downstream_loss(self, output: torch.Tensor, batch: dict) -> torch.Tensor:
        # Every worker reaches soft Dice's all-reduce, also one whose batch is all void (no early return under
        # torchrun); the mean over labeled pixels is 0, not NaN, when there are none.
        mask = batch["mask"]
        labeled = (mask != VOID).sum().clamp(min=1)
        cross_entropy = F.cross_entropy(output, mask, ignore_index=VOID, reduction="sum") / labeled
        return cross_entropy + soft_dice_loss(output, mask)

    def metric_update(self, state, output: torch.Tensor, batch: dict):
        valid = batch["mask"] != VOID
        c = confusion_matrix(output.argmax(1)[valid], batch["mask"][valid], self.out_channels)
        return c if state is None else state + c

    def metric_result(self, state, image_size: int) -> dict:
        result = {"segmentation": miou(state, self.classes)}
        result["miou"] = result["segmentation"]["miou"]
        return result

    @staticmethod
    def class_pixels(mask: np.ndarray, classes: int) -> np.ndarray:
        """Pixels per class id 0..classes-1 of a mask: (classes,) int64 (class quotas and class statistics)."""
        return np.bincount(np.asarray(mask).reshape(-1), minlength=classes)[:classes]

    @classmethod
    def breakdown(cls, metrics: dict) -> dict:
        return {"iou": metrics["segmentation"]["iou"]} if "segmentation" in metrics else {}

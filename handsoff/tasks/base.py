"""The Task protocol: everything that differs between segmentation, keypoints and depth, in one place per task.

A task is one module (segmentation.py, keypoints.py, depth.py) holding one class and its registration in
``handsoff.tasks.TASKS``. The stages never switch on task names: they ask each task object.

Label generator (each task owns ``out_channels`` of the ensemble's output; M members, P sampled pixels):
    fit(samples)                          fitted values from the training labels (depth normalization); optional
    prepare(sample, size) -> Tensor       the sample's label as per-pixel targets at label size L
    targets(prepared, indices, size)      targets at flat label-pixel indices (P,)
    loss(outputs (P, M, C), targets)      scalar, mean over members and pixels
    constant_loss(targets) -> float       the loss of the best constant prediction (a yardstick)
    decode(outputs (M, C, H, W)) -> dict  {"label", "uncertainty" (H, W), "score" (image uncertainty), ...}
    calibrate(model, ws, prepared)        settings fitted on the trained model's predictions (keypoint
                                          visibility); returns a summary entry or None
    label(decoded) -> np.ndarray          the decoded label as the dataset layout stores it in a sample
    resize_label(value, shape, size)      a sample's label of an (H, W) image at size x size (labeled images of
                                          any shape are fitted at the square label size)
    card_fields() -> dict                 what the card of a dataset of its labels declares (DatasetCard fields)
Dataset card (class methods): the task owns ``card_attributes`` of ``DatasetCard`` and their entries in dataset.json:
    card_json(card) -> dict               its top-level entries of dataset.json (None where the card lacks them)
    card_from_json(data, path) -> dict    its DatasetCard fields from dataset.json's ``data`` (errors name ``path``)
Downstream network (a head with ``out_channels`` channels at the input resolution):
    downstream_loss(output (B, C, H, W), batch) -> scalar; a term that is not a mean of per-sample terms (Dice,
                                          a mean over valid pixels) sums its parts with ``distributed.total``,
                                          so that data-parallel workers compute what one worker does
    metric_update(state, output, batch) -> state;  metric_result(state, image_size) -> dict of metrics
    breakdown(metrics) -> dict            per-class / per-keypoint entries a run's results.json shows
Dataset layout (class methods: the card, not fitted values, decides the files), one of two kinds:
    per-sample files (``folder`` set): label_path(root, card, name), write_label(root, card, name, value),
                                          read_label(root, card, name, shape, image_name, index=None)
    one dataset-wide file (``dataset_file`` set): read_dataset_file(root, card) -> {name: value} (the ``index``
                                          read_label takes), write_dataset_file(root, card, [(name, (H, W), value)])
    to_bytes(value) / from_bytes(data)    the label as a member of a WebDataset shard (suffix ``shard_suffix``)
Augmentation (``data.dataset.joint_transform``): transform(value, rows, cols, box, out_size, flip, permutation) ->
    the label as a tensor after a crop / resize / flip (nearest source ``rows``, ``cols`` of the output pixels;
    ``permutation`` from flip_permutation(card) on flips)
Pictures: paint(panels, value, colors) / mark(draw, value, origin, scale) draw the label in ``label_panels``.
Data: ``sample_key`` (the label's key in a sample dict: "mask", "keypoints", "depth"), ``card_field`` (the dataset
card attribute that declares it), ``from_card(card, **settings)``, and ``label_names`` / ``names_in(card)`` (class or
keypoint names, which every dataset a model meets must share); ``config()`` / ``task_from_config`` save and rebuild
a task with its fitted values.
"""

from __future__ import annotations

import math
from typing import ClassVar, Protocol, runtime_checkable

import numpy as np
import torch

TOP_FRACTION = 0.1  # image uncertainty score = mean of its most uncertain 10% of pixels (HandsOff)


def top_fraction_mean(values: torch.Tensor, fraction: float = TOP_FRACTION) -> float:
    flat = values.reshape(-1)
    k = max(1, int(math.ceil(fraction * flat.numel())))
    return float(flat.topk(k).values.mean())


def most_uncertain(uncertainty: torch.Tensor, fraction: float) -> np.ndarray:
    """(H, W) bool: the floor(fraction * H * W) pixels of highest ``uncertainty`` (H, W) (ties: the first in row-major
    order), the pixels whose generated label a dense task leaves void."""
    flat = uncertainty.detach().float().cpu().numpy().reshape(-1)
    out = np.zeros(flat.shape, bool)
    out[np.argsort(-flat, kind="stable")[:int(math.floor(fraction * flat.size))]] = True
    return out.reshape(uncertainty.shape)


def nearest_resize(array: np.ndarray, size: int) -> np.ndarray:
    """array (H, W) at size x size by nearest neighbour at pixel centres (ids and measured values stay as they are)."""
    h, w = array.shape[:2]
    rows = np.minimum(((np.arange(size) + 0.5) * h / size).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(size) + 0.5) * w / size).astype(np.int64), w - 1)
    return array[rows[:, None], cols[None, :]]


def name_permutation(names: list[str], pairs) -> np.ndarray:
    """ids 0..len(names)-1 with each (a, b) pair of names swapped: a left/right flip's relabeling."""
    perm = np.arange(len(names))
    index = {n: i for i, n in enumerate(names)}
    for a, b in pairs:
        perm[index[a]], perm[index[b]] = index[b], index[a]
    return perm


def pixel_label_transform(value: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """A per-pixel label (H, W) at the output pixels' nearest source ``rows`` (H',) and ``cols`` (W',)."""
    return np.ascontiguousarray(value[rows[:, None], cols[None, :]])


def entropy(p: torch.Tensor, dim: int) -> torch.Tensor:
    return -(p * p.clamp(min=1e-12).log()).sum(dim)


@runtime_checkable
class Task(Protocol):
    name: ClassVar[str]            # short name in configs and on the command line
    aliases: ClassVar[tuple[str, ...]]  # other accepted spellings ("segmentation")
    sample_key: ClassVar[str]      # key of the label in a sample dict / batch
    card_field: ClassVar[str]      # DatasetCard attribute that is None when a dataset lacks this label
    card_label: ClassVar[str]      # what the dataset would need, for messages ("masks")
    card_name: ClassVar[str]       # the task's name in dataset.json's "tasks" list ("segmentation")
    card_attributes: ClassVar[tuple[str, ...]]  # the DatasetCard fields this task owns
    fitted: ClassVar[tuple[str, ...]]  # config keys set by fitting, not chosen by the user
    out_channels: int

    @classmethod
    def from_card(cls, card, **settings) -> Task: ...
    @classmethod
    def names_in(cls, card) -> list[str] | None: ...
    @classmethod
    def card_json(cls, card) -> dict: ...
    @classmethod
    def card_from_json(cls, data: dict, path) -> dict: ...
    @property
    def label_names(self) -> list[str] | None: ...
    def config(self) -> dict: ...
    def fit(self, samples) -> None: ...
    def prepare(self, sample: dict, size: int) -> torch.Tensor: ...
    def targets(self, prepared: torch.Tensor, indices: torch.Tensor, size: int) -> torch.Tensor: ...
    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...
    def constant_loss(self, targets: torch.Tensor) -> float: ...
    def decode(self, outputs: torch.Tensor) -> dict: ...
    def calibrate(self, model, ws: torch.Tensor, prepared: list[torch.Tensor]) -> dict | None: ...
    def label(self, decoded: dict, void_top: float = 0.0) -> np.ndarray: ...
    def resize_label(self, value: np.ndarray, shape: tuple[int, int], size: int) -> np.ndarray: ...
    def card_fields(self) -> dict: ...
    def downstream_loss(self, output: torch.Tensor, batch: dict) -> torch.Tensor: ...
    def metric_update(self, state, output: torch.Tensor, batch: dict): ...
    def metric_result(self, state, image_size: int) -> dict: ...


class TaskBase:
    """Defaults for the optional hooks; a task overrides what it needs."""

    aliases: ClassVar[tuple[str, ...]] = ()
    fitted: ClassVar[tuple[str, ...]] = ()
    folder: ClassVar[str | None] = None        # per-sample label files live in DATASET/folder/
    dataset_file: ClassVar[str | None] = None  # or all samples' labels in this one file of DATASET/
    shard_suffix: ClassVar[str]                # WebDataset member suffix of the label
    # Labels are a class id per pixel (``classes``, ``class_pixels``): generation's class quotas and statistics.
    pixel_classes: ClassVar[bool] = False

    @classmethod
    def existing_label_path(cls, root, card, name: str, image_name: str):
        """``label_path`` of sample ``name``; DatasetError naming it where the file is missing."""
        from handsoff.data.layout import DatasetError

        path = cls.label_path(root, card, name)
        if not path.is_file():
            raise DatasetError(f"{path}: {cls.sample_key} missing for image {image_name}")
        return path

    @classmethod
    def from_legacy_config(cls, config: dict) -> Task:
        """The task of a downstream model saved before tasks saved their own configs (its settings were top-level
        keys of the model's config)."""
        raise NotImplementedError(f"task {cls.name} has no configs older than its own")

    @classmethod
    def flip_permutation(cls, card) -> np.ndarray | None:
        """The permutation of this task's label ids under a horizontal flip (left/right names swapped), or None."""
        return None

    @classmethod
    def breakdown(cls, metrics: dict) -> dict:
        """What a run's results.json shows of this task's metrics beyond the headline numbers (per class, per
        keypoint), from an evaluation's ``metrics``; {} where it has none."""
        return {}

    @classmethod
    def paint(cls, panels: list[np.ndarray], value, colors) -> None:
        """Draw the label into a sample's panels (``visualize.label_panels``): panels[0] is the image, panels[1] the
        overlay (H, W, 3) uint8; a task may change the overlay in place or append panels of its own."""

    @classmethod
    def mark(cls, draw, value, origin: tuple[int, int], scale: int) -> None:
        """Draw marks on the upscaled strip with PIL's ``draw``; the overlay panel's top-left is ``origin``."""

    def fit(self, samples) -> None:
        """Nothing to fit from the labels (``samples`` is a lazy iterable, left unread)."""

    def calibrate(self, model, ws: torch.Tensor, prepared: list[torch.Tensor]) -> dict | None:
        return None

    def targets(self, prepared: torch.Tensor, indices: torch.Tensor, size: int) -> torch.Tensor:
        return prepared[indices]

    def resize_label(self, value: np.ndarray, shape: tuple[int, int], size: int) -> np.ndarray:
        """Per-pixel labels (masks, depth): nearest neighbour, so no invented classes or depths at borders."""
        return value if value.shape[:2] == (size, size) else nearest_resize(value, size)

    @property
    def label_names(self) -> list[str] | None:
        """The names this task's channels stand for (classes, keypoints), or None (depth)."""
        return None

    @classmethod
    def names_in(cls, card) -> list[str] | None:
        """The label names ``card`` declares for this task; datasets a model meets must declare the same."""
        return None

    @classmethod
    def require(cls, card, where: str = "the labeled dataset") -> None:
        """Raise UsageError unless ``card`` declares this task's labels."""
        from handsoff.errors import UsageError

        if getattr(card, cls.card_field) is None:
            raise UsageError(f"task {cls.name}: {where} has no {cls.card_label} (its dataset.json declares none)")

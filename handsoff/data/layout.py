"""The standard on-disk layout for labeled images, with its writer and reader.

    DATASET/
      dataset.json          the card: classes (id, name, colour), keypoint names / skeleton / flip pairs,
                            depth encoding, tasks present, provenance
      images/NAME.png|jpg   RGB images
      masks/NAME.png        uint8 class ids (segmentation)
      depth/NAME.npy        float32 depth, or depth/NAME.png 16-bit with value = png / depth.scale
      keypoints.json        COCO keypoints: images, annotations with [x, y, v] * K (pixel centres at +0.5)
      factors.jsonl         optional per-image metadata (scene factors of rendered data)

Every file is written to a temporary name and renamed, so a killed writer leaves no half-written file.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from dataclasses import fields as dataclasses_fields
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from handsoff.errors import DataError, OutputError
from handsoff.fileio import atomic_save, atomic_write_bytes, atomic_write_json

FORMAT_NAME = "handsoff-labeled"
FORMAT_VERSION = 1
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
LAYOUT_NAMES = {"dataset.json", "images", "factors.jsonl"}  # and each task's folder or dataset-wide file


class DatasetError(DataError):
    """Bad labeled data; the message names the file and what is wrong."""


@dataclass
class DatasetCard:
    """What ``dataset.json`` holds. ``classes``: names in id order; ``colors``: one RGB triple per class."""

    classes: list[str] | None = None
    colors: list[tuple[int, int, int]] | None = None
    keypoint_names: list[str] | None = None
    skeleton: list[tuple[str, str]] = field(default_factory=list)
    keypoint_flip_pairs: list[tuple[str, str]] = field(default_factory=list)
    class_flip_pairs: list[tuple[str, str]] = field(default_factory=list)
    depth_format: str | None = None  # "npy" or "png16"
    depth_scale: float = 1.0  # png16 only: depth = png value / scale
    depth_unit: str = "m"
    source: dict = field(default_factory=dict)

    @property
    def tasks(self) -> list[str]:
        """The tasks whose labels the dataset holds, by their names in dataset.json."""
        from handsoff.tasks import card_tasks

        return [t.card_name for t in card_tasks(self)]

    def require(self, tasks: list[str], where) -> None:
        """Raise DatasetError naming ``where`` (the dataset) unless it has labels for every task (seg, kp, depth)."""
        from handsoff.tasks import TASKS

        missing = [TASKS[t] for t in tasks if getattr(self, TASKS[t].card_field) is None]
        if missing:
            raise DatasetError(f"{where}: the dataset has no labels for task(s) {', '.join(t.name for t in missing)} "
                               f"(its dataset.json declares no {', '.join(t.card_label for t in missing)})")

    def to_json(self) -> dict:
        """dataset.json: format, version, the tasks present, each task's entries (its ``card_json``), source."""
        from handsoff.tasks import TASKS

        sections = {k: v for task in TASKS.values() for k, v in task.card_json(self).items()}
        return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "tasks": self.tasks, **sections,
                "source": self.source}

    @classmethod
    def from_json(cls, data: dict, path: Path) -> DatasetCard:
        """The card in ``data`` (read from ``path``, which messages name); each task parses its own entries."""
        from handsoff.tasks import TASKS

        if not isinstance(data, dict):
            raise DatasetError(f"{path}: expected a JSON object (the dataset card), got {type(data).__name__}")
        if data.get("format") != FORMAT_NAME:
            raise DatasetError(f"{path}: format is {data.get('format')!r}, expected {FORMAT_NAME!r}")
        fields = {k: v for task in TASKS.values() for k, v in task.card_from_json(data, path).items()}
        return cls(**fields, source=data.get("source", {}))

    def restricted_to(self, tasks) -> DatasetCard:
        """This card with only the entries of ``tasks`` (task classes or objects); the others' fields at their
        defaults, the source dropped."""
        keep = {a for task in tasks for a in task.card_attributes}
        return DatasetCard(**{f.name: getattr(self, f.name) for f in dataclasses_fields(self) if f.name in keep})


def default_color(i: int) -> list[int]:
    """A distinct colour per class id (golden-ratio hues); background (0) is black."""
    if i == 0:
        return [0, 0, 0]
    import colorsys

    r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.75, 0.95)
    return [int(r * 255), int(g * 255), int(b * 255)]


def sample_files(root: Path, card: DatasetCard, name: str) -> list[Path]:
    """The per-sample files of sample ``name`` in the layout: its image and the label files of the tasks the card
    declares that keep one file per sample (keypoints live in the dataset-wide keypoints.json)."""
    from handsoff.tasks import card_tasks

    return [root / "images" / f"{name}.png"] + [t.label_path(root, card, name) for t in card_tasks(card) if t.folder]


def write_sample_files(root: Path, card: DatasetCard, name: str, sample: dict) -> None:
    """Write one sample's per-sample label files (each task's ``write_label``: mask (H, W) ids as PNG, depth (H, W)
    in the card's format), then its image (H, W, 3) uint8, each atomically: a label refused (a class id that does
    not fit a PNG) leaves no image behind."""
    from handsoff.tasks import sample_tasks

    for task in sample_tasks(sample):
        if task.folder:
            task.write_label(root, card, name, sample[task.sample_key])
    atomic_save(root / "images" / f"{name}.png", lambda p: Image.fromarray(sample["image"]).save(p, format="PNG"))


def png_bytes(array: np.ndarray) -> bytes:
    """An (H, W) or (H, W, 3) uint8 / uint16 array as PNG file bytes."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


class DatasetWriter:
    """Write samples into the standard layout; ``close()`` writes the dataset-wide label files (keypoints.json)
    and dataset.json last.

    Refuses a non-empty output folder unless ``overwrite`` (then existing files of the same names are replaced),
    and even then a folder holding anything but the layout's own files.
    """

    def __init__(self, root: str | os.PathLike, card: DatasetCard, overwrite: bool = False):
        self.root, self.card = Path(root), card
        if self.root.exists() and any(self.root.iterdir()):
            if not overwrite:
                raise OutputError(f"{self.root}: exists and is not empty (use --force / overwrite=True)")
            from handsoff.tasks import TASKS

            own = LAYOUT_NAMES | {t.folder or t.dataset_file for t in TASKS.values()}
            foreign = sorted(p.name for p in self.root.iterdir() if p.name not in own)
            if foreign:  # --force rewrites a dataset, never a folder of someone else's files
                raise OutputError(f"{self.root}: holds {', '.join(foreign[:3])}, which is not part of a labeled "
                                  "dataset; --force only rewrites dataset folders, choose another output")
        self.root.mkdir(parents=True, exist_ok=True)
        self.dataset_labels: dict[str, list] = {}  # task name -> [(name, (H, W), label)] for its dataset-wide file
        self.factors = []
        self.names: set[str] = set()

    def add(self, name: str, image: np.ndarray, *, factors: dict | None = None, **labels: np.ndarray | None) -> None:
        """image (H, W, 3) uint8 and its labels under their tasks' sample keys (mask (H, W) integer ids in 0..255;
        depth (H, W) float; keypoints (K, 3) [x, y, v]; None: no label). A repeated name, an unknown label key or a
        class id that does not fit a mask PNG is an error, never a silent overwrite, drop or wrap-around."""
        from handsoff.tasks import TASKS, sample_tasks

        if name in self.names:
            raise DatasetError(f"{self.root}: two samples named {name!r} (e.g. images of the same file stem in "
                               "different folders); rename one")
        known = {t.sample_key for t in TASKS.values()}
        if unknown := sorted(set(labels) - known):
            raise TypeError(f"DatasetWriter.add: unknown label {', '.join(unknown)}; labels are {', '.join(known)}")
        labels = {key: value for key, value in labels.items() if value is not None}
        write_sample_files(self.root, self.card, name, {"image": image, **labels})
        self.names.add(name)
        for task in sample_tasks(labels):
            if task.dataset_file:
                self.dataset_labels.setdefault(task.name, []).append((name, image.shape[:2], labels[task.sample_key]))
        if factors is not None:
            self.factors.append({"name": name, **factors})

    def close(self) -> Path:
        from handsoff.tasks import card_tasks

        for task in card_tasks(self.card):
            if task.dataset_file:
                task.write_dataset_file(self.root, self.card, self.dataset_labels.get(task.name, []))
        if self.factors:
            atomic_write_bytes(self.root / "factors.jsonl",
                               "".join(json.dumps(f) + "\n" for f in self.factors).encode())
        atomic_write_json(self.root / "dataset.json", self.card.to_json())
        return self.root


def to_rgb8(im: Image.Image, path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB from a PIL image, converting only where the conversion is exact; anything else is a
    DatasetError naming ``path``. 8-bit grey, palette and 1-bit images are expanded; 16-bit grey (PNG "I;16" or
    "I") is rescaled by 255 / 65535 and rounded (a 16-bit file made from 8-bit data comes back bit-exact), where
    PIL's own conversion would clip every value above 255 to white; RGBA / LA / PA are accepted when fully
    opaque (alpha would otherwise be lost silently)."""
    mode = im.mode
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        alpha = np.asarray(im.convert("RGBA"))[..., 3]
        if (alpha != 255).any():
            raise DatasetError(f"{path}: image has transparent pixels ({mode} with alpha below 255); flatten it "
                               "onto a background first")
    if mode in ("RGB", "RGBA", "L", "LA", "P", "PA", "1", "CMYK", "YCbCr"):
        return np.asarray(im.convert("RGB"))
    if mode.startswith("I;16") or (mode == "I" and im.format == "PNG"):
        values = np.asarray(im, dtype=np.float64)
        if values.min() < 0 or values.max() > 65535:
            raise DatasetError(f"{path}: {mode} image values {values.min():g}..{values.max():g} are not 16-bit")
        grey = np.round(values * (255 / 65535)).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    raise DatasetError(f"{path}: image mode {mode} (e.g. 32-bit integer or float pixels) has no exact 8-bit RGB "
                       "form; convert it to 8- or 16-bit RGB / greyscale first")


def read_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB (see ``to_rgb8`` for the modes accepted); a clear error for files that are not images."""
    try:
        with Image.open(path) as im:
            return to_rgb8(im, path)
    except (UnidentifiedImageError, OSError) as e:
        raise DatasetError(f"{path}: cannot read image ({e})") from None


def read_label_png(path: Path, what: str) -> np.ndarray:
    """The pixel array of a label PNG (mask or 16-bit depth); a DatasetError naming the file if it is unreadable."""
    try:
        with Image.open(path) as im:
            return np.asarray(im)
    except (UnidentifiedImageError, OSError) as e:
        raise DatasetError(f"{path}: cannot read {what} ({e})") from None


def read_sample_labels(root: Path, card: DatasetCard, name: str, shape: tuple[int, int], image_name: str,
                       indexes: dict | None = None) -> dict:
    """The labels of sample ``name`` the card declares, under their sample keys, each checked against the image's
    ``shape`` (H, W) by its task's ``read_label`` (dataset-wide files come read, as ``indexes``: task name ->
    ``read_dataset_file``); DatasetError naming the file for anything missing or malformed."""
    from handsoff.tasks import card_tasks

    indexes = indexes or {}
    return {t.sample_key: t.read_label(root, card, name, shape, image_name, indexes.get(t.name))
            for t in card_tasks(card)}


class LabeledFolder:
    """Read access to a dataset in the standard layout, with validation of every file it returns."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        card_path = self.root / "dataset.json"
        if not card_path.is_file():
            raise DatasetError(f"{self.root}: no dataset.json; not a handsoff labeled dataset")
        try:
            self.card = DatasetCard.from_json(json.loads(card_path.read_text()), card_path)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
            raise DatasetError(f"{card_path}: invalid dataset card ({type(e).__name__}: {e})") from None
        image_dir = self.root / "images"
        self.image_paths = {p.stem: p for p in sorted(image_dir.glob("*")) if p.suffix.lower() in IMAGE_SUFFIXES}
        if not self.image_paths:
            raise DatasetError(f"{image_dir}: no images")
        self.names = sorted(self.image_paths)
        from handsoff.tasks import card_tasks

        self.indexes = {t.name: t.read_dataset_file(self.root, self.card) for t in card_tasks(self.card)
                        if t.dataset_file}  # dataset-wide label files (keypoints.json), read once

    def __len__(self) -> int:
        return len(self.names)

    def load(self, name: str) -> dict:
        """image (H, W, 3) uint8, and per task: mask (H, W) int64, depth (H, W) float32, keypoints (K, 3)."""
        image = read_image(self.image_paths[name])
        return {"name": name, "image": image, **read_sample_labels(self.root, self.card, name, image.shape[:2],
                                                                    self.image_paths[name].name, self.indexes)}

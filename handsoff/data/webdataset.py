"""WebDataset-style tar shards: one tar per shard, the files of a sample sharing its key.

    KEY.png          RGB image
    KEY.mask.png     uint8 class ids (segmentation)
    KEY.depth.npy    float32 depth
    KEY.kp.json      {"keypoints": [[x, y, v], ...]} in pixels, centres at +0.5

This is the layout the ``webdataset`` library reads (keys group by the part before the first dot). Tars are
written deterministically (fixed mtime, owner and order), so the same samples give byte-identical shards.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from handsoff.data.layout import DatasetError, png_bytes
from handsoff.fileio import atomic_save


def encode_sample(sample: dict) -> list[tuple[str, bytes]]:
    """(suffix, bytes) pairs of a sample dict: the image, then each label it holds (its task's ``to_bytes``)."""
    from handsoff.tasks import sample_tasks

    return [("png", png_bytes(sample["image"]))] + [(t.shard_suffix, t.to_bytes(sample[t.sample_key]))
                                                    for t in sample_tasks(sample)]


def write_webdataset(path: str | os.PathLike, samples: list[tuple[str, dict]]) -> Path:
    """Write (key, sample) pairs into one tar shard, atomically."""
    def write(tmp: Path) -> None:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for key, sample in samples:
                if "." in key:
                    raise ValueError(f"sample key {key!r} must not contain a dot")
                for suffix, data in encode_sample(sample):
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    tar.addfile(info, io.BytesIO(data))
    return atomic_save(path, write)


def _decode(suffix: str, data: bytes, where: str):
    """(sample key, value) of one shard member; (None, None) for a suffix no task reads."""
    from handsoff.tasks import TASKS

    try:
        if suffix == "png":
            return "image", np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        for task in TASKS.values():
            if suffix == task.shard_suffix:
                return task.sample_key, task.from_bytes(data)
    except Exception as e:  # noqa: BLE001 - any decoding failure is bad data in that member
        raise DatasetError(f"{where}: cannot decode ({e})") from None
    return None, None


def read_webdataset(paths: str | os.PathLike | list) -> Iterator[dict]:
    """Samples from tar shards (a path, a folder of ``*.tar``, or a list of paths), in order: dicts with
    name, image (H, W, 3) uint8 and whichever of mask, depth, keypoints the shard holds."""
    if isinstance(paths, (str, os.PathLike)):
        p = Path(paths)
        paths = sorted(p.glob("*.tar")) if p.is_dir() else [p]
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise DatasetError(f"{path}: shard not found")
        current: dict | None = None
        try:
            tar = tarfile.open(path)
        except tarfile.TarError as e:
            raise DatasetError(f"{path}: not a tar shard ({e})") from None
        with tar:
            for member in tar:
                key, _, suffix = member.name.partition(".")
                if current is not None and current["name"] != key:
                    yield current
                    current = None
                if current is None:
                    current = {"name": key}
                field, value = _decode(suffix, tar.extractfile(member).read(), f"{path}:{member.name}")
                if field is not None:
                    current[field] = value
        if current is not None:
            yield current


class ShardedDataset:
    """A dataset folder whose samples are in WebDataset shards (``handsoff generate --format webdataset``):
    ``dataset.json`` plus ``*.tar``. Same read API as ``LabeledFolder`` (card, names, load); the shards are read
    into memory once (labeled data for dense tasks at the resolutions handsoff generates fits easily)."""

    def __init__(self, root: str | os.PathLike):
        from handsoff.data.layout import DatasetCard

        self.root = Path(root)
        card_path = self.root / "dataset.json"
        if not card_path.is_file():
            raise DatasetError(f"{self.root}: no dataset.json; not a handsoff dataset")
        self.card = DatasetCard.from_json(json.loads(card_path.read_text()), card_path)
        self.samples = {s["name"]: s for s in read_webdataset(self.root)}
        if not self.samples:
            raise DatasetError(f"{self.root}: no samples in its shards")
        self.names = sorted(self.samples)

    def __len__(self) -> int:
        return len(self.names)

    def load(self, name: str) -> dict:
        return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in self.samples[name].items()}


def open_labeled(root: str | os.PathLike):
    """``LabeledFolder`` for the standard folder layout, ``ShardedDataset`` for WebDataset shards."""
    from handsoff.data.layout import LabeledFolder

    root = Path(root)
    if not (root / "images").is_dir() and any(root.glob("*.tar")):
        return ShardedDataset(root)
    return LabeledFolder(root)

"""Importers from the labeled layouts users have into the standard layout (``layout.py``).

Class mappings are data: JSON files with the target ``classes`` (background first) and a ``map`` from source
class names to target names (see ``handsoff/data/mappings``); ``load_class_mapping`` accepts a shipped name or
a path.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from handsoff.data.layout import DatasetCard, DatasetError, DatasetWriter, read_image

MAPPINGS_DIR = Path(__file__).resolve().parent / "mappings"


@dataclass
class ClassMapping:
    """Target classes (id order) and, optionally, a map from source class names to target names."""

    name: str
    classes: list[str]
    map: dict[str, str] | None = None
    flip_pairs: list[tuple[str, str]] | None = None

    def lut(self, source_classes: list[str], where: str) -> np.ndarray:
        """Look-up table source id -> target id; every source class must be mapped."""
        if self.map is None:
            return np.arange(len(source_classes))
        target = {n: i for i, n in enumerate(self.classes)}
        lut = np.zeros(max(len(source_classes), 1), np.int64)
        for i, name in enumerate(source_classes):
            if name not in self.map:
                if name == "background" and "background" in target:
                    continue
                raise DatasetError(f"{where}: class {name!r} is not in mapping {self.name!r}")
            if self.map[name] not in target:
                raise DatasetError(f"mapping {self.name!r}: {name!r} maps to unknown class {self.map[name]!r}")
            lut[i] = target[self.map[name]]
        return lut


def load_class_mapping(name_or_path: str | os.PathLike) -> ClassMapping:
    path = Path(name_or_path)
    if not path.is_file():
        path = MAPPINGS_DIR / f"{name_or_path}.json"
    if not path.is_file():
        shipped = sorted(p.stem for p in MAPPINGS_DIR.glob("*.json"))
        raise DatasetError(f"{name_or_path}: no such mapping file or shipped mapping (shipped: {', '.join(shipped)})")
    data = json.loads(path.read_text())
    return ClassMapping(data.get("name", path.stem), list(data["classes"]), data.get("map"),
                        [tuple(p) for p in data.get("flip_pairs", [])])


def _card(mapping: ClassMapping, source: dict) -> DatasetCard:
    # Left/right class pairs only survive a mapping that keeps them apart.
    pairs = mapping.flip_pairs if mapping.map is None else []
    return DatasetCard(classes=mapping.classes, class_flip_pairs=pairs or [], source=source)


def import_handsoff_faces(src: str | os.PathLike, out: str | os.PathLike, mapping: str | None = "celebamask19_to_8",
                          overwrite: bool = False) -> dict:
    """The official HandsOff face layout: ``image_N.jpg`` (or .png) with ``image_maskN.npy`` (19 class ids)."""
    src = Path(src)
    source = load_class_mapping("celebamask19")
    target = load_class_mapping(mapping) if mapping else source
    lut = target.lut(source.classes, str(src))
    images = {m.group(1): p for p in src.iterdir() if (m := re.fullmatch(r"image_(\d+)\.(jpg|jpeg|png)", p.name))}
    masks = {m.group(1): p for p in src.iterdir() if (m := re.fullmatch(r"image_mask(\d+)\.npy", p.name))}
    if not images:
        raise DatasetError(f"{src}: no image_N.jpg files; not the HandsOff face layout")
    orphans = sorted(set(masks) - set(images), key=int)
    if orphans:
        raise DatasetError(f"{masks[orphans[0]]}: mask without an image (expected {src / f'image_{orphans[0]}.jpg'})")
    writer = DatasetWriter(out, _card(target, {"importer": "handsoff-faces", "from": str(src),
                                               "mapping": target.name}), overwrite=overwrite)
    for key in sorted(images, key=int):
        if key not in masks:
            raise DatasetError(f"{images[key]}: no mask (expected {src / f'image_mask{key}.npy'})")
        image = read_image(images[key])
        try:
            mask = np.load(masks[key])
        except (ValueError, OSError) as e:
            raise DatasetError(f"{masks[key]}: cannot read ({e})") from None
        if mask.shape != image.shape[:2]:
            raise DatasetError(f"{masks[key]}: mask shape {mask.shape} does not match image {image.shape[:2]}")
        bad = np.unique(mask[(mask < 0) | (mask >= len(source.classes))])
        if bad.size:
            raise DatasetError(f"{masks[key]}: unknown class ids {bad.tolist()} "
                               f"(expected 0..{len(source.classes) - 1})")
        writer.add(f"image_{key}", image, mask=lut[mask.astype(np.int64)])  # the writer checks the id range
    writer.close()
    return {"images": len(images), "classes": target.classes}


def import_coco(annotations: str | os.PathLike, images_dir: str | os.PathLike, out: str | os.PathLike,
                mapping: str | None = None, overwrite: bool = False) -> dict:
    """COCO instance segmentations (polygons or RLE) rasterized into class-id masks with pycocotools.

    Overlaps: annotations are drawn from largest to smallest area (ties by annotation id), so a small part that
    lies on a larger one (a light on a bumper) stays visible; the order does not depend on file order.
    """
    from pycocotools.coco import COCO

    annotations, images_dir = Path(annotations), Path(images_dir)
    try:
        coco = COCO(str(annotations))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DatasetError(f"{annotations}: not a COCO annotation file ({e})") from None
    categories = sorted(coco.loadCats(coco.getCatIds()), key=lambda c: c["id"])
    source_classes = ["background"] + [c["name"] for c in categories]
    cat_index = {c["id"]: i + 1 for i, c in enumerate(categories)}
    target = load_class_mapping(mapping) if mapping else ClassMapping("coco", source_classes)
    lut = target.lut(source_classes, str(annotations))
    writer = DatasetWriter(out, _card(target, {"importer": "coco", "from": str(annotations),
                                               "mapping": target.name}), overwrite=overwrite)
    for info in sorted(coco.loadImgs(coco.getImgIds()), key=lambda im: im["id"]):
        path = images_dir / info["file_name"]
        if not path.is_file():
            raise DatasetError(f"{path}: image listed in {annotations.name} is missing")
        image = read_image(path)
        if image.shape[:2] != (info["height"], info["width"]):
            raise DatasetError(f"{path}: image is {image.shape[1]}x{image.shape[0]}, {annotations.name} says "
                               f"{info['width']}x{info['height']}")
        mask = np.zeros(image.shape[:2], np.int64)  # wide ids reach the writer's range check, never wrap
        anns = sorted(coco.loadAnns(coco.getAnnIds(imgIds=info["id"], iscrowd=None)),
                      key=lambda a: (-float(a.get("area", 0)), a["id"]))
        for ann in anns:
            if ann["category_id"] not in cat_index:
                raise DatasetError(f"{annotations}: annotation {ann['id']} has unknown category {ann['category_id']}")
            mask[coco.annToMask(ann).astype(bool)] = lut[cat_index[ann["category_id"]]]
        writer.add(Path(info["file_name"]).stem, image, mask=mask)
    writer.close()
    return {"images": len(coco.getImgIds()), "classes": target.classes}


def import_palette_masks(images_dir: str | os.PathLike, masks_dir: str | os.PathLike,
                         palette: str | os.PathLike, out: str | os.PathLike, max_distance: float = 48.0,
                         overwrite: bool = False) -> dict:
    """Images with colour-coded PNG masks of the same stem, and a palette JSON
    ``{"classes": [{"name": ..., "color": [r, g, b]}, ...]}`` (background first).

    Anti-aliased edge colours are snapped to the nearest palette entry and counted; a colour farther than
    ``max_distance`` (RGB Euclidean) from every entry is an error, since it names no known class.
    """
    images_dir, masks_dir, palette = Path(images_dir), Path(masks_dir), Path(palette)
    entries = json.loads(palette.read_text())["classes"]
    names = [e["name"] for e in entries]
    colours = np.array([e["color"] for e in entries], np.float32)
    card = DatasetCard(classes=names, colors=[tuple(int(v) for v in e["color"]) for e in entries],
                       source={"importer": "palette", "from": str(masks_dir)})
    images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not images:
        raise DatasetError(f"{images_dir}: no images")
    writer = DatasetWriter(out, card, overwrite=overwrite)
    snapped = total = 0
    for path in images:
        mask_path = masks_dir / f"{path.stem}.png"
        if not mask_path.is_file():
            raise DatasetError(f"{mask_path}: mask missing for image {path.name}")
        image, coloured = read_image(path), read_image(mask_path).astype(np.float32)
        if coloured.shape != image.shape:
            raise DatasetError(f"{mask_path}: mask is {coloured.shape[1]}x{coloured.shape[0]}, image is "
                               f"{image.shape[1]}x{image.shape[0]}")
        dist = np.linalg.norm(coloured[:, :, None, :] - colours[None, None], axis=-1)  # (H, W, C)
        ids = dist.argmin(-1)
        nearest = dist.min(-1)
        if (nearest > max_distance).any():
            y, x = np.argwhere(nearest > max_distance)[0]
            raise DatasetError(f"{mask_path}: colour {coloured[y, x].astype(int).tolist()} at (x={x}, y={y}) is "
                               f"not near any palette entry of {palette.name}")
        snapped += int((nearest > 0).sum())
        total += nearest.size
        writer.add(path.stem, image, mask=ids)
    writer.close()
    return {"images": len(images), "classes": names, "snapped_pixels": snapped, "pixels": total}

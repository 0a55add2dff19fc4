"""The generation run: batches, workers, resumption and finalization (see the package docstring)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from handsoff import distributed
from handsoff.data.layout import (
    DatasetCard,
    DatasetError,
    read_image,
    read_sample_labels,
    sample_files,
    write_sample_files,
)
from handsoff.data.webdataset import write_webdataset
from handsoff.errors import UsageError
from handsoff.fileio import atomic_write_bytes, atomic_write_json, fingerprint, output_lock
from handsoff.generator.sampling import latents_for_seeds
from handsoff.label_generator.model import LABEL_PRECISIONS, resolve_label_precision
from handsoff.metrics.labels import presence_pixels
from handsoff.tasks import card_tasks, pixel_class_task, sample_tasks

PROGRESS_DIR = ".progress"


@dataclass
class GenerationConfig:
    """What defines a generated dataset (saved in dataset.json; a resumed run must match it).

    n: samples in the dataset before uncertainty filtering. filter_top: fraction dropped as most uncertain.
    filter_by: a task name or 'combined' (mean of the tasks' rank percentiles). batch: samples per batch (the
    unit of work). fmt: 'folder' (standard layout) or 'webdataset' (tar shards of ``shard_size`` samples).
    min_class_fraction: {class name: share of the n samples that must contain it}; at most
    ``MAX_CANDIDATES_PER_SAMPLE * n`` candidates are drawn for it, then generation stops with an error.
    label_precision: the label maps' arithmetic (``label_generator.model.LABEL_PRECISIONS``); 'auto' is resolved to
    'bf16' or 'fp32' for this machine when generation starts and recorded so (a run resumed on a machine that
    resolves it otherwise is refused rather than mixing the two in one dataset).
    void_top: in every sample, this fraction of the dense labels' pixels on which the ensemble's members disagree
    most is left without a label (segmentation id ``VOID`` = 255, depth NaN), which downstream losses skip. On the
    heads demo these pixels hold most of the wrong labels, but also most ear labels, and its network scored lower
    with 0.1 than with 0 (README, "Generating a dataset").
    """

    n: int
    seed: int = 0
    truncation: float = 0.7
    filter_top: float = 0.1
    filter_by: str = "combined"
    keep_filtered: bool = False
    batch: int = 16
    fmt: str = "folder"
    shard_size: int = 1000
    min_class_fraction: dict[str, float] = field(default_factory=dict)
    label_precision: str = "auto"
    void_top: float = 0.0

    def __post_init__(self):
        if self.n < 1:
            raise UsageError(f"n must be at least 1, got {self.n}")
        if not 0 <= self.filter_top < 1:
            raise UsageError(f"filter_top must be in [0, 1), got {self.filter_top}")
        if not 0 <= self.void_top < 1:
            raise UsageError(f"void_top must be in [0, 1), got {self.void_top}")
        if self.fmt not in ("folder", "webdataset"):
            raise UsageError(f"format must be 'folder' or 'webdataset', got {self.fmt!r}")
        for name, f in self.min_class_fraction.items():
            if not 0 < f <= 1:
                raise UsageError(f"min class fraction for {name!r} must be in (0, 1], got {f}")
        if len(self.min_class_fraction) > 1:
            raise UsageError("one --min-class-fraction class per run is supported")
        if self.label_precision not in LABEL_PRECISIONS:
            raise UsageError(f"label precision must be one of {', '.join(LABEL_PRECISIONS)}, "
                             f"got {self.label_precision!r}")


# Class quotas draw at most this many candidates per requested sample before giving up with an error.
MAX_CANDIDATES_PER_SAMPLE = 20


def _name(index: int) -> str:
    return f"{index:08d}"


def _record_path(out: Path, batch: int) -> Path:
    return out / PROGRESS_DIR / f"batch-{batch:07d}.json"


def file_card(model, labels: DatasetCard | None = None) -> DatasetCard:
    """The card of this label generator's samples: its tasks' entries of ``labels`` (the card of the labeled data it
    was fitted on: colours, skeleton, flip pairs, units), with what decides the files and their formats (class and
    keypoint names, depth format) from the model's tasks."""
    card = (labels or DatasetCard()).restricted_to(model.tasks)
    return dataclasses.replace(card, **{k: v for task in model.tasks for k, v in task.card_fields().items()})


def run_batch(model, out: Path, config: GenerationConfig, batch: int) -> dict:
    """Generate, label and write the samples of one batch; returns (and writes) its record."""
    from handsoff.label_generator.model import prediction_sample

    indices = list(range(batch * config.batch, (batch + 1) * config.batch))
    z = latents_for_seeds(config.seed, indices, model.G.z_dim)
    result = model.predict_z(z, truncation_psi=config.truncation, precision=config.label_precision)
    seg = segmentation_task(model)
    card = file_card(model)
    samples = []
    for i, index in enumerate(indices):
        sample = prediction_sample(result, i, void_top=config.void_top)
        name = _name(index)
        write_sample_files(out, card, name, sample)
        entry = {"index": index, "name": name, "scores": {t.name: result[t.name][i]["score"] for t in model.tasks}}
        for task in sample_tasks(sample):  # labels of dataset-wide files (keypoints.json): written at the end
            if task.dataset_file:
                entry[task.sample_key] = np.round(np.asarray(sample[task.sample_key], np.float64), 3).tolist()
        if seg is not None:
            entry["class_pixels"] = seg.class_pixels(sample[seg.sample_key], len(seg.classes)).tolist()
        samples.append(entry)
    record = {"batch": batch, "samples": samples}
    atomic_write_json(_record_path(out, batch), record)
    return record


def _read_records(out: Path, batches: range) -> dict[int, dict]:
    records = {}
    for b in batches:
        path = _record_path(out, b)
        if path.exists():
            records[b] = json.loads(path.read_text())
    return records


def _quota_selection(entries: list[dict], config: GenerationConfig, classes: list[str], present: int
                     ) -> tuple[list[int], bool]:
    """Indices selected under the class quota from candidates in index order (a class counts when it has at least
    ``present`` pixels); and whether the quotas are full."""
    if not config.min_class_fraction:
        chosen = [e["index"] for e in entries[:config.n]]
        return chosen, len(chosen) == config.n
    (name, fraction), = config.min_class_fraction.items()
    cls = classes.index(name)
    need_with = math.ceil(fraction * config.n)
    need_without = config.n - need_with
    with_cls, without = [], []
    for e in entries:
        if e["class_pixels"][cls] >= present:
            if len(with_cls) < need_with:
                with_cls.append(e["index"])
        elif len(without) < need_without:
            without.append(e["index"])
        if len(with_cls) == need_with and len(without) == need_without:
            break
    return sorted(with_cls + without), len(with_cls) == need_with and len(without) == need_without


def _percentiles(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    return ranks / max(len(values) - 1, 1)


def filter_scores(entries: list[dict], filter_by: str) -> np.ndarray:
    """The filter score of each entry: a task's rank percentile, or the mean of all tasks' ('combined')."""
    tasks = list(entries[0]["scores"])  # filter_by is one of them or 'combined' (``check_config``)
    use = tasks if filter_by == "combined" else [filter_by]
    return np.mean([_percentiles(np.array([e["scores"][t] for e in entries])) for t in use], axis=0)


def check_config(config: GenerationConfig, task_names: list[str], classes: list[str]) -> None:
    """Raise UsageError for settings this label generator cannot serve (an unknown --filter-by task or quota class),
    before anything is written."""
    if config.filter_by != "combined" and config.filter_by not in task_names:
        raise UsageError(f"--filter-by {config.filter_by}: not a task of the label generator (its tasks: "
                         f"{', '.join(task_names)}, or combined)")
    for name in config.min_class_fraction:
        if name not in classes:
            raise UsageError(f"--min-class-fraction: {name!r} is not a class of the label generator "
                             f"({', '.join(classes) or 'no segmentation task'})")


def dataset_complete(out: str | os.PathLike) -> bool:
    """Whether ``generate_dataset`` finished ``out`` (dataset.json is written last)."""
    return (Path(out) / "dataset.json").is_file()


def segmentation_task(model):
    """The label generator's task with a class per pixel (segmentation): class quotas and class statistics are
    about its classes."""
    return pixel_class_task(model.tasks)


def generate_dataset(model, out: str | os.PathLike, config: GenerationConfig, *, progress: bool = True,
                     source: dict | None = None) -> Path | None:
    """Generate (or resume) a dataset into ``out``; returns its path on the rank that finalized it.

    Rank 0 holds the lock on ``out`` for the whole run (the other ranks of a torchrun job write into it too)."""
    seg = segmentation_task(model)
    classes = seg.classes if seg is not None else []
    check_config(config, [t.name for t in model.tasks], classes)
    precision = resolve_label_precision(config.label_precision, model.ensemble.weight1.device)
    config = dataclasses.replace(config, label_precision=precision)
    out = Path(out)
    rank, world = distributed.init()
    with output_lock(out) if rank == 0 else contextlib.nullcontext():
        return _generate(model, out, config, classes, rank, world, progress, source)


def _as_now(saved: dict) -> dict:
    """Settings saved by an earlier version, with the settings added since at their defaults (what it used)."""
    added = {f.name: f.default for f in dataclasses.fields(GenerationConfig)
             if f.name not in saved and f.default is not dataclasses.MISSING}
    return {**added, **saved}


def _generate(model, out: Path, config: GenerationConfig, classes: list[str], rank: int, world: int,
              progress: bool, source: dict | None) -> Path | None:
    settings = dataclasses.asdict(config)
    settings_path = out / PROGRESS_DIR / "config.json"
    # What produced the samples: the label generator's and the generator's weights. A run resumed (or a dataset
    # "regenerated") with other networks would mix labels of two models in one dataset.
    producer = fingerprint(model.ensemble.state_dict(), model.G.state_dict())
    if rank == 0:
        if (out / "dataset.json").exists():
            source_done = json.loads((out / "dataset.json").read_text()).get("source", {})
            if _as_now(source_done.get("generation", {})) != settings:
                raise DatasetError(f"{out / 'dataset.json'}: a finished dataset with other settings is there; "
                                   "choose another --out")
            if source_done.get("producer", producer) != producer:
                raise DatasetError(f"{out / 'dataset.json'}: a finished dataset from another label generator or "
                                   f"generator (fingerprint {source_done['producer']}, now {producer}); choose "
                                   "another --out")
        elif settings_path.exists():
            saved = _as_now(json.loads(settings_path.read_text()))
            saved_producer = saved.pop("producer", producer)
            if saved != settings:
                changed = sorted(k for k in settings if saved.get(k) != settings[k])
                raise DatasetError(f"{settings_path}: cannot resume with different settings ({', '.join(changed)})")
            if saved_producer != producer:
                raise DatasetError(f"{out}: this unfinished run was started with another label generator or "
                                   f"generator (fingerprint {saved_producer}, now {producer}); resume with the "
                                   f"same ones, or delete {out} to start fresh")
        elif out.exists() and any(out.iterdir()):
            raise DatasetError(f"{out}: exists and is not an unfinished generation run; choose an empty --out")
        else:
            atomic_write_json(settings_path, {**settings, "producer": producer})
    distributed.barrier(world)
    if (out / "dataset.json").exists():
        return out if rank == 0 else None

    present = presence_pixels(model.label_size ** 2)  # pixels that make a class present in a sample
    n_batches = math.ceil(config.n / config.batch)
    first = 0
    while True:  # rounds: one without quotas; more while a class quota is not yet full
        todo = [b for b in range(first, n_batches) if b % world == rank and not _record_path(out, b).exists()]
        with tqdm(total=len(todo) * config.batch, desc=f"generating (worker {rank + 1}/{world})", unit="img",
                  disable=not progress) as bar:
            for b in todo:
                run_batch(model, out, config, b)
                bar.update(config.batch)
        distributed.barrier(world)
        records = _read_records(out, range(n_batches))
        entries = [e for b in sorted(records) for e in records[b]["samples"]]
        _, full = _quota_selection(entries, config, classes, present)
        if full or not config.min_class_fraction:
            break
        # Not enough samples of the class yet: extend the candidate range by what the rate so far suggests, up to
        # MAX_CANDIDATES_PER_SAMPLE * n candidates (a class the generator never draws would otherwise never end).
        (name, fraction), = config.min_class_fraction.items()
        cls = classes.index(name)
        found = int(sum(e["class_pixels"][cls] >= present for e in entries))
        limit = math.ceil(MAX_CANDIDATES_PER_SAMPLE * config.n / config.batch)
        if n_batches >= limit:
            raise UsageError(f"--min-class-fraction {name}={fraction:g}: {found} of {len(entries)} candidates "
                             f"contain {name!r} ({found / len(entries):.3f}), {math.ceil(fraction * config.n)} "
                             f"of {config.n} are needed; gave up after {MAX_CANDIDATES_PER_SAMPLE} candidates per "
                             f"sample. Lower the fraction (delete {out} to start again)")
        rate = max(found / len(entries), 1 / len(entries))
        extra = math.ceil(max(fraction * config.n / rate - len(entries), config.batch) * 1.1)
        first, n_batches = n_batches, min(limit, n_batches + math.ceil(extra / config.batch))
    if rank != 0:
        return None
    return _finalize(model, out, config, entries, classes, present, {**(source or {}), "producer": producer})


def _finalize(model, out: Path, config: GenerationConfig, entries: list[dict], classes: list[str], present: int,
              source: dict) -> Path:
    chosen, _ = _quota_selection(entries, config, classes, present)
    chosen_set = set(chosen)
    selected = [e for e in entries if e["index"] in chosen_set]
    scores = filter_scores(selected, config.filter_by)
    n_drop = int(math.floor(config.filter_top * len(selected)))
    order = sorted(range(len(selected)), key=lambda i: (-scores[i], selected[i]["index"]))
    dropped = {selected[i]["index"] for i in order[:n_drop]}

    score_of = {e["index"]: round(float(s), 6) for e, s in zip(selected, scores)}
    manifest = []
    for e in entries:
        if e["index"] not in chosen_set:
            # Not chosen: turned down by a class quota, or (no quota) past n in the last batch.
            status = "rejected" if config.min_class_fraction else "surplus"
        else:
            status = "filtered" if e["index"] in dropped else "kept"
        row = {"index": e["index"], "name": e["name"], "seed": config.seed, "truncation": config.truncation,
               "latent": {"z": "latents_for_seeds(seed, [index])", "truncation_psi": config.truncation},
               "uncertainty": e["scores"], "status": status}
        if e["index"] in score_of:
            row["filter_score"] = score_of[e["index"]]
        manifest.append(row)

    files = file_card(model)  # which per-sample files there are
    for e in entries:
        if e["index"] in dropped and config.keep_filtered:
            for f in sample_files(out, files, e["name"]):
                if f.exists():
                    dest = out / "filtered" / f.parent.name / f.name
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(f, dest)
        elif e["index"] not in chosen_set or e["index"] in dropped:
            for f in sample_files(out, files, e["name"]):
                f.unlink(missing_ok=True)

    kept = [e for e in selected if e["index"] not in dropped]
    card = _card(model, config, kept, manifest, classes, present, source)
    for task in card_tasks(card):
        if task.dataset_file:
            task.write_dataset_file(out, card, [(e["name"], (model.label_size,) * 2, e[task.sample_key]) for e in kept])
    if config.fmt == "webdataset":
        _pack_shards(out, model, kept, config.shard_size)
    atomic_write_bytes(out / "manifest.jsonl", "".join(json.dumps(r) + "\n" for r in manifest).encode())
    shutil.rmtree(out / PROGRESS_DIR)
    atomic_write_json(out / "dataset.json", card.to_json())
    return out


def _card(model, config: GenerationConfig, kept: list[dict], manifest: list[dict], classes: list[str], present: int,
          source: dict) -> DatasetCard:
    counts = {s: sum(r["status"] == s for r in manifest) for s in ("kept", "filtered", "rejected", "surplus")}
    candidates = counts["kept"] + counts["filtered"] + counts["rejected"]
    stats: dict = {"counts": counts, "acceptance_rate": (counts["kept"] + counts["filtered"]) / candidates}
    if classes:
        pixels = np.array([e["class_pixels"] for e in kept], np.float64)
        stats["class_pixel_share"] = dict(zip(classes, (pixels.sum(0) / max(pixels.sum(), 1)).round(6).tolist()))
        stats["class_image_share"] = dict(zip(classes, (pixels >= present).mean(0).round(6).tolist()))
    lg_source = {"generation": dataclasses.asdict(config), "label_generator": source.get("label_generator"),
                 "generator": model.generator_ref, "producer": source.get("producer"), "statistics": stats}
    labels = source.get("labels_card")
    labels = None if labels is None else DatasetCard.from_json(labels, source.get("label_generator"))
    return dataclasses.replace(file_card(model, labels), source={"generated_by": "handsoff generate", **lg_source})


def _pack_shards(out: Path, model, kept: list[dict], shard_size: int) -> None:
    """Move the kept samples' files into tar shards, then remove the per-sample folders."""
    card = file_card(model)
    for trash in out.glob(".*.trash"):
        shutil.rmtree(trash)
    if not (out / "images").exists():  # packed before a kill: the shards are complete
        return
    indexes = {t.name: {e["name"]: np.asarray(e[t.sample_key], np.float32) for e in kept}
               for t in card_tasks(card) if t.dataset_file}                 # labels kept in the batch records
    for s in range(0, len(kept), shard_size):
        samples = []
        for e in kept[s:s + shard_size]:
            name = e["name"]
            image = read_image(out / "images" / f"{name}.png")
            samples.append((name, {"image": image, **read_sample_labels(out, card, name, image.shape[:2],
                                                                        f"{name}.png", indexes)}))
        write_webdataset(out / f"shard-{s // shard_size:05d}.tar", samples)
    for folder in ["images"] + [t.folder for t in card_tasks(card) if t.folder]:
        if (out / folder).exists():  # rename first, so that a kill never leaves a half-deleted folder
            trash = out / f".{folder}.trash"
            os.replace(out / folder, trash)
            shutil.rmtree(trash)


def label_generator_source(path: str | os.PathLike) -> dict:
    """What a generated dataset takes from its label generator folder: its path and the card of the labeled data
    it was fitted on (colours, skeleton, flip pairs, depth unit: so the generated dataset's card is complete)."""
    path = Path(path)
    return {"label_generator": str(path),
            "labels_card": json.loads((path / "config.json").read_text()).get("metadata", {}).get("labels_card")}

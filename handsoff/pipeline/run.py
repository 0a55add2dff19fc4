"""One HandsOff run, every stage, from a ``PipelineConfig``: invert -> fit -> generate -> train -> evaluate.

Layout of ``config.out`` (each stage resumes or is skipped when its output is complete, so rerunning the same
command after a kill continues where it stopped)::

    config.json                 the validated config the run was started with (a rerun must match it)
    inputs.json                 fingerprints of the generator and the datasets it used (a rerun must match them)
    labeled-mirrored/           the labeled images and their mirrors (only with label_generator.mirror)
    inversion/latents.safetensors (+ .json figures, .png real | encoder | refined)
    label_generator/            the fitted label generator (what `handsoff generate` accepts) + preview.png
    dataset/                    the generated labeled dataset (standard layout, manifest.jsonl, dataset.json)
    downstream/handsoff/        the network trained on the generated dataset
    downstream/handsoff-N/      the same network on the first N kept generated images (config.curve)
    downstream/transfer/        the same network on the labeled real images alone (config.transfer)
    downstream/oracle/          the same network on config.oracle (optional)
    results.json                metrics per method on config.test, stage summaries, timings
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from handsoff.data.layout import DatasetError, LabeledFolder
from handsoff.errors import MissingInputError, OutputError, UsageError
from handsoff.fileio import atomic_write_json, fingerprint, folder_fingerprint, output_lock, require_same_run
from handsoff.pipeline.config import PipelineConfig
from handsoff.runtime import release_memory, resolve_device

METHODS = ("handsoff", "transfer", "oracle")
# What a run writes into config.out (see the layout above); other files there are left alone.
RUN_OUTPUTS = ("labeled-mirrored", "inversion", "label_generator", "dataset", "downstream", "curve", "results.json",
               "report.html")


@dataclass
class Stage:
    """One step of a run. ``run()`` writes ``output`` (a file or folder under the run's folder) from the outputs of
    the stages before it; ``complete()`` says whether ``output`` is finished (then the stage is skipped on a rerun).
    Each stage's ``complete`` is its module's own test (``inversion_complete``, ``label_generator_complete``,
    ``dataset_complete``, ...), the same one its command uses to resume."""

    name: str
    output: Path
    complete: Callable[[], bool]
    run: Callable[[], None]


def comparison(methods: dict[str, dict]) -> dict[str, dict]:
    """The methods compared in a run's table: all but the ``handsoff-N`` runs of the dataset-size curve."""
    return {k: v for k, v in methods.items() if not k.startswith("handsoff-")}


def _headline(metrics: dict) -> dict:
    """One method's entry in results.json: the flat headline metrics, IoU per class ("iou") and PCK per keypoint
    ("pck_per_keypoint"), so that a reader sees which parts each dataset teaches."""
    from handsoff.tasks import TASKS

    out = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
    for task in TASKS.values():
        out.update(task.breakdown(metrics))
    return out


def _subset(dataset: Path, out: Path, n: int) -> Path:
    """The first n samples of a generated dataset as a dataset of its own (files copied)."""
    from handsoff.data.layout import DatasetWriter

    if (out / "dataset.json").exists():
        return out
    folder = LabeledFolder(dataset)
    if n > len(folder):
        raise DatasetError(f"{dataset}: curve size {n} exceeds the {len(folder)} generated images")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    writer = DatasetWriter(tmp, folder.card)
    for name in folder.names[:n]:
        writer.add(name, **{k: v for k, v in folder.load(name).items() if k != "name"})
    writer.close()
    tmp.rename(out)
    return out


def check_inputs(config: PipelineConfig) -> None:
    """Fail before any work when a dataset or weights file is missing, or a dataset lacks a label the tasks need."""
    files = {"inversion.encoder": config.inversion.encoder, "inversion.lpips_vgg": config.inversion.lpips_vgg,
             "inversion.lpips_lin": config.inversion.lpips_lin,
             "downstream.backbone_weights": config.downstream.backbone_weights}
    for key, path in files.items():
        if path is not None and not Path(path).exists():
            raise MissingInputError(f"{path}: not found (config {key})")
    cards = {role: LabeledFolder(getattr(config, role)).card for role in ("labeled", "validation", "test", "oracle")
             if getattr(config, role) is not None}
    for role, card in cards.items():
        card.require(config.tasks, f"{getattr(config, role)} (the {role} dataset)")
    classes = cards["labeled"].classes or []
    unknown = [c for c in config.generation.min_class_fraction if c not in classes]
    if unknown:
        raise UsageError(f"config generation.min_class_fraction: {', '.join(unknown)} is not a class of "
                         f"{config.labeled} ({', '.join(classes)})")
    if config.transfer and config.validation is None:
        raise DatasetError("config: the transfer baseline needs a validation set (set validation, or transfer: "
                           "false); its training images cannot select its own checkpoint")


def run_pipeline(config: PipelineConfig, *, progress: bool = True, log=print) -> dict:
    """Run (or resume) every stage; returns the results written to ``config.out/results.json``.

    Everything that can be checked is checked before anything is written (datasets and their labels, weights
    files, the device, the generator); the run holds the lock on ``config.out`` while it works."""
    from handsoff.generator import load_networks

    out = Path(config.out)
    check_inputs(config)
    device = resolve_device(config.device)
    nets = load_networks(config.generator, device=device)  # a bad generator fails before anything is written
    with output_lock(out):
        return _run_stages(config, nets, device, progress, log)


def _run_stages(config: PipelineConfig, nets, device: torch.device, progress: bool, log) -> dict:
    from handsoff.downstream import evaluate_run, train_downstream
    from handsoff.downstream.train import has_model
    from handsoff.generation import GenerationConfig, dataset_complete, generate_dataset, label_generator_source
    from handsoff.inversion import build_perceptual, inversion_complete, invert_folder, load_encoder
    from handsoff.label_generator import fit_from_folder, label_generator_complete, load_label_generator

    out = Path(config.out)
    saved = out / "config.json"
    # The device is where the run executes, not what it computes: a run may resume on another device.
    if saved.exists():
        before = json.loads(saved.read_text())
        try:  # a setting added since the run started compares at its default (what the run used)
            before = PipelineConfig.model_validate(before).to_json()
        except ValueError:  # a setting since removed: compared as written, so the rerun is refused by name
            pass
        before["device"] = config.device
        now = config.to_json()
        if before != now:
            changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
            raise OutputError(f"{saved}: this folder holds a run with other settings ({', '.join(changed)}); "
                              "choose another out, or delete the folder to start fresh")
    elif clash := [name for name in RUN_OUTPUTS if (out / name).exists()]:
        raise OutputError(f"{out}: holds {', '.join(clash)} but no handsoff run (no config.json); handsoff will "
                          "not overwrite them, choose another out")
    # What the run's outputs depend on besides its settings: the generator's weights and every dataset's files.
    inputs = {"generator": fingerprint(nets.generator.state_dict()),
              **{role: folder_fingerprint(getattr(config, role)) for role in ("labeled", "validation", "test", "oracle")
                 if getattr(config, role) is not None}}
    inputs_path = out / "inputs.json"
    if inputs_path.exists():
        require_same_run(inputs_path, json.loads(inputs_path.read_text()), inputs, "run")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(saved, config.to_json())
    atomic_write_json(inputs_path, inputs)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    timings: dict[str, float] = results.get("timings", {})

    G = nets.generator
    latents = out / "inversion" / "latents.safetensors"
    lg_dir = out / "label_generator"
    dataset = out / "dataset"
    inv, lg, gen, ds = config.inversion, config.label_generator, config.generation, config.downstream
    methods = results.get("methods", {})
    # What the label generator learns from: the labeled images, or them and their mirrors (written once, small).
    fit_images = config.labeled
    if lg.mirror:
        from handsoff.data.dataset import write_mirrored_dataset

        fit_images = write_mirrored_dataset(config.labeled, out / "labeled-mirrored")

    def invert():
        perceptual = None if inv.perceptual == "none" else build_perceptual(inv.perceptual, nets.discriminator,
                                                                             inv.lpips_vgg, inv.lpips_lin)
        encoder = load_encoder(inv.encoder, device) if inv.encoder else None
        invert_folder(G, fit_images, latents, perceptual, encoder, progress=progress,
                      settings={"generator": config.generator, "encoder": str(inv.encoder) if inv.encoder else None},
                      steps=inv.steps, lr=inv.lr, lambda_perceptual=inv.lambda_perceptual, lambda_mse=inv.lambda_mse,
                      lambda_reg=inv.lambda_reg, batch=inv.batch, memory_gb=inv.memory_gb)

    def fit():
        torch.manual_seed(config.seed)
        fit_from_folder(G, latents, fit_images, lg_dir, tasks=list(config.tasks), label_size=lg.label_size,
                        members=lg.members, hidden=lg.hidden, hidden2=lg.hidden2, keypoint_sigma=lg.keypoint_sigma,
                        seed=config.seed, generator_ref=config.generator, progress=progress,
                        max_steps=lg.max_steps, min_steps=lg.min_steps, patience=lg.patience,
                        images_per_step=lg.images_per_step, pixels_per_image=lg.pixels, lr=lg.lr)

    def generate():
        model = load_label_generator(lg_dir, generator=G, device=device)
        generate_dataset(model, dataset, GenerationConfig(n=gen.n, seed=config.seed, truncation=gen.truncation,
                                                          filter_top=gen.filter_top, filter_by=gen.filter_by,
                                                          batch=gen.batch, fmt=gen.format,
                                                          keep_filtered=gen.keep_filtered,
                                                          min_class_fraction=gen.min_class_fraction,
                                                          label_precision=gen.label_precision,
                                                          void_top=gen.void_top),
                         progress=progress, source=label_generator_source(lg_dir))

    def downstream(method: str, train_dirs: list[Path], val_dir: Path, prepare=None, shares=None) -> Stage:
        """The downstream network of ``method``, trained on ``train_dirs`` (made by ``prepare()`` first, if given;
        drawn with ``shares``) and evaluated on the test set."""
        run_dir = out / "downstream" / method

        def train():
            if prepare is not None:
                prepare()
            train_downstream(train_dirs, val_dir, run_dir, tasks=list(config.tasks), backbone=ds.backbone,
                             backbone_weights=ds.backbone_weights, epochs=ds.epochs, batch_size=ds.batch, lr=ds.lr,
                             patience=ds.patience, size=ds.size, seed=config.seed,
                             images_per_epoch=ds.images_per_epoch, architecture=ds.architecture,
                             schedule=ds.schedule, device=str(device), shares=shares, progress=progress)
            if config.test is not None:
                methods[method] = _headline(evaluate_run(run_dir, config.test, device=str(device)))

        # With a test set, the stage is complete once its method is evaluated (results.json holds it).
        return Stage(f"downstream: {method}", run_dir, run=train,
                     complete=lambda: method in methods or (config.test is None and has_model(run_dir)))

    val = config.validation or config.labeled

    def handsoff_network(name: str, generated: Path, prepare=None) -> Stage:
        """HandsOff's network on ``generated``, with the labeled real images beside it if ``labeled_share`` > 0."""
        if ds.labeled_share == 0:  # the paper's protocol: generated images only
            return downstream(name, [generated], val, prepare)
        return downstream(name, [generated, config.labeled], val, prepare,
                          shares=[1 - ds.labeled_share, ds.labeled_share])

    stages = [Stage("inversion", latents, complete=lambda: inversion_complete(latents), run=invert),
              Stage("label generator", lg_dir, complete=lambda: label_generator_complete(lg_dir), run=fit),
              Stage("generation", dataset, complete=lambda: dataset_complete(dataset), run=generate),
              handsoff_network("handsoff", dataset)]
    for n in config.curve:  # the network on the first n generated images
        subset = out / "curve" / f"dataset-{n}"
        stages.append(handsoff_network(f"handsoff-{n}", subset, prepare=lambda n=n, subset=subset: _subset(
            dataset, subset, n)))
    if config.transfer:
        stages.append(downstream("transfer", [config.labeled], config.validation))
    if config.oracle is not None:
        stages.append(downstream("oracle", [config.oracle], config.validation or config.labeled))

    for stage in stages:
        if stage.complete():
            log(f"[{stage.name}] done earlier, skipped")
            continue
        log(f"[{stage.name}]")
        t0 = time.perf_counter()
        stage.run()
        release_memory()  # what the stage freed goes back to the kernel, so that the stages' peaks do not add up
        timings[stage.name] = round(time.perf_counter() - t0, 1)
        log(f"[{stage.name}] {timings[stage.name]:.0f} s")
        atomic_write_json(results_path, {**results, "methods": methods, "timings": timings})

    results = {
        "methods": methods,
        "settings": config.to_json(),
        "inversion": json.loads(latents.with_suffix(".json").read_text())["mean"],
        "label_generator": json.loads((lg_dir / "config.json").read_text())["metadata"]["fit"],
        "generation": json.loads((dataset / "dataset.json").read_text())["source"]["statistics"],
        "downstream_init": "ImageNet (local file)" if ds.backbone_weights else "random (no ImageNet weights given)",
        "timings": timings,
    }
    atomic_write_json(results_path, results)
    return results

"""Training and evaluating the downstream network: a plain, boring loop (torchvision reference-script style).

Data: one or more datasets in the standard layout (folders, or generated WebDataset shards), served by
``LabeledImageDataset`` with joint crop / flip augmentation. Losses per task: cross-entropy plus soft Dice (seg;
Dice weighs every class the same, so parts of a few pixels are learned early), MSE on Gaussian heatmaps (kp,
scaled by ``KEYPOINT_LOSS_WEIGHT``), MSE on normalized log depth (depth, valid pixels).
Adam (HandsOff: 1e-3 constant, batch 8, 20 epochs), by default with a one-cycle learning rate (warm-up over the
first 10% of steps, cosine decay to zero), which reaches a given accuracy with far fewer images seen; early
stopping: after each epoch the model is scored on the validation split (never the test split); the best epoch's
weights are kept; training stops after ``patience`` epochs without improvement. The run folder holds
``model.safetensors`` + ``config.json`` (the best epoch's weights and what rebuilds the network), ``state.pt``
(resumable: last epoch's weights, optimizer, schedule, history) and ``history.json``.

Devices: ``device`` is "auto" (CUDA when available), "cpu", "cuda" or "cuda:N"; the model and every batch live
there. On CUDA the forward pass runs in mixed precision (bf16 where the card supports it, else fp16 with loss
scaling); on CPU in float32 (bf16 autocast is far slower than fp32 on CPUs without AMX). A saved model loads on
any device.
"""

from __future__ import annotations

import json
import math
import os
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from handsoff import distributed
from handsoff.data.dataset import LabeledImageDataset
from handsoff.data.layout import DatasetError
from handsoff.downstream.model import DenseModel
from handsoff.errors import MissingInputError, OutputError, UsageError
from handsoff.fileio import atomic_save, read_weights_folder, require_same_run, save_weights_folder
from handsoff.runtime import require_finite, resolve_device
from handsoff.tasks import KEYPOINT_SIGMA, TASKS, Task, task_from_config, tasks_from_card
from handsoff.tasks.depth import NORMALIZATION_SAMPLES

MODEL_FORMAT = "handsoff-downstream"  # config.json's "format" of a run folder's model
SCHEDULES = ("onecycle", "constant")


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The mixed-precision dtype for ``device``: bf16 or fp16 on CUDA, None (float32) elsewhere."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Mixed precision in ``dtype`` on ``device`` (see ``autocast_dtype``), or a no-op for None (float32)."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def require_same_labels(card, tasks: list[Task], where, reference: str) -> None:
    """Raise DatasetError naming ``where`` unless its card has labels for ``tasks`` with the same class and keypoint
    names (``reference`` says whose they are): every dataset a network trains, selects or is scored on must be
    labeled the same way."""
    card.require([t.name for t in tasks], where)
    for t in tasks:
        theirs = t.names_in(card)
        if t.label_names is not None and theirs != t.label_names:
            key = t.card_field.replace("_", " ")
            raise DatasetError(f"{where}: its {key} {theirs} are not {reference}'s {t.label_names}; every dataset "
                               "must be labeled the same way (remap with a mapping)")


def model_tasks(config: dict) -> list[Task]:
    """The tasks a saved downstream model predicts, with their fitted values. Models saved before tasks saved
    their own configs stored classes, keypoint names, sigma and depth normalization separately."""
    if "task_configs" in config:
        return [task_from_config(c) for c in config["task_configs"]]
    return [TASKS[name].from_legacy_config(config) for name in config.get("tasks", [])]


def one_cycle(step: int, total: int, warmup: float = 0.1) -> float:
    """Learning-rate factor at optimizer step ``step`` of ``total``: linear warm-up over the first ``warmup``
    share of the steps, then cosine decay to 0 at ``total``."""
    warm = max(1, round(warmup * total))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def collate(samples: list[dict]) -> dict:
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0] if key != "name"}


def task_losses(outputs: dict, batch: dict, tasks: list[Task]) -> dict[str, torch.Tensor]:
    return {t.name: t.downstream_loss(outputs[t.name], batch) for t in tasks}


@torch.no_grad()
def evaluate_model(model: DenseModel, dataset, tasks: list[Task], batch_size: int = 32) -> dict:
    """Metrics of ``model`` (on whatever device it lives) on a dataset, from each task's ``metric_result``: seg
    mIoU and IoU per class, kp PCK@0.1/0.05/0.02 overall and per keypoint, depth MSE/RMSE/RMSE-log/nMSE."""
    model.eval()
    device = next(model.parameters()).device
    dtype = autocast_dtype(device)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    states: dict = {t.name: None for t in tasks}
    for batch in loader:
        with autocast(device, dtype):
            out = model(batch["image"].to(device))
        for t in tasks:
            states[t.name] = t.metric_update(states[t.name], out[t.name].float().cpu(), batch)
    result = {}
    for t in tasks:
        if states[t.name] is not None:  # image size from the last batch (every image of a dataset shares it)
            result.update(t.metric_result(states[t.name], batch["image"].shape[-1]))
    return result


def selection_score(metrics: dict) -> float:
    """Higher is better: mean of the available headline metrics (mIoU, PCK@0.1, 1 - min(nMSE, 1))."""
    parts = [metrics[k] for k in ("miou", "pck@0.1") if k in metrics and not math.isnan(metrics[k])]
    if "depth_nmse" in metrics and not math.isnan(metrics["depth_nmse"]):
        parts.append(1 - min(metrics["depth_nmse"], 1.0))
    return float(np.mean(parts)) if parts else float("-inf")


def _training_samples(datasets, per_dataset: int = NORMALIZATION_SAMPLES):
    """The first ``per_dataset`` samples of each dataset, read lazily (only tasks that fit on labels read them)."""
    for ds in datasets:
        for i in range(min(len(ds), per_dataset)):
            yield ds.folder.load(ds.folder.names[i]) if hasattr(ds, "folder") else ds[i]


def epoch_sampler(sizes: list[int], n: int, shares: list[float] | None, generator: torch.Generator):
    """The ``n`` indices of one epoch into the concatenation of datasets of ``sizes``: uniform over all images
    (``shares`` None; without replacement while they last), or each dataset's expected share of the epoch given by
    ``shares`` (fractions >= 0 summing to 1; with replacement: each image weighs its dataset's share / its size)."""
    if shares is None:
        return torch.utils.data.RandomSampler(range(sum(sizes)), num_samples=n, generator=generator)
    weights = torch.cat([torch.full((size,), share / size, dtype=torch.float64) for size, share in zip(sizes, shares)])
    return torch.utils.data.WeightedRandomSampler(weights, num_samples=n, generator=generator)


def train_downstream(train_dirs: list[str | os.PathLike], val_dir: str | os.PathLike, out: str | os.PathLike, *,
                     tasks: list[str], backbone: str = "resnet18", backbone_weights: str | None = None,
                     epochs: int = 20, batch_size: int = 8, lr: float = 1e-3, patience: int = 5,
                     size: int | None = None,
                     sigma: float = KEYPOINT_SIGMA, seed: int = 0, images_per_epoch: int | None = None,
                     architecture: str = "unet", schedule: str = "onecycle", device: str = "auto",
                     shares: list[float] | None = None, progress: bool = True) -> dict:
    """Train on the union of ``train_dirs``, select on ``val_dir``; resumable from ``out/state.pt``.

    ``shares``: the expected fraction of each epoch's images drawn from each of ``train_dirs`` (one number per
    folder, summing to 1), e.g. [0.75, 0.25] to give 16 labeled real images a quarter of the batches beside a
    thousand generated ones; default: every image of the union equally likely (shares proportional to sizes).

    ``architecture``: "unet" (full-resolution decoder) or "deeplabv3"; ``schedule``: "onecycle" or "constant"
    learning rate; ``device``: "auto", "cpu", "cuda", "cuda:N".

    Under ``torchrun`` (N workers, CPU or one GPU each) the same call trains data-parallel and computes what one
    worker computes: each worker takes 1/N of every batch of ``batch_size`` (which N must divide), batch norm and
    batch-level loss terms use the whole batch's statistics, gradients are averaged (DDP); worker 0 writes."""
    if schedule not in SCHEDULES:
        raise UsageError(f"unknown schedule {schedule!r}; choose from {', '.join(SCHEDULES)}")
    dev = resolve_device(device)
    if distributed.world_size() > 1 and dev.type == "cuda":  # one GPU per worker
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    rank, world = distributed.init(dev)
    if batch_size % world:
        raise UsageError(f"--batch {batch_size} must be a multiple of the {world} workers")
    if shares is not None:
        shares = [float(x) for x in shares]
        if len(shares) != len(train_dirs) or min(shares) < 0 or abs(sum(shares) - 1) > 1e-6:
            raise UsageError(f"shares {shares}: give one fraction >= 0 per training dataset ({len(train_dirs)}), "
                             "summing to 1")
    main_process = rank == 0
    out = Path(out)
    torch.manual_seed(seed)
    train_sets = [LabeledImageDataset(d, size=size, augment=True, seed=seed) for d in train_dirs]
    val_set = LabeledImageDataset(val_dir, size=size)
    card = train_sets[0].card
    card.require(tasks, train_dirs[0])
    task_objects = tasks_from_card(tasks, card, keypoint_sigma=sigma)
    for path, data in [*zip(train_dirs, train_sets), (val_dir, val_set)]:  # before any work
        require_same_labels(data.card, task_objects, path, str(train_dirs[0]))
    # What the run is: a resumed run must match it. The device may change (it says where, not what), and so may
    # epochs and patience (they say how long).
    identity = {"tasks": list(tasks), "train": [str(Path(d).resolve()) for d in train_dirs],
                "train_images": [len(d) for d in train_sets], "val": str(Path(val_dir).resolve()),
                "backbone": backbone, "backbone_weights": str(backbone_weights) if backbone_weights else None,
                "architecture": architecture, "batch_size": batch_size, "lr": lr,
                "schedule": schedule, "sigma": sigma, "size": size, "seed": seed, "images_per_epoch": images_per_epoch}
    if shares is not None:  # absent when unset, so that runs from before shares existed still resume
        identity["shares"] = shares
    state_path = out / "state.pt"
    state = torch.load(state_path, map_location=dev, weights_only=True) if state_path.exists() else None
    if state is not None and "identity" in state:  # states from before identities were recorded resume unchecked
        require_same_run(state_path, json.loads(state["identity"]), identity, "training")
    elif state is None and (clash := [f for f in ("model.safetensors", "model.pt", "history.json")
                                      if (out / f).exists()]):
        raise OutputError(f"{out}: holds {', '.join(clash)} but no state.pt of a handsoff training; handsoff will "
                          "not overwrite them, choose another --out")
    if main_process:
        out.mkdir(parents=True, exist_ok=True)
    for task in task_objects:
        task.fit(_training_samples(train_sets))
    heads = {t.name: t.out_channels for t in task_objects}
    model = DenseModel(backbone, heads, backbone_weights, architecture=architecture).to(dev)
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(distributed.global_batch_norm(model),
                                                        device_ids=[dev.index] if dev.type == "cuda" else None)
    # Fused Adam: one kernel over all parameters instead of one pass per elementwise op; on CPU it cut an optimizer
    # step of the ResNet-18 U-Net from 40 to 12 ms (12% of a batch-8 training step, one thread).
    opt = torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    train = torch.utils.data.ConcatDataset(train_sets)
    n = len(train) if images_per_epoch is None else images_per_epoch
    steps_per_epoch = n // batch_size if n >= batch_size else 1
    scheduler = (torch.optim.lr_scheduler.LambdaLR(opt, partial(one_cycle, total=epochs * steps_per_epoch))
                 if schedule == "onecycle" else None)
    dtype = autocast_dtype(dev)
    scaler = torch.amp.GradScaler(dev.type, enabled=dtype == torch.float16)
    history, best, start = [], -math.inf, 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        if scheduler is not None and state.get("scheduler"):
            scheduler.load_state_dict(state["scheduler"])
        history, best, start = state["history"], state["best"], state["epoch"]
        torch.set_rng_state(state["rng"].cpu())
    config = {**model.config, "tasks": tasks, "train": [str(d) for d in train_dirs], "val": str(val_dir),
              "epochs": epochs, "batch_size": batch_size, "lr": lr, "schedule": schedule, "sigma": sigma,
              "size": size, "shares": shares, "device": str(dev),
              "mixed_precision": str(dtype).removeprefix("torch.") if dtype else None,
              "classes": card.classes, "keypoint_names": card.keypoint_names,
              "task_configs": [t.config() for t in task_objects]}
    # A resumed run that had already stopped early stays stopped.
    stopped = bool(history) and history[-1]["epoch"] - max(history, key=lambda h: h["score"])["epoch"] >= patience
    for epoch in range(start, start if stopped else epochs):
        for ds in train_sets:
            ds.set_epoch(epoch)
        gen = torch.Generator().manual_seed(seed * 1000 + epoch)
        # A fixed number of images per epoch gives every dataset the same schedule (small ones are cycled).
        sampler = epoch_sampler([len(d) for d in train_sets], n, shares, gen)
        batches = distributed.WorkerBatches(sampler, batch_size, n >= batch_size, rank, world)
        loader = torch.utils.data.DataLoader(train, batch_sampler=batches, collate_fn=collate)
        model.train()
        sums: dict[str, float] = {}
        with tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", unit="batch",
                  disable=not progress or not main_process) as bar:
            for batch in bar:
                batch = to_device(batch, dev)
                with autocast(dev, dtype):
                    outputs = net(batch["image"])
                losses = task_losses({k: v.float() for k, v in outputs.items()}, batch, task_objects)
                loss = sum(losses.values())
                if dtype != torch.float16:  # fp16 loss scaling skips non-finite steps by design
                    require_finite(loss, f"{out}: epoch {epoch + 1}, step {bar.n + 1}", losses)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                if scheduler is not None:
                    scheduler.step()
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        metrics = evaluate_model(model, val_set, task_objects)  # every worker: same weights, same metrics
        score = selection_score(metrics)
        history.append({"epoch": epoch + 1, "images": n,
                        "train_loss": distributed.average({k: v / max(len(loader), 1) for k, v in sums.items()}),
                        "val": {k: v for k, v in metrics.items() if not isinstance(v, dict)}, "score": score})
        improved = score > best
        best = max(best, score)
        if main_process:
            if improved:
                save_weights_folder(out, model.state_dict(), {"format": MODEL_FORMAT, "version": 1, **config})
            atomic_save(state_path, lambda tmp: torch.save({
                "model": model.state_dict(), "opt": opt.state_dict(), "history": history, "best": best,
                "epoch": epoch + 1, "rng": torch.get_rng_state(), "identity": json.dumps(identity),
                "scheduler": scheduler.state_dict() if scheduler is not None else None}, tmp))
            atomic_save(out / "history.json", lambda tmp: tmp.write_text(json.dumps(history, indent=1)))
        distributed.barrier(world)
        best_epoch = max(history, key=lambda h: h["score"])["epoch"]
        if epoch + 1 - best_epoch >= patience:
            break
    return {"history": history, "best_score": best, "config": config}


def has_model(run_dir: str | os.PathLike) -> bool:
    """Whether a train-downstream run folder holds a trained model (either format)."""
    return any((Path(run_dir) / name).is_file() for name in ("model.safetensors", "model.pt"))


def load_downstream(path: str | os.PathLike, device: str = "cpu") -> tuple[DenseModel, dict]:
    """(model in eval mode on ``device``, its config) from a run folder (trained on any device). Folders of
    earlier versions hold a pickle-free ``model.pt`` instead (also accepted as a file path); models saved before
    the architecture option existed are DeepLabV3s."""
    path = Path(path)
    if path.is_dir() and (path / "model.safetensors").is_file():
        config, state = read_weights_folder(path, "a downstream model folder (train one with `handsoff "
                                                  "train-downstream`)")
    else:
        file = path / "model.pt" if path.is_dir() else path
        if not file.is_file():
            raise MissingInputError(f"{path}: no trained downstream model (run `handsoff train-downstream`)")
        saved = torch.load(file, map_location="cpu", weights_only=True)
        config, state = saved["config"], saved["model"]
    model = DenseModel(config["backbone"], config["heads"], architecture=config.get("architecture", "deeplabv3"))
    model.load_state_dict(state)
    return model.to(resolve_device(device)).eval(), config


def evaluate_run(model_dir: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike | None = None,
                 device: str = "auto") -> dict:
    """Evaluate a train-downstream run on a labeled dataset; writes the metrics JSON (default
    ``model_dir/metrics.json``) and returns the metrics."""
    from handsoff.fileio import atomic_write_json

    model, config = load_downstream(model_dir, device)
    dataset = LabeledImageDataset(data, size=config.get("size"))
    tasks = model_tasks(config)
    require_same_labels(dataset.card, tasks, data, "the model")
    metrics = evaluate_model(model, dataset, tasks)
    out = Path(out) if out else Path(model_dir) / "metrics.json"
    atomic_write_json(out, {"model": str(model_dir), "data": str(data), **metrics})
    return metrics

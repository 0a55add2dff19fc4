"""Fitting the label generator on inverted labeled images.

Each step draws ``images_per_step`` images and ``pixels_per_image`` label pixels of each, reads the generator's
features at those pixels through the factorized first layer, and sums the tasks' losses (every member sees the
same pixels; members differ by initialization, as in HandsOff). Generator features are computed once per image
and cached at native resolution (a few MB per image at 64 px; ``cache_gb`` bounds the cache, beyond which they
are recomputed per step), so memory is bounded by the native maps and the sampled pixels, never by C x L x L.

Early stopping follows HandsOff: stop when the (smoothed) training loss has not improved for ``patience``
steps, after ``min_steps``. The run directory holds ``state.pt`` (resumable) and ``log.jsonl``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from handsoff.fileio import atomic_save, check_model_folder, fingerprint, require_same_run
from handsoff.generator.trunk import Trunk
from handsoff.label_generator.model import LabelGenerator, feature_bytes_per_image
from handsoff.runtime import require_finite
from handsoff.tasks import KEYPOINT_SIGMA, TASKS, tasks_from_card

STATE_FILE = "state.pt"


class PixelData:
    """Per-image latents, prepared per-task targets and (cached) generator features for training."""

    def __init__(self, model: LabelGenerator, ws: torch.Tensor, samples: list[dict], cache_gb: float = 4.0):
        self.model, self.ws, self.samples = model, ws, samples
        size = model.label_size
        for task in model.tasks:
            task.fit(iter(samples))
        self.targets = [{t.name: t.prepare(s, size) for t in model.tasks} for s in samples]
        self.cache = len(samples) * feature_bytes_per_image(model.G) / 2**30 <= cache_gb
        self._features: list[list[torch.Tensor]] | None = None
        if self.cache:
            self._features = [[f.float() for f in model.features(ws[i:i + 1])[1]] for i in range(len(ws))]

    def features(self, indices: list[int]) -> list[torch.Tensor]:
        if self._features is not None:
            return [torch.cat([self._features[i][j] for i in indices]) for j in range(len(self._features[0]))]
        return [f.float() for f in self.model.features(self.ws[indices])[1]]


def training_loss(model: LabelGenerator, data: PixelData, indices: list[int], pixel_indices: torch.Tensor
                  ) -> tuple[torch.Tensor, dict[str, float]]:
    """Summed task losses at label pixels ``pixel_indices`` (B, P) of images ``indices``."""
    from handsoff.label_generator.features import pixel_points

    size = model.label_size
    out = model.outputs_at(data.features(indices), pixel_points(pixel_indices, size))  # (B, P, M, O)
    out = out.reshape(-1, *out.shape[2:])                                           # (B * P, M, O)
    total, parts = 0.0, {}
    for task in model.tasks:
        sl = model.slices[task.name]
        targets = torch.cat([task.targets(data.targets[i][task.name], pixel_indices[k], size)
                             for k, i in enumerate(indices)])
        outputs = out[..., sl]
        loss = task.loss(outputs, targets)
        parts[task.name] = float(loss.detach())
        total = total + loss
    return total, parts


def run_identity(model: LabelGenerator, ws: torch.Tensor, samples: list[dict], **settings) -> dict:
    """What a fit depends on: the model's shape and tasks, the settings that shape its steps, and fingerprints of
    the latents, the labels and the generator. A resumed fit must match it (``max_steps``, ``min_steps`` and
    ``patience`` may change: they only say when to stop)."""
    labels = {f"{i}/{key}": torch.from_numpy(np.array(value))  # a copy: arrays may be read-only
              for i, sample in enumerate(samples) for key, value in sample.items() if key != "name"}
    config = {k: v for k, v in model.config().items() if k != "generator"}  # the path may be spelled differently
    config["tasks"] = [{k: v for k, v in task.items() if k not in TASKS[task["name"]].fitted}
                       for task in config["tasks"]]
    return {**json.loads(json.dumps(config)), **settings, "latents": fingerprint({"ws": ws}),
            "labels": fingerprint(labels), "generator": fingerprint(model.G.state_dict())}


def fit_label_generator(model: LabelGenerator, ws: torch.Tensor, samples: list[dict], out_dir: str | Path, *,
                        max_steps: int = 3000, min_steps: int = 300, patience: int = 200,
                        images_per_step: int = 4, pixels_per_image: int = 1024, lr: float = 1e-3, seed: int = 0,
                        checkpoint_every: int = 250, cache_gb: float = 4.0, progress: bool = True) -> dict:
    """Train the ensemble of ``model`` on (ws[i], samples[i]) pairs; resumes from ``out_dir/state.pt``.

    Returns a summary: steps run, final smoothed loss per task, constant-prediction losses, stop reason.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    # Before any work (the features below take a while): the inputs a resumed fit must share with its start.
    identity = run_identity(model, ws, samples, seed=seed, images_per_step=images_per_step,
                            pixels_per_image=pixels_per_image, lr=lr)
    state_path = out_dir / STATE_FILE
    state = torch.load(state_path, weights_only=True) if state_path.exists() else None
    if state is not None and "identity" in state:  # states from before identities were recorded resume unchecked
        require_same_run(state_path, json.loads(state["identity"]), identity, "fit")
    data = PixelData(model, ws, samples, cache_gb)
    size, n = model.label_size, len(samples)
    pixels_per_image = min(pixels_per_image, size * size)
    opt = torch.optim.Adam(model.ensemble.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    step, best, since_best, smoothed = 0, math.inf, 0, None
    log: list[dict] = []
    if state is not None:
        model.ensemble.load_state_dict(state["ensemble"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        step, best, since_best, smoothed = state["step"], state["best"], state["since_best"], state["smoothed"]
        log = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()
               if line.strip()][:step] if (out_dir / "log.jsonl").exists() else []
    # Constant-prediction losses on a sample of pixels: the bar a useful model must clear.
    probe_idx = torch.randint(0, size * size, (min(n, 16), pixels_per_image), generator=torch.Generator()
                              .manual_seed(seed + 1))
    baselines = {t.name: t.constant_loss(torch.cat([t.targets(data.targets[i][t.name], probe_idx[k], size)
                                                    for k, i in enumerate(range(min(n, 16)))]))
                 for t in model.tasks}
    model.ensemble.train()
    reason = "max_steps"
    with tqdm(total=max_steps, initial=step, desc="fitting label generator", unit="step",
              disable=not progress) as bar:
        while step < max_steps:
            indices = torch.randperm(n, generator=gen)[:min(images_per_step, n)].tolist()
            pixel_idx = torch.randint(0, size * size, (len(indices), pixels_per_image), generator=gen)
            loss, parts = training_loss(model, data, indices, pixel_idx)
            require_finite(loss, f"{out_dir}: step {step + 1}", parts)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            value = float(loss.detach())
            smoothed = value if smoothed is None else 0.95 * smoothed + 0.05 * value
            if smoothed < best * (1 - 1e-3):
                best, since_best = smoothed, 0
            else:
                since_best += 1
            log.append({"step": step, "loss": value, **parts})
            bar.update(1)
            bar.set_postfix(loss=f"{smoothed:.4f}")
            stop = step >= min_steps and since_best >= patience
            if step % checkpoint_every == 0 or stop or step >= max_steps:
                state = {"ensemble": model.ensemble.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
                         "identity": json.dumps(identity), "step": step, "best": best, "since_best": since_best,
                         "smoothed": smoothed}
                atomic_save(out_dir / "log.jsonl",
                            lambda tmp: tmp.write_text("".join(json.dumps(e) + "\n" for e in log)))
                atomic_save(state_path, lambda tmp: torch.save(state, tmp))
            if stop:
                reason = f"no improvement for {patience} steps"
                break
    model.eval()
    recent = log[-50:]
    final = {t.name: float(np.mean([e[t.name] for e in recent])) for t in model.tasks} if recent else {}
    summary = {"steps": step, "stop_reason": reason, "final_loss": final, "constant_loss": baselines,
               "images": n, "pixels_per_step": images_per_step * pixels_per_image}
    for task in model.tasks:
        summary.update(task.calibrate(model, ws, [t[task.name] for t in data.targets]) or {})
    return summary


def label_generator_complete(out_dir: str | os.PathLike) -> bool:
    """Whether ``fit_from_folder`` finished ``out_dir`` (its preview.png is written after the model)."""
    return (Path(out_dir) / "preview.png").is_file()


def square_sample(sample: dict, size: int, tasks: list) -> dict:
    """A labeled sample of any shape at the label size: image (size, size, 3) (Lanczos) and each task's label
    resized by the task (nearest neighbour for masks and depth, keypoints scaled), as the image is when inverted."""
    image = sample["image"]
    if image.shape[:2] == (size, size):
        return sample
    from PIL import Image

    out = {**sample, "image": np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.LANCZOS))}
    for task in tasks:
        out[task.sample_key] = task.resize_label(sample[task.sample_key], image.shape[:2], size)
    return out


def fit_from_folder(G: Trunk, latents: str | Path, labels: str | Path, out_dir: str | Path, *, tasks: list[str],
                    label_size: int | None = None, members: int = 10, hidden: int = 256, hidden2: int = 32,
                    keypoint_sigma: float = KEYPOINT_SIGMA, seed: int = 0, generator_ref: str | None = None,
                    progress: bool = True, **fit_options) -> tuple[LabelGenerator, dict]:
    """Fit a label generator on a latents file (from inversion) and the labeled dataset it was inverted from.

    Latent keys must be image names of ``labels`` (standard layout); labeled images without a latent are left out
    and counted in the summary. Saves the model to ``out_dir`` with its provenance and a ``preview.png`` (real
    labels next to the label generator's on each reconstruction). ``fit_options`` go to ``fit_label_generator``.
    Returns (model in eval mode, fit summary).
    """
    import time

    check_model_folder(out_dir, "handsoff-label-generator")  # before any work: never into another model's folder

    from handsoff.data.layout import DatasetError, LabeledFolder, default_color
    from handsoff.inversion import load_latents
    from handsoff.label_generator.model import prediction_sample, save_label_generator
    from handsoff.visualize import label_panels, save_image_atomic, strip_sheet

    device = G.w_avg.device
    names, ws, latent_meta = load_latents(latents)
    if ws.shape[1:] != (G.n_latent, G.w_dim):
        raise DatasetError(f"{latents}: latents are {tuple(ws.shape[1:])}, the generator needs "
                           f"({G.n_latent}, {G.w_dim})")
    folder = LabeledFolder(labels)
    missing = [n for n in names if n not in folder.image_paths]
    if missing:
        raise DatasetError(f"{labels}: no labeled image for latents {', '.join(missing[:5])}"
                           f"{' ...' if len(missing) > 5 else ''} (latent keys must be the image names)")
    samples = [folder.load(n) for n in names]
    size = label_size or max(samples[0]["image"].shape[:2])  # the labels' own resolution (longer side)
    try:
        task_objects = tasks_from_card(tasks, folder.card, keypoint_sigma=keypoint_sigma)
    except ValueError as e:
        raise DatasetError(f"{labels}: {e}") from None
    samples = [square_sample(s, size, task_objects) for s in samples]
    torch.manual_seed(seed)
    model = LabelGenerator(G, task_objects, size, members=members, hidden=hidden, hidden2=hidden2,
                           generator_ref=generator_ref).to(device)
    t0 = time.perf_counter()
    summary = fit_label_generator(model, ws.to(device), samples, out_dir, seed=seed, progress=progress,
                                  **fit_options)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    summary["unused_labeled_images"] = len(set(folder.names) - set(names))
    save_label_generator(model, out_dir, metadata={"latents": str(latents), "labels": str(labels),
                                                   "inversion": latent_meta, "fit": summary,
                                                   "labels_card": folder.card.to_json()})
    colors = folder.card.colors or [default_color(i) for i in range(len(folder.card.classes or []))]
    n = min(8, len(names))
    result = model.predict(ws[:n].to(device))
    strips = []
    for i in range(n):
        real = {k: v for k, v in samples[i].items() if k != "name"}
        strips += [label_panels(real, colors), label_panels(prediction_sample(result, i), colors)]
    save_image_atomic(strip_sheet(strips, columns=2), Path(out_dir) / "preview.png")
    return model, summary

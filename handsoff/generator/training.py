"""StyleGAN2 training (Karras et al., CVPR 2020) with ADA (NeurIPS 2020), as one plain loop.

Losses: non-saturating logistic for G and D; lazy R1 on reals every ``r1_interval`` steps; optional lazy
path-length regularization every ``pl_interval`` steps; style mixing; an exponential moving average of G
(the network that is exported and sampled); adaptive differentiable augmentation in front of D
(``handsoff.generator.augment``); reduced precision in the highest resolutions (bf16 on CPU, fp16 on CUDA)
with float32 master weights; gradient accumulation.

A run directory holds:
    training.json         the config (a resumed run must match it)
    state/                everything needed to continue: G, D, G_ema, optimizers, counters, RNG state, as
                          networks / opt_G / opt_D .safetensors (each under 16 MiB for the shipped 64 px run)
                          and state.json (the rest); replaced whole at each snapshot. Runs of earlier versions
                          hold state.pt (torch.save) instead, read once and replaced by state/.
    network-NNNNNNNN/      exported snapshots (G_ema + D) in the handsoff checkpoint format
    samples/fakes-NNNNNNNN.png, reals.png   fixed-latent sample grids
    log.jsonl             one line per tick: images seen, losses, augmentation p, images/s

Run the same command again after a kill and it continues from ``state/``; the data order, latents, noise and
augmentation come from seeded generators whose state is saved, so a resumed run retraces the uninterrupted one
(up to nondeterminism of the compute kernels).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from handsoff.data.images import ImageFolder
from handsoff.errors import UsageError
from handsoff.fileio import atomic_folder, atomic_save
from handsoff.generator.augment import AdaptiveAugmentation, augment
from handsoff.generator.checkpoints import save_networks
from handsoff.generator.networks import Discriminator, Generator
from handsoff.generator.sampling import latents_for_seeds
from handsoff.runtime import bf16_speedup, reduced_precision_pays, resolve_device

STATE_DIR = "state"
LEGACY_STATE_FILE = "state.pt"
_OWN_FILE = ("opt_G", "opt_D")  # state keys saved in a file of their own; everything else goes to "networks"
CONFIG_FILE = "training.json"
LOG_FILE = "log.jsonl"

# Config keys that may change when a run is resumed (how long, how often to report, where and in which arithmetic it
# runs), unlike the model or the losses. Precision is here because weights and optimizer states are float32 in
# every mode, and the fast mode is machine-specific: bf16 is emulated on CPUs without AVX512-BF16 / AMX (measured
# on an AVX2-only AMD EPYC: a mixed-precision step about 30x slower than float32), so a run moved to such a
# machine must be able to continue in float32.
# The learning rate is here so that a run that has plateaued can continue at a lower rate (the optimizers'
# saved moments are kept; only their step size changes, see `_set_learning_rates`).
RESUMABLE_CHANGES = {"data", "out", "total_images", "tick_images", "snapshot_images", "device", "progress",
                     "batch_per_round", "precision", "num_fp16_res", "lr"}
# Of those, what changes the arithmetic of the steps to come: a resumed run says when one differs.
ARITHMETIC_CHANGES = ("lr", "precision", "num_fp16_res", "batch_per_round", "device")


class TrainingError(UsageError):
    """A run that cannot start or resume as asked; the message names the file and what is wrong."""


@dataclass
class TrainingConfig:
    """Everything that defines a training run; saved as ``training.json``.

    Network: resolution, z_dim, w_dim, n_mlp, channel_base, channel_max (as ``Generator``); the discriminator
    uses the same channel_base / channel_max.
    Optimization: batch (images per step), batch_per_round (split each step into rounds for gradient
    accumulation; None = batch), lr, betas, r1_gamma (None = NVIDIA's heuristic 0.0002 * R^2 / batch),
    r1_interval, pl_weight (0 = off), pl_interval, style_mixing, ema_images (half-life of the G average, in
    images; None = 10 * batch / 32 thousand), ema_rampup.
    Augmentation: augment 'ada' (adaptive p toward ada_target), 'fixed' (p = augment_p) or 'none'.
    Start: init_from, a run folder whose state this (new) run starts from, widened to this config's channel_base
    / channel_max (``handsoff.generator.widening``: the wider networks compute what the source's did; training
    continues from its images seen, optimizer moments and augmentation p); used only when ``out`` has no state.
    Precision: 'mixed' runs the num_fp16_res highest resolutions of G and D in bf16 (CPU) / fp16 (CUDA, with
    conv_clamp 256); 'fp32' runs everything in float32; 'auto' (default) is 'mixed' on CUDA and, on a CPU, only
    where bf16 measures faster than float32 there (``runtime.reduced_precision_pays``), else 'fp32'.
    """

    data: str
    out: str
    resolution: int = 64
    z_dim: int = 128
    w_dim: int = 128
    n_mlp: int = 4
    channel_base: int = 2048
    channel_max: int = 128
    mapping_lr_mul: float = 0.01
    batch: int = 32
    batch_per_round: int | None = None
    total_images: int = 200_000
    lr: float = 0.0025
    betas: tuple[float, float] = (0.0, 0.99)
    r1_gamma: float | None = None
    r1_interval: int = 16
    pl_weight: float = 0.0
    pl_interval: int = 4
    pl_decay: float = 0.01
    style_mixing: float = 0.9
    ema_images: int | None = None
    ema_rampup: float | None = 0.05
    augment: str = "ada"
    augment_p: float = 0.0
    ada_target: float = 0.6
    ada_interval: int = 4
    ada_speed_images: int = 100_000
    precision: str = "auto"
    num_fp16_res: int = 4
    seed: int = 0
    device: str = "auto"
    tick_images: int = 4_000
    snapshot_images: int = 20_000
    grid_size: int = 32
    progress: bool = True
    init_from: str | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.betas = tuple(self.betas)
        if self.augment not in ("ada", "fixed", "none"):
            raise TrainingError(f"augment must be 'ada', 'fixed' or 'none', got {self.augment!r}")
        if self.precision not in ("auto", "mixed", "fp32"):
            raise TrainingError(f"precision must be 'auto', 'mixed' or 'fp32', got {self.precision!r}")
        per_round = self.batch_per_round or self.batch
        if self.batch % per_round:
            raise TrainingError(f"batch {self.batch} is not a multiple of batch_per_round {per_round}")
        if per_round % 4 and per_round > 4:
            raise TrainingError(f"batch_per_round {per_round} must be a multiple of 4 (the minibatch-std group)")

    @property
    def gamma(self) -> float:
        return self.r1_gamma if self.r1_gamma is not None else 0.0002 * self.resolution**2 / self.batch

    def mixed_precision(self, device: torch.device) -> bool:
        """'mixed' always, 'fp32' never, 'auto' where reduced precision is measured to pay on ``device``
        (``runtime.reduced_precision_pays``: CUDA, or a CPU whose bf16 is faster than its float32)."""
        return self.precision == "mixed" or (self.precision == "auto" and reduced_precision_pays(device))

    def network_kwargs(self, device: torch.device) -> tuple[dict, dict]:
        mixed = self.mixed_precision(device)
        precision = dict(num_fp16_res=self.num_fp16_res if mixed else 0,
                         conv_clamp=256.0 if mixed and device.type == "cuda" else None)
        g = dict(resolution=self.resolution, z_dim=self.z_dim, w_dim=self.w_dim, n_mlp=self.n_mlp,
                 channel_base=self.channel_base, channel_max=self.channel_max, mapping_lr_mul=self.mapping_lr_mul,
                 **precision)
        d = dict(resolution=self.resolution, channel_base=self.channel_base, channel_max=self.channel_max,
                 **precision)
        return g, d


def data_indices(n_items: int, seed: int, start: int, count: int) -> np.ndarray:
    """Positions start .. start+count-1 of an endless stream of seeded per-epoch permutations of n_items."""
    out = []
    pos = start
    while len(out) < count:
        epoch, offset = divmod(pos, n_items)
        perm = np.random.default_rng([seed, epoch]).permutation(n_items)
        take = min(count - len(out), n_items - offset)
        out.extend(perm[offset:offset + take].tolist())
        pos += take
    return np.asarray(out)


@dataclass
class TrainingState:
    """The mutable state of a run (networks, optimizers, counters); saved whole in ``state/``."""

    G: Generator
    D: Discriminator
    G_ema: Generator
    opt_G: torch.optim.Optimizer
    opt_D: torch.optim.Optimizer
    ada: AdaptiveAugmentation
    step: int = 0
    images_seen: int = 0
    pl_mean: float = 0.0

    def state_dict(self) -> dict:
        return {"G": self.G.state_dict(), "D": self.D.state_dict(), "G_ema": self.G_ema.state_dict(),
                "opt_G": self.opt_G.state_dict(), "opt_D": self.opt_D.state_dict(), "augment_p": self.ada.p,
                "step": self.step, "images_seen": self.images_seen, "pl_mean": self.pl_mean,
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}

    def load_state_dict(self, state: dict) -> None:
        self.G.load_state_dict(state["G"])
        self.D.load_state_dict(state["D"])
        self.G_ema.load_state_dict(state["G_ema"])
        self.opt_G.load_state_dict(state["opt_G"])
        self.opt_D.load_state_dict(state["opt_D"])
        self.ada.p = float(state["augment_p"])
        self.step, self.images_seen, self.pl_mean = int(state["step"]), int(state["images_seen"]), \
            float(state["pl_mean"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])


def _lazy_ratio(interval: int | None) -> float:
    # Lazy regularization runs the regularizer every `interval` steps with its loss scaled up by `interval`;
    # the optimizer hyperparameters are corrected for the extra steps as in the StyleGAN2 paper (appendix C).
    return interval / (interval + 1) if interval else 1.0


def _lazy_adam(params, config: TrainingConfig, interval: int | None) -> torch.optim.Adam:
    c = _lazy_ratio(interval)
    return torch.optim.Adam(params, lr=config.lr * c, betas=(config.betas[0] ** c, config.betas[1] ** c), eps=1e-8)


def _lazy_intervals(config: TrainingConfig) -> tuple[int | None, int]:
    """How often G's (path length, if on) and D's (R1) lazy regularizers run."""
    return (config.pl_interval if config.pl_weight > 0 else None), config.r1_interval


def _set_learning_rates(state: TrainingState, config: TrainingConfig) -> None:
    """After loading optimizer states (which carry the saved rate), apply ``config.lr``, lazily corrected."""
    for opt, interval in zip((state.opt_G, state.opt_D), _lazy_intervals(config)):
        for group in opt.param_groups:
            group["lr"] = config.lr * _lazy_ratio(interval)


def build_state(config: TrainingConfig, device: torch.device) -> TrainingState:
    """Fresh networks (seeded) and optimizers for a run."""
    torch.manual_seed(config.seed)
    g_kwargs, d_kwargs = config.network_kwargs(device)
    G = Generator(**g_kwargs).to(device).train()
    D = Discriminator(**d_kwargs).to(device).train()
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    g_interval, d_interval = _lazy_intervals(config)
    opt_G = _lazy_adam(G.parameters(), config, g_interval)
    opt_D = _lazy_adam(D.parameters(), config, d_interval)
    target = config.ada_target if config.augment == "ada" else None
    p = config.augment_p if config.augment != "none" else 0.0
    ada = AdaptiveAugmentation(p=p, target=target, speed_images=config.ada_speed_images)
    return TrainingState(G, D, G_ema, opt_G, opt_D, ada)


def mapping_with_mixing(G: Generator, z: torch.Tensor, mixing_prob: float, w_avg_beta: float | None = 0.995):
    """W+ latents (B, n_latent, w_dim) for z, with style mixing: with probability ``mixing_prob`` a batch switches
    to the latent of a second z from a random layer on (one crossover per call, as in StyleGAN2's reference).
    Tracks G's average latent (used for truncation) when ``w_avg_beta`` is set."""
    ws = G.mapping(z)
    if w_avg_beta is not None:
        with torch.no_grad():
            G.mapping.w_avg.lerp_(ws[:, 0].mean(0).to(G.mapping.w_avg.dtype), 1 - w_avg_beta)
    if mixing_prob > 0:
        cutoff = int(torch.randint(1, G.n_latent, ()).item())
        if torch.rand(()).item() < mixing_prob:
            ws2 = G.mapping(torch.randn_like(z))
            ws = torch.cat([ws[:, :cutoff], ws2[:, cutoff:]], dim=1)
    return ws


def _discriminate(D: Discriminator, images: torch.Tensor, p: float) -> torch.Tensor:
    return D(augment(images, p)["images"] if p > 0 else images)


def _generate(G: Generator, batch: int, config: TrainingConfig, device) -> tuple[torch.Tensor, torch.Tensor]:
    z = torch.randn(batch, G.z_dim, device=device)
    ws = mapping_with_mixing(G, z, config.style_mixing)
    return G.synthesis(ws, noise_mode="random"), ws


def _clean_grads(module: torch.nn.Module) -> None:
    for p in module.parameters():
        if p.grad is not None:
            torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)


def train_step(state: TrainingState, reals: torch.Tensor, config: TrainingConfig) -> dict:
    """One optimization step on a batch of reals (B, 3, R, R) in [-1, 1]: G main (+ path length), D main (+ R1).

    Returns the step's scalar statistics (losses, regularizers where they ran).
    """
    G, D = state.G, state.D
    device = reals.device
    per_round = config.batch_per_round or config.batch
    rounds = [reals[i:i + per_round] for i in range(0, len(reals), per_round)]
    p = state.ada.p
    stats: dict[str, float] = {}

    # G main: make D call the fakes real.
    G.requires_grad_(True)
    D.requires_grad_(False)
    state.opt_G.zero_grad(set_to_none=True)
    loss_g = 0.0
    for real in rounds:
        fake, _ = _generate(G, len(real), config, device)
        loss = F.softplus(-_discriminate(D, fake, p)).mean()
        (loss / len(rounds)).backward()
        loss_g += float(loss.detach()) / len(rounds)
    _clean_grads(G)
    state.opt_G.step()
    stats["loss_G"] = loss_g

    # G path-length regularization (lazy): keep |J^T y| constant for random image-space directions y.
    if config.pl_weight > 0 and state.step % config.pl_interval == 0:
        state.opt_G.zero_grad(set_to_none=True)
        pl_total = 0.0
        for real in rounds:
            n = max(len(real) // 2, 1)
            fake, ws = _generate(G, n, config, device)
            noise = torch.randn_like(fake) / math.sqrt(fake.shape[2] * fake.shape[3])
            (grad,) = torch.autograd.grad((fake * noise).sum(), ws, create_graph=True)
            lengths = grad.square().sum(2).mean(1).sqrt()
            state.pl_mean += config.pl_decay * (float(lengths.detach().mean()) - state.pl_mean)
            penalty = (lengths - state.pl_mean).square().mean()
            (penalty * config.pl_weight * config.pl_interval / len(rounds)).backward()
            pl_total += float(penalty.detach()) / len(rounds)
        _clean_grads(G)
        state.opt_G.step()
        stats["pl_penalty"] = pl_total

    # D main: fakes fake, reals real.
    G.requires_grad_(False)
    D.requires_grad_(True)
    state.opt_D.zero_grad(set_to_none=True)
    loss_fake = loss_real = 0.0
    for real in rounds:
        with torch.no_grad():
            fake, _ = _generate(G, len(real), config, device)
        logits_fake = _discriminate(D, fake, p)
        logits_real = _discriminate(D, real, p)
        state.ada.accumulate(logits_real)
        lf, lr = F.softplus(logits_fake).mean(), F.softplus(-logits_real).mean()
        ((lf + lr) / len(rounds)).backward()
        loss_fake += float(lf.detach()) / len(rounds)
        loss_real += float(lr.detach()) / len(rounds)
    _clean_grads(D)
    state.opt_D.step()
    stats.update(loss_D_fake=loss_fake, loss_D_real=loss_real)

    # D R1 (lazy): penalize the gradient of D's output with respect to (augmented) reals.
    if config.gamma > 0 and state.step % config.r1_interval == 0:
        state.opt_D.zero_grad(set_to_none=True)
        r1_total = 0.0
        for real in rounds:
            real = real.detach().requires_grad_(True)
            logits = _discriminate(D, real, p)
            (grad,) = torch.autograd.grad(logits.sum(), real, create_graph=True)
            penalty = grad.square().sum(dim=(1, 2, 3)).mean()
            (penalty * (config.gamma / 2) * config.r1_interval / len(rounds)).backward()
            r1_total += float(penalty.detach()) / len(rounds)
        _clean_grads(D)
        state.opt_D.step()
        stats["r1_penalty"] = r1_total

    D.requires_grad_(False)
    update_ema(state, config)
    state.step += 1
    state.images_seen += len(reals)
    if config.augment == "ada" and state.step % config.ada_interval == 0:
        rt = state.ada.update(config.batch * config.ada_interval)
        if rt is not None:
            stats["ada_rt"] = rt
    return stats


@torch.no_grad()
def update_ema(state: TrainingState, config: TrainingConfig) -> None:
    """G_ema <- lerp(G, G_ema, beta) with a half-life of ``ema_images`` (ramped up over the first images)."""
    ema_images = config.ema_images if config.ema_images is not None else config.batch * 10 / 32 * 1000
    if config.ema_rampup is not None:
        ema_images = min(ema_images, (state.images_seen + config.batch) * config.ema_rampup)
    beta = 0.5 ** (config.batch / max(ema_images, 1e-8))
    for p_ema, p in zip(state.G_ema.parameters(), state.G.parameters()):
        p_ema.copy_(p.detach().lerp(p_ema, beta))
    for b_ema, b in zip(state.G_ema.buffers(), state.G.buffers()):
        b_ema.copy_(b)


def _images_name(images: int) -> str:
    return f"{images:08d}"


@torch.no_grad()
def save_sample_grid(G: Generator, path: Path, n: int, seed: int) -> Path:
    from handsoff.visualize import image_grid, save_image_atomic

    z = latents_for_seeds(seed, range(n), G.z_dim).to(G.w_avg.device)
    images = torch.cat([G(z[i:i + 16], noise_mode="const").cpu() for i in range(0, n, 16)])
    return save_image_atomic(image_grid(images, columns=int(math.ceil(math.sqrt(n)))), path)


def _config_json(config: TrainingConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _check_resume(run: Path, config: TrainingConfig) -> dict[str, tuple]:
    """Refuse to resume with another model or loss; returns the resumable settings that change, {key: (saved,
    now)}, so that the run can say what it continues with (e.g. a learning rate left at its default)."""
    saved = json.loads((run / CONFIG_FILE).read_text())
    mine = _config_json(config)
    changed = {k: (saved.get(k), mine.get(k)) for k in set(saved) | set(mine) if saved.get(k) != mine.get(k)}
    refused = {k: v for k, v in changed.items() if k not in RESUMABLE_CHANGES}
    if refused:
        details = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(refused.items()))
        raise TrainingError(f"{run / CONFIG_FILE}: cannot resume with a different training config ({details}); "
                            "use another --out, or the saved settings")
    return changed


def _truncate_log(path: Path, images_seen: int) -> None:
    """Drop log lines written after the state being resumed (they will be written again)."""
    if path.exists():
        keep = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line)["images_seen"] <= images_seen]
        atomic_save(path, lambda tmp: tmp.write_text("".join(line + "\n" for line in keep)))


def _encode(obj, key: str, tensors: dict) -> dict:
    """A JSON skeleton of a nested state (dicts keep non-string keys and order, tuples stay tuples); its tensors
    go to ``tensors`` under dotted keys."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().contiguous().clone()  # clone: safetensors refuses shared storage
        return {"tensor": key}
    if isinstance(obj, dict):
        return {"dict": [[k, _encode(v, f"{key}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {type(obj).__name__: [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]}
    return {"value": obj}


def _decode(node: dict, tensors: dict):
    (kind, value), = node.items()
    if kind == "tensor":
        return tensors[value]
    if kind == "dict":
        return {k: _decode(v, tensors) for k, v in value}
    if kind in ("list", "tuple"):
        items = [_decode(v, tensors) for v in value]
        return tuple(items) if kind == "tuple" else items
    return value


def save_training_state(state: dict, folder: Path) -> Path:
    """Write a ``TrainingState.state_dict()`` as ``folder/{networks,opt_G,opt_D}.safetensors`` + ``state.json``,
    replacing the folder whole (a kill leaves the previous state intact)."""
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        groups: dict[str, dict] = {}
        skeleton = {top: _encode(value, top, groups.setdefault(top if top in _OWN_FILE else "networks", {}))
                    for top, value in state.items()}
        for name, tensors in groups.items():
            save_file(tensors, tmp / f"{name}.safetensors")
        (tmp / "state.json").write_text(json.dumps({"format": "handsoff-gan-state", "version": 1,
                                                    "files": sorted(groups), "state": skeleton}))

    return atomic_folder(folder, write)


def load_training_state(folder: Path) -> dict:
    """The state dict written by ``save_training_state`` (tensors on CPU; loading into the modules and
    optimizers moves them to their device)."""
    from safetensors.torch import load_file

    meta = json.loads((folder / "state.json").read_text())
    tensors: dict = {}
    for name in meta["files"]:
        tensors.update(load_file(folder / f"{name}.safetensors"))
    return {top: _decode(node, tensors) for top, node in meta["state"].items()}


def has_state(run: Path) -> bool:
    return (run / STATE_DIR / "state.json").is_file() or (run / LEGACY_STATE_FILE).is_file()


def read_state(run: Path) -> dict:
    """A run's resumable state: ``state/``, or ``state.pt`` from earlier versions."""
    if (run / STATE_DIR / "state.json").is_file():
        return load_training_state(run / STATE_DIR)
    return torch.load(run / LEGACY_STATE_FILE, map_location="cpu", weights_only=True)


def save_snapshot(state: TrainingState, config: TrainingConfig, run: Path) -> Path:
    """Export G_ema + D as ``network-NNNNNNNN/`` (handsoff format), then replace ``state/`` whole."""
    metadata = {"training": {"images_seen": state.images_seen, "step": state.step, "augment_p": state.ada.p,
                             "data": config.data, "seed": config.seed}}
    G_ema = copy.deepcopy(state.G_ema).cpu()
    D = copy.deepcopy(state.D).cpu()
    # Exported networks run in float32 by default; users opt into reduced precision at load time.
    for net in (G_ema, D):
        net.config.update(num_fp16_res=0, conv_clamp=None)
    out = save_networks(run / f"network-{_images_name(state.images_seen)}", G_ema, D, metadata=metadata,
                        overwrite=True)
    save_training_state(state.state_dict(), run / STATE_DIR)
    (run / LEGACY_STATE_FILE).unlink(missing_ok=True)  # one copy of the state, in one format
    return out


def state_from_run(source: Path, state: TrainingState) -> dict:
    """``source``'s resumable state with its networks and optimizer moments widened to ``state``'s (freshly
    initialized, seeded) networks, whose values fill the new channels; counters, augmentation p and RNG states as
    saved. Equal shapes give the source's state unchanged."""
    from handsoff.generator.widening import widen_adam_state, widen_state_dict

    if not has_state(source):
        raise TrainingError(f"{source}: holds no {STATE_DIR}/ to start from (--init-from takes a train-gan run folder)")
    saved = read_state(source)
    widened = dict(saved)
    try:
        for net, kind in (("G", "generator"), ("G_ema", "generator"), ("D", "discriminator")):
            widened[net] = widen_state_dict(saved[net], getattr(state, net).state_dict(), kind)
    except ValueError as e:
        raise TrainingError(f"{source / STATE_DIR}: cannot start from this state: {e}") from None
    for opt, net in (("opt_G", "G"), ("opt_D", "D")):
        names = [name for name, _ in getattr(state, net).named_parameters()]
        widened[opt] = widen_adam_state(saved[opt], names, saved[net], widened[net])
    return widened


def train_gan(config: TrainingConfig) -> Path:
    """Train (or resume) a run in ``config.out`` up to ``config.total_images``; returns the path of the network
    exported at the run's last state (exported now when a resumed run is already at its target and lacks it)."""
    from handsoff.visualize import image_grid, save_image_atomic

    device = resolve_device(config.device)
    run = Path(config.out)
    data = ImageFolder(config.data, config.resolution)
    state = build_state(config, device)
    if config.precision == "auto":
        mixed = state.G.config["num_fp16_res"] > 0
        why = "CUDA" if device.type == "cuda" else f"bf16 measured {bf16_speedup():.2f}x float32 on this CPU"
        print(f"precision auto: {'mixed' if mixed else 'fp32'} ({why})")
    if has_state(run):
        for key, (before, now) in sorted(_check_resume(run, config).items()):
            if key in ARITHMETIC_CHANGES:
                print(f"resuming with {key} {now!r} (the run so far used {before!r})")
        # The file records what the run continues with (resumable keys such as precision may have changed).
        atomic_save(run / CONFIG_FILE, lambda tmp: tmp.write_text(json.dumps(_config_json(config), indent=2)))
        state.load_state_dict(read_state(run))
        _set_learning_rates(state, config)
        _truncate_log(run / LOG_FILE, state.images_seen)
        print(f"resuming {run} at {state.images_seen} images (step {state.step})")
    else:
        if run.exists() and any(run.iterdir()):
            raise TrainingError(f"{run}: exists and holds no {STATE_DIR}/ to resume from; choose an empty --out")
        start = state_from_run(Path(config.init_from), state) if config.init_from else None  # checked first
        run.mkdir(parents=True, exist_ok=True)
        atomic_save(run / CONFIG_FILE, lambda tmp: tmp.write_text(json.dumps(_config_json(config), indent=2)))
        save_image_atomic(image_grid(data.batch(range(min(config.grid_size, len(data))))), run / "reals.png")
        if start is not None:
            state.load_state_dict(start)
            _set_learning_rates(state, config)
            print(f"starting from {config.init_from} at {state.images_seen} images (step {state.step}), widened to "
                  f"channel_base {config.channel_base}, channel_max {config.channel_max}")

    def export() -> Path:  # the sample grid and network-N/ of the current state, then the state itself
        save_sample_grid(state.G_ema, run / "samples" / f"fakes-{_images_name(state.images_seen)}.png",
                         config.grid_size, config.seed)
        return save_snapshot(state, config, run)

    last = None
    tick_stats: dict[str, list[float]] = {}
    tick_start, tick_images = time.perf_counter(), state.images_seen
    bar = tqdm(total=config.total_images, initial=state.images_seen, unit="img", desc="train-gan",
               disable=not config.progress, smoothing=0.05)
    while state.images_seen < config.total_images:
        indices = data_indices(len(data), config.seed, state.images_seen, config.batch)
        reals = data.batch(indices).to(device)
        stats = train_step(state, reals, config)
        for k, v in stats.items():
            tick_stats.setdefault(k, []).append(v)
        bar.update(config.batch)
        done = state.images_seen >= config.total_images
        if state.images_seen // config.tick_images != (state.images_seen - config.batch) // config.tick_images \
                or done:
            seconds = time.perf_counter() - tick_start
            entry = {"images_seen": state.images_seen, "step": state.step, "augment_p": round(state.ada.p, 4),
                     "images_per_s": round((state.images_seen - tick_images) / max(seconds, 1e-9), 2),
                     **{k: round(float(np.mean(v)), 5) for k, v in tick_stats.items()}}
            with open(run / LOG_FILE, "a") as f:
                f.write(json.dumps(entry) + "\n")
            bar.set_postfix(G=f"{entry['loss_G']:.3f}", D=f"{entry['loss_D_real'] + entry['loss_D_fake']:.3f}",
                            p=f"{state.ada.p:.3f}")
            tick_stats, tick_start, tick_images = {}, time.perf_counter(), state.images_seen
        if state.images_seen // config.snapshot_images != (state.images_seen - config.batch) // \
                config.snapshot_images or done:
            last = export()
    bar.close()
    if last is None and state.images_seen:
        # Already at the target: export this state's snapshot if it is missing (a state/ committed without its
        # network folder), else return it; the same command then serves to export a resumed run's networks.
        last = run / f"network-{_images_name(state.images_seen)}"
        if not last.exists():
            last = export()
    return last

"""How good is a generator of the heads domain? Figures that need no downloaded network.

* Frechet probe distance (FPD): Frechet distance between probe features (``handsoff.metrics.probe``) of
  generated images and of real rendered heads, next to the same distance between two disjoint real sets (the
  floor that finite samples allow). Only the ratio FPD / floor on the same probe means something.
* Class statistics from the probe's oracle segmenter: mean area fraction of every class, and the share of
  images that contain it, for generated vs real images.

Real images come from the renderer's "reference" split (``SPLIT_SEEDS``), which neither the GAN nor the probe
was trained on.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from handsoff.domains import heads
from handsoff.generator.trunk import Trunk
from handsoff.metrics.frechet import frechet_distance
from handsoff.metrics.labels import PRESENCE_FRACTION
from handsoff.metrics.probe import Probe, train_probe


def render_real(seed: int, start: int, n: int, size: int = 64, batch: int = 64, progress: bool = True,
                framing: str = "bust") -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """Rendered heads start..start+n-1 of ``seed`` in ``framing`` (``heads.FRAMINGS``): images (n, 3, size, size)
    in [-1, 1], masks (n, size, size) int64, factors."""
    images, masks, factors = [], [], []
    with tqdm(total=n, desc=f"rendering real heads (seed {seed})", unit="img", disable=not progress) as bar:
        for first in range(start, start + n, batch):
            r = heads.render_heads(seed, range(first, min(first + batch, start + n)), size, framing)
            images.append(torch.from_numpy(r.images).permute(0, 3, 1, 2).float() / 127.5 - 1)
            masks.append(torch.from_numpy(r.masks).long())
            factors += r.factors
            bar.update(len(r.images))
    return torch.cat(images), torch.cat(masks), factors


def train_heads_probe(n: int = 6000, size: int = 64, epochs: int = 6, seed: int = 0, progress: bool = True,
                      framing: str = "bust") -> Probe:
    """A probe trained on n real rendered heads of the oracle split, in ``framing``."""
    images, masks, factors = render_real(heads.SPLIT_SEEDS["oracle"], 0, n, size, progress=progress, framing=framing)
    targets = heads.probe_targets(factors, masks.numpy())
    return train_probe(images, masks, targets, len(heads.CLASSES), epochs=epochs, seed=seed, progress=progress)


def class_statistics(masks: torch.Tensor, n_classes: int) -> dict[str, np.ndarray]:
    """area (n_classes,): mean pixel share of each class; presence (n_classes,): share of images containing it."""
    flat = masks.reshape(len(masks), -1)
    counts = torch.stack([torch.bincount(m, minlength=n_classes) for m in flat]).double() / flat.shape[1]
    return {"area": counts.mean(0).numpy(), "presence": (counts >= PRESENCE_FRACTION).double().mean(0).numpy()}


@torch.no_grad()
def generate(G: Trunk, n: int, seed: int, truncation: float = 1.0, batch: int = 64,
             progress: bool = True) -> torch.Tensor:
    """n generated images (n, 3, R, R) in [-1, 1] from sample indices 0..n-1 of ``seed``."""
    from handsoff.generator.sampling import latents_for_seeds

    out = []
    device = G.w_avg.device
    with tqdm(total=n, desc="generating", unit="img", disable=not progress) as bar:
        for first in range(0, n, batch):
            z = latents_for_seeds(seed, range(first, min(first + batch, n)), G.z_dim).to(device)
            out.append(G(z, truncation_psi=truncation).clamp(-1, 1).cpu())
            bar.update(len(z))
    return torch.cat(out)


def evaluate_generator(G: Trunk, probe: Probe, n: int = 2000, seed: int = 0, truncation: float = 1.0,
                       progress: bool = True, reals: tuple[torch.Tensor, torch.Tensor] | None = None,
                       framing: str = "bust") -> dict:
    """FPD of G vs real heads, the real-vs-real floor, and class statistics of generated vs real images.

    ``reals`` may pass two disjoint real image sets (n each) to reuse across generators; by default they are
    rendered from the reference split (indices 0..n-1 and n..2n-1) in ``framing`` (the probe's).
    """
    if reals is None:
        seed_ref = heads.SPLIT_SEEDS["reference"]
        reals = tuple(render_real(seed_ref, first, n, G.img_resolution, progress=progress, framing=framing)[0]
                      for first in (0, n))
    real_a, real_b = reals
    fakes = generate(G, n, seed, truncation, progress=progress)
    (feats_a, masks_a), (feats_g, masks_g) = probe.analyze(real_a), probe.analyze(fakes)
    fpd = frechet_distance(feats_g, feats_a)
    floor = frechet_distance(probe.features(real_b), feats_a)
    n_classes = probe.config["n_classes"]
    real_stats = class_statistics(masks_a, n_classes)
    fake_stats = class_statistics(masks_g, n_classes)
    classes = heads.CLASSES if n_classes == len(heads.CLASSES) else [str(i) for i in range(n_classes)]
    return {
        "n": n, "truncation": truncation, "fpd": fpd, "fpd_real_floor": floor, "fpd_ratio": fpd / max(floor, 1e-12),
        "classes": {name: {"area_generated": float(fake_stats["area"][i]), "area_real": float(real_stats["area"][i]),
                           "presence_generated": float(fake_stats["presence"][i]),
                           "presence_real": float(real_stats["presence"][i])}
                    for i, name in enumerate(classes)},
    }


def format_report(result: dict) -> str:
    """The evaluation as a small text table."""
    lines = [f"FPD generated vs real: {result['fpd']:.3f}   real vs disjoint real (floor): "
             f"{result['fpd_real_floor']:.3f}   ratio {result['fpd_ratio']:.2f}x   (n={result['n']}, "
             f"truncation {result['truncation']})",
             f"{'class':<11}{'area gen':>10}{'area real':>10}{'in gen':>9}{'in real':>9}"]
    for name, c in result["classes"].items():
        lines.append(f"{name:<11}{c['area_generated']:>10.4f}{c['area_real']:>10.4f}"
                     f"{c['presence_generated']:>9.3f}{c['presence_real']:>9.3f}")
    return "\n".join(lines)

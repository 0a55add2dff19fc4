"""Reproducible latent sampling: the z of sample ``i`` depends only on (seed, i), never on batch size or order."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch


def latents_for_seeds(seed: int, indices: Iterable[int], z_dim: int) -> torch.Tensor:
    """z ~ N(0, I) for each global sample index, (len(indices), z_dim) float32.

    Each row comes from its own NumPy generator seeded with (seed, index), so any sample can be regenerated on
    its own, and shards of an index range give the same latents as one run over the whole range.
    """
    rows = [np.random.default_rng([int(seed), int(i)]).standard_normal(z_dim) for i in indices]
    if not rows:
        return torch.empty(0, z_dim)
    return torch.from_numpy(np.stack(rows).astype(np.float32))

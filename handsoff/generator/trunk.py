"""The trunk: everything the later stages need from a generator, and nothing more.

Inversion, the label generator, generation and GAN evaluation touch a generator only through this surface, so any
network that provides it runs the whole pipeline. Two do: the StyleGAN2 ``Generator`` (networks.py) and
``StyleGAN3Generator`` (stylegan3.py). Adding a third (a diffusion model's denoiser features, say) means one module
implementing ``Trunk`` plus an entry in ``checkpoints.ARCHITECTURES`` (and a reader if it has its own file format);
the README's "Add a generator" section walks through it.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


class Mapping(Protocol):
    """z (B, z_dim) -> W+ latents (B, n_latent, w_dim); ``truncation_psi`` < 1 pulls them towards ``w_avg``."""

    def __call__(self, z: torch.Tensor, truncation_psi: float = 1.0,
                 truncation_cutoff: int | None = None) -> torch.Tensor: ...


class Synthesis(Protocol):
    """W+ latents -> images, and the per-layer feature maps the hypercolumn is built from.

    ``feature_channels[i]`` and ``feature_resolutions[i]`` describe the i-th map returned with
    ``return_features=True``: (B, feature_channels[i], r_i, r_i), each covering exactly the image (so the label
    generator may resize any of them to the label resolution), in any floating dtype.
    """

    n_latent: int
    feature_channels: list[int]
    feature_resolutions: list[int]

    def __call__(self, ws: torch.Tensor, noise_mode: str = "const", return_features: bool = False,
                 force_fp32: bool = False): ...


@runtime_checkable
class Trunk(Protocol):
    """A generator every stage can run.

    Attributes:
        config: the constructor's keyword arguments plus ``architecture`` (absent means "stylegan2"), JSON-able;
            ``checkpoints.save_networks`` stores it and ``load_generator`` rebuilds the network from it.
        z_dim, w_dim, n_latent: latent sizes; W+ latents are (B, n_latent, w_dim) and inversion optimizes them.
        img_resolution, img_channels: images are (B, img_channels, R, R) float32 in about [-1, 1].
        mapping, synthesis: as above; ``G(z, truncation_psi)`` is ``synthesis(mapping(z, truncation_psi))``.
        w_avg: (w_dim,) the average latent (inversion starts there; truncation pulls towards it).
    """

    config: dict
    z_dim: int
    w_dim: int
    n_latent: int
    img_resolution: int
    img_channels: int
    mapping: Mapping
    synthesis: Synthesis

    @property
    def w_avg(self) -> torch.Tensor: ...

    def __call__(self, z: torch.Tensor, truncation_psi: float = 1.0, truncation_cutoff: int | None = None,
                 noise_mode: str = "const", return_features: bool = False, force_fp32: bool = False): ...

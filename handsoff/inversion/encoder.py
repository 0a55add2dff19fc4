"""A ReStyle-style iterative encoder (Alaluf et al., ICCV 2021) trained on the generator's own samples.

The encoder sees the target image and the current reconstruction (6 channels) and predicts a residual in W+;
starting from the average latent, ``iterations`` (default 5) refinements are applied:

    w_0 = w_avg,  x_0 = G(w_0);   w_{t+1} = w_t + E(concat(x, x_t)),  x_{t+1} = G(w_{t+1})

Training needs no real data and no pretrained backbone: latents are sampled (truncation between 0.5 and 1, style
mixing) -> images -> the encoder learns to recover them, with a latent loss, an image loss and a perceptual
loss. Instead of unrolling all iterations per batch as ReStyle does, each batch trains one iteration t drawn
uniformly from 0..iterations-1 (the earlier ones run without gradient), which gives the same expected loss over
iterations for a fifth of the backward passes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from handsoff.fileio import read_weights_folder, save_weights_folder
from handsoff.generator.trunk import Trunk


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.LeakyReLU(0.2, inplace=True),
                         nn.Conv2d(cout, cout, 3, 1, 1), nn.GroupNorm(8, cout), nn.LeakyReLU(0.2, inplace=True))


class ReStyleEncoder(nn.Module):
    """(image, reconstruction) -> W+ residual.

    Keyword arguments (``config``): resolution (input size; other sizes are resized), n_latent, w_dim, width
    (channels of the first stage, doubled per stage up to 8 * width), iterations (default refinement count).
    Input images (B, 3, R, R) in [-1, 1]; output (B, n_latent, w_dim). The last layer starts at zero, so an
    untrained encoder leaves the average latent where it is.
    """

    def __init__(self, resolution: int, n_latent: int, w_dim: int, width: int = 32, iterations: int = 5):
        super().__init__()
        self.config = dict(resolution=resolution, n_latent=n_latent, w_dim=w_dim, width=width,
                           iterations=iterations)
        size = min(resolution, 64)  # inputs are resized to at most 64 px: the latent's coarse structure is enough
        self.input_size = size
        stages = int(np.log2(size)) - 2  # down to 4x4
        layers, cin = [], 6
        for i in range(stages):
            cout = width * min(2**i, 8)
            layers.append(_block(cin, cout, stride=2))
            cin = cout
        self.trunk = nn.Sequential(*layers)
        self.reduce = nn.Conv2d(cin, 64, 1)
        spatial = (size // 2**stages) ** 2
        self.head = nn.Linear(64 * spatial, n_latent * w_dim)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
        x = torch.cat([images, reconstructions], dim=1)
        if x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False,
                              antialias=True)
        x = F.leaky_relu(self.reduce(self.trunk(x)), 0.2).flatten(1)
        return self.head(x).reshape(len(images), self.config["n_latent"], self.config["w_dim"])


def encode(encoder: ReStyleEncoder, G: Trunk, images: torch.Tensor, iterations: int | None = None,
           return_all: bool = False):
    """Run the ReStyle iterations: W+ (B, n_latent, w_dim) for images (B, 3, R, R) in [-1, 1].

    With ``return_all`` also returns the list of latents after each iteration (w_0 = w_avg first).
    """
    iterations = encoder.config["iterations"] if iterations is None else iterations
    ws = G.w_avg[None, None].expand(len(images), G.n_latent, -1).clone()
    history = [ws]
    for _ in range(iterations):
        recon = G.synthesis(ws, noise_mode="const")
        ws = ws + encoder(images, recon)
        history.append(ws)
    return (ws, history) if return_all else ws


def sample_training_latents(G: Trunk, batch: int, generator: torch.Generator) -> torch.Tensor:
    """W+ latents with truncation psi ~ U(0.5, 1) per sample and style mixing with probability 0.5."""
    device = G.w_avg.device
    z = torch.randn(batch, G.z_dim, generator=generator).to(device)
    psi = (0.5 + 0.5 * torch.rand(batch, generator=generator)).to(device)[:, None, None]
    ws = G.mapping(z)
    mix = torch.rand(batch, generator=generator) < 0.5
    if mix.any():
        ws2 = G.mapping(torch.randn(batch, G.z_dim, generator=generator).to(device))
        cut = torch.randint(1, G.n_latent, (batch,), generator=generator)
        layer = torch.arange(G.n_latent)[None, :]
        use2 = (mix[:, None] & (layer >= cut[:, None])).to(device)[..., None]
        ws = torch.where(use2, ws2, ws)
    return G.w_avg + psi * (ws - G.w_avg)


def train_encoder(G: Trunk, perceptual: nn.Module | None, *, steps: int = 2000, batch: int = 16, lr: float = 1e-3,
                  iterations: int = 5, width: int = 32, lambda_latent: float = 1.0, lambda_mse: float = 1.0,
                  lambda_perceptual: float = 1.0, seed: int = 0, progress: bool = True,
                  encoder: ReStyleEncoder | None = None, log: list | None = None) -> ReStyleEncoder:
    """Train (or continue training) an encoder for generator G on its own samples; returns it in eval mode.

    Losses per sample: lambda_latent * MSE(w, w_true) + lambda_mse * MSE(x_rec, x) (images in [0, 1])
    + lambda_perceptual * perceptual(x_rec, x). ``log`` (a list) receives one dict per step.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    G = G.eval().requires_grad_(False)
    if encoder is None:
        encoder = ReStyleEncoder(G.img_resolution, G.n_latent, G.w_dim, width=width, iterations=iterations)
    encoder = encoder.to(G.w_avg.device).train()
    opt = torch.optim.Adam(encoder.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    with tqdm(total=steps, desc="training encoder", unit="step", disable=not progress) as bar:
        for step in range(steps):
            with torch.no_grad():
                w_true = sample_training_latents(G, batch, gen)
                target = G.synthesis(w_true, noise_mode="const")
                t = int(torch.randint(0, iterations, (), generator=gen))
                ws = G.w_avg[None, None].expand(batch, G.n_latent, -1).clone()
                recon = G.synthesis(ws, noise_mode="const")
                encoder.eval()
                for _ in range(t):
                    ws = ws + encoder(target, recon)
                    recon = G.synthesis(ws, noise_mode="const")
                encoder.train()
            ws = ws + encoder(target, recon)
            recon = G.synthesis(ws, noise_mode="const")
            loss_latent = (ws - w_true).square().mean()
            loss_mse = ((recon - target) / 2).square().mean()
            loss = lambda_latent * loss_latent + lambda_mse * loss_mse
            loss_p = torch.zeros(())
            if perceptual is not None and lambda_perceptual > 0:
                loss_p = perceptual(recon, target).mean()
                loss = loss + lambda_perceptual * loss_p
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            entry = {"step": step, "iteration": t, "latent": float(loss_latent.detach()),
                     "mse": float(loss_mse.detach()),
                     "perceptual": float(loss_p.detach())}
            if log is not None:
                log.append(entry)
            bar.update(1)
            bar.set_postfix(latent=f"{entry['latent']:.4f}", mse=f"{entry['mse']:.4f}")
    return encoder.eval()


def save_encoder(encoder: ReStyleEncoder, out_dir: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (each atomically) into out_dir."""
    return save_weights_folder(out_dir, encoder.state_dict(), {"encoder": encoder.config, "metadata": metadata or {}})


def load_encoder(path: str | os.PathLike, device: str | torch.device = "cpu") -> ReStyleEncoder:
    config, state = read_weights_folder(path, "an encoder folder (train one with `handsoff train-encoder`)")
    encoder = ReStyleEncoder(**config["encoder"])
    encoder.load_state_dict(state)
    return encoder.to(device).eval()

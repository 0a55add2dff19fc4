"""Latent optimization: refine W+ latents so that G reproduces target images (HandsOff's second inversion step).

    loss_i = lambda_p * perceptual(G(w_i), x_i) + lambda_mse * MSE(G(w_i), x_i) + lambda_reg * MSE(w_i, w_init_i)

with images in [0, 1] for the MSE. Adam on W+ (noise fixed), learning rate ramped up over the first 5% of the
steps and down by a half cosine over the last 25% (the schedule of the paper and of StyleGAN2's projector).
Many images are optimized at once as one batch; each keeps the latent of its own lowest loss.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm import tqdm

from handsoff.generator.trunk import Trunk


def learning_rate(step: int, steps: int, peak: float, rampup: float = 0.05, rampdown: float = 0.25) -> float:
    """The schedule at ``step`` of ``steps``: linear warm-up over ``rampup``, cosine ramp-down over ``rampdown``."""
    t = step / max(steps, 1)
    down = min(1.0, (1.0 - t) / rampdown)
    down = 0.5 - 0.5 * math.cos(down * math.pi)
    return peak * down * min(1.0, t / rampup) if rampup > 0 else peak * down


def reconstruction_losses(G: Trunk, ws: torch.Tensor, targets: torch.Tensor, perceptual: nn.Module | None,
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image (image MSE in [0, 1] units, perceptual distance, reconstructions)."""
    recon = G.synthesis(ws, noise_mode="const", force_fp32=True)
    mse = ((recon - targets) / 2).square().mean(dim=(1, 2, 3))
    perc = perceptual(recon, targets) if perceptual is not None else torch.zeros_like(mse)
    return mse, perc, recon


def refine_latents(G: Trunk, targets: torch.Tensor, ws_init: torch.Tensor, perceptual: nn.Module | None, *,
                   steps: int = 500, lr: float = 0.1, lambda_perceptual: float = 10.0, lambda_mse: float = 1.0,
                   lambda_reg: float = 1.0, batch: int = 16, progress: bool = True) -> dict:
    """Optimize W+ for each target image.

    Args:
        targets: (N, 3, R, R) in [-1, 1]. ws_init: (N, n_latent, w_dim), e.g. from the encoder.
        batch: images optimized together (memory scales with it; results do not depend on it).

    Returns:
        dict with ws (N, n_latent, w_dim) best latents, loss (N,) their loss, mse (N,), perceptual (N,).
    """
    G = G.eval().requires_grad_(False)
    device = G.w_avg.device
    out = {"ws": [], "loss": [], "mse": [], "perceptual": []}
    with tqdm(total=len(targets) * steps, desc="refining latents", unit="img-step", disable=not progress) as bar:
        for first in range(0, len(targets), batch):
            x = targets[first:first + batch].to(device)
            w0 = ws_init[first:first + batch].to(device).float()
            ws = w0.clone().requires_grad_(True)
            opt = torch.optim.Adam([ws], lr=lr, betas=(0.9, 0.999))
            best_loss = torch.full((len(x),), float("inf"), device=device)
            best_ws = w0.clone()
            best_mse, best_perc = torch.zeros(len(x)), torch.zeros(len(x))
            for step in range(steps + 1):
                # The last pass only scores the final latents: no graph, which would otherwise stay alive (the
                # whole network's activations) into the next batch's first pass and double its peak memory.
                with torch.set_grad_enabled(step < steps):
                    mse, perc, _ = reconstruction_losses(G, ws, x, perceptual)
                    reg = (ws - w0).square().mean(dim=(1, 2))
                    loss = lambda_perceptual * perc + lambda_mse * mse + lambda_reg * reg
                with torch.no_grad():  # keep each image's best latent (the one just evaluated)
                    better = loss < best_loss
                    best_loss = torch.where(better, loss, best_loss)
                    best_ws[better] = ws[better]
                    best_mse = torch.where(better.cpu(), mse.cpu(), best_mse)
                    best_perc = torch.where(better.cpu(), perc.cpu(), best_perc)
                if step == steps:
                    break
                for group in opt.param_groups:
                    group["lr"] = learning_rate(step, steps, lr)
                opt.zero_grad(set_to_none=True)
                loss.sum().backward()
                opt.step()
                bar.update(len(x))
            out["ws"].append(best_ws.detach().cpu())
            out["loss"].append(best_loss.detach().cpu())
            out["mse"].append(best_mse)
            out["perceptual"].append(best_perc)
    return {k: torch.cat(v) for k, v in out.items()}

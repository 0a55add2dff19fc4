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


# Peak memory of an optimization step per image, over what autograd saves for its backward pass (measured at
# 256 px with StyleGAN2 config-f and the discriminator-feature distance, 0.95 GiB saved per image: 1.2 to 1.45 GiB
# of resident memory per image at batch 4 and 5, the backward pass's temporaries and the allocator's slack).
STEP_MEMORY_FACTOR = 1.5


def saved_bytes_per_image(G: Trunk, perceptual: nn.Module | None) -> int:
    """Bytes autograd keeps for the backward pass of one image's reconstruction loss (generator and perceptual
    distance), counted on one forward pass: what one more image in an optimization batch costs."""
    # Storages by address; holding them until the count is done keeps a freed address from being reused (and
    # counted once for two tensors). Views share one storage; meta tensors (planning without memory) have no address.
    storages: dict[int, torch.UntypedStorage] = {}

    def pack(t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        storages[storage.data_ptr() or storage._cdata] = storage
        # The graph itself keeps nothing: it is never run backward. Returning ``t`` would make a saved output and its
        # grad_fn hold each other through C++, a cycle Python's collector cannot see, and the whole pass's
        # activations (0.95 GiB per image at 256 px) would stay alive for the rest of the process.
        return None

    def unpack(_) -> torch.Tensor:
        raise RuntimeError("saved_bytes_per_image's graph is for counting only")

    device = G.w_avg.device
    ws = G.w_avg[None, None].expand(1, G.n_latent, -1).clone().requires_grad_(True)
    target = torch.zeros(1, G.img_channels, G.img_resolution, G.img_resolution, device=device)
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        reconstruction_losses(G, ws, target, perceptual)
    return sum(storage.nbytes() for storage in storages.values())


def batch_for_memory(G: Trunk, perceptual: nn.Module | None, n_images: int, memory_gb: float | None = None) -> int:
    """The largest optimization batch (at most ``n_images``, at least 1) whose steps fit in ``memory_gb`` of peak
    memory (default ``runtime.default_memory_budget_gib``), given what the process holds already."""
    from handsoff.runtime import default_memory_budget_gib, resident_gib

    device = G.w_avg.device
    budget = memory_gb if memory_gb is not None else default_memory_budget_gib(device)
    held = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else resident_gib()
    per_image = saved_bytes_per_image(G, perceptual) * STEP_MEMORY_FACTOR / 2**30
    return int(max(1, min(n_images, (budget - held) // per_image)))


def refine_latents(G: Trunk, targets: torch.Tensor, ws_init: torch.Tensor, perceptual: nn.Module | None, *,
                   steps: int = 500, lr: float = 0.1, lambda_perceptual: float = 10.0, lambda_mse: float = 1.0,
                   lambda_reg: float = 1.0, batch: int | None = None, memory_gb: float | None = None,
                   progress: bool = True) -> dict:
    """Optimize W+ for each target image.

    Args:
        targets: (N, 3, R, R) in [-1, 1]. ws_init: (N, n_latent, w_dim), e.g. from the encoder.
        batch: images optimized together (memory scales with it; results do not depend on it). None: the largest
            that fits ``memory_gb`` of peak memory (``batch_for_memory``).

    Returns:
        dict with ws (N, n_latent, w_dim) best latents, loss (N,) their loss, mse (N,), perceptual (N,), and the
        batch used.
    """
    G = G.eval().requires_grad_(False)
    device = G.w_avg.device
    batch = batch or batch_for_memory(G, perceptual, len(targets), memory_gb)
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
    return {**{k: torch.cat(v) for k, v in out.items()}, "batch": batch}

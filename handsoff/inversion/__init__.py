"""Inversion: put labeled real images into the generator's W+ space (HandsOff's first stage).

``invert_images`` runs the ReStyle encoder (if one is given) and then latent optimization, and reports per-image
reconstruction figures for the average latent, the encoder and the refined latent. Latents are stored as one
safetensors file: a (n_latent, w_dim) float32 tensor per image, keyed by the image's name, with the settings
(generator, perceptual distance, steps) in the file's metadata.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from handsoff.data.layout import DatasetError
from handsoff.errors import MissingInputError, OutputError, UsageError
from handsoff.fileio import atomic_save
from handsoff.generator.trunk import Trunk
from handsoff.inversion.encoder import ReStyleEncoder, encode, load_encoder, save_encoder, train_encoder
from handsoff.inversion.optimize import batch_for_memory, reconstruction_losses, refine_latents
from handsoff.inversion.perceptual import LPIPS, DiscriminatorFeatureDistance, build_perceptual

__all__ = ["LPIPS", "DiscriminatorFeatureDistance", "ReStyleEncoder", "build_perceptual", "encode",
           "inversion_complete", "invert_folder", "invert_images", "load_encoder", "load_latents", "psnr",
           "refine_latents", "save_encoder", "save_latents", "train_encoder"]


def psnr(mse: torch.Tensor) -> torch.Tensor:
    """PSNR in dB for MSE of images in [0, 1]."""
    return 10 * torch.log10(1.0 / mse.clamp(min=1e-12))


@torch.no_grad()
def _figures(G: Trunk, ws: torch.Tensor, images: torch.Tensor, perceptual,
             batch: int = 32) -> tuple[dict, torch.Tensor]:
    mse, perc, recon = [], [], []
    for i in range(0, len(images), batch):
        m, p, r = reconstruction_losses(G, ws[i:i + batch].to(G.w_avg.device), images[i:i + batch].to(G.w_avg.device),
                                        perceptual)
        mse.append(m.cpu())
        perc.append(p.cpu())
        recon.append(r.cpu())
    mse_t = torch.cat(mse)
    return {"mse": mse_t, "psnr": psnr(mse_t), "perceptual": torch.cat(perc)}, torch.cat(recon)


def invert_images(G: Trunk, images: torch.Tensor, perceptual, encoder: ReStyleEncoder | None = None, *,
                  steps: int = 500, lr: float = 0.1, lambda_perceptual: float = 10.0, lambda_mse: float = 1.0,
                  lambda_reg: float = 1.0, batch: int | None = None, memory_gb: float | None = None,
                  progress: bool = True) -> dict:
    """Invert images (N, 3, R, R) in [-1, 1].

    ``batch``: images optimized together; None chooses the largest that fits ``memory_gb`` of peak memory (default:
    a third of this machine's memory, at most half of what is free; on CUDA 80% of the free device memory).

    Returns a dict: ws (N, n_latent, w_dim) refined latents; stages {"average", "encoder", "refined"} each
    with per-image mse / psnr / perceptual tensors (N,) and reconstructions (N, 3, R, R); steps == 0 skips
    refinement (refined = encoder); batch, the batch used.
    """
    device = G.w_avg.device
    batch = batch or batch_for_memory(G, perceptual, len(images), memory_gb)
    w_avg = G.w_avg[None, None].expand(len(images), G.n_latent, -1).cpu()
    stages = {}
    stages["average"], recon_avg = _figures(G, w_avg, images, perceptual, batch)
    stages["average"]["reconstructions"] = recon_avg
    if encoder is not None:
        with torch.no_grad():
            ws_enc = torch.cat([encode(encoder, G, images[i:i + batch].to(device)).cpu()
                                for i in range(0, len(images), batch)])
    else:
        ws_enc = w_avg.clone()
    stages["encoder"], recon_enc = _figures(G, ws_enc, images, perceptual, batch)
    stages["encoder"]["reconstructions"] = recon_enc
    if steps > 0:
        refined = refine_latents(G, images, ws_enc, perceptual, steps=steps, lr=lr,
                                 lambda_perceptual=lambda_perceptual, lambda_mse=lambda_mse, lambda_reg=lambda_reg,
                                 batch=batch, progress=progress)
        ws = refined["ws"]
    else:
        ws = ws_enc
    stages["refined"], recon_ref = _figures(G, ws, images, perceptual, batch)
    stages["refined"]["reconstructions"] = recon_ref
    return {"ws": ws, "ws_encoder": ws_enc, "stages": stages, "batch": batch}


def save_latents(path: str | os.PathLike, names: list[str], ws: torch.Tensor, metadata: dict) -> Path:
    """One (n_latent, w_dim) tensor per name; ``metadata`` (JSON-able) goes into the file header."""
    if len(names) != len(ws):
        raise ValueError(f"{len(names)} names for {len(ws)} latents")
    tensors = {name: ws[i].detach().float().cpu().contiguous() for i, name in enumerate(names)}
    header = {"handsoff": json.dumps(metadata)}
    return atomic_save(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def load_latents(path: str | os.PathLike) -> tuple[list[str], torch.Tensor, dict]:
    """(names sorted, ws (N, n_latent, w_dim), metadata) from a file written by ``save_latents``."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: latents file not found (make one with `handsoff invert`)")
    try:
        with safe_open(path, framework="pt") as f:
            names = sorted(f.keys())
            ws = torch.stack([f.get_tensor(n) for n in names]) if names else torch.empty(0)
            meta = json.loads((f.metadata() or {}).get("handsoff", "{}"))
    except Exception as e:  # noqa: BLE001 - report any unreadable file the same way
        raise DatasetError(f"{path}: not a latents file ({e})") from None
    if ws.ndim != 3:
        raise DatasetError(f"{path}: latents must be (n_latent, w_dim) per image, got {tuple(ws.shape[1:])}")
    if not bool(torch.isfinite(ws).all()):
        bad = [n for n, w in zip(names, ws) if not bool(torch.isfinite(w).all())]
        raise DatasetError(f"{path}: latents of {', '.join(bad[:5])} hold NaN or infinite values; invert again")
    return names, ws, meta


def summarize(stages: dict) -> dict:
    """Mean mse / psnr / perceptual per stage (plain floats)."""
    return {stage: {k: float(v.mean()) for k, v in figs.items() if k != "reconstructions"}
            for stage, figs in stages.items()}


def check_latents_path(out: str | os.PathLike) -> Path:
    """``out`` as a Path if it names a latents file (.safetensors); its .json report and .png sheet go beside it,
    so any other suffix could land them on a user's file (``--out data/dataset.json``)."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise UsageError(f"--out {out}: the latents file must end in .safetensors (its report and sheet are "
                         "written beside it with .json and .png)")
    if out.exists():
        try:
            with safe_open(out, framework="pt") as f:
                ours = "handsoff" in (f.metadata() or {})
        except Exception:  # noqa: BLE001 - unreadable: certainly not a latents file handsoff wrote
            ours = False
        if not ours:
            raise OutputError(f"--out {out}: exists and is not a latents file written by handsoff; handsoff will "
                              "not overwrite it, choose another name")
    else:
        strays = [p for p in (out.with_suffix(".json"), out.with_suffix(".png")) if p.exists()]
        if strays:  # handsoff writes them after the latents: without the latents they are someone else's
            raise OutputError(f"--out {out}: {strays[0]} exists and was not written by handsoff; choose another "
                              "name")
    return out


def inversion_complete(out: str | os.PathLike) -> bool:
    """Whether ``invert_folder`` finished writing ``out`` (its .png sheet is written last)."""
    return Path(out).with_suffix(".png").is_file()


def invert_folder(G: Trunk, images_dir: str | os.PathLike, out: str | os.PathLike, perceptual, encoder=None, *,
                  settings: dict | None = None, sheet_rows: int = 16, progress: bool = True, **options) -> dict:
    """Invert every image of a folder (or labeled dataset) and write the results beside ``out``.

    Writes ``out`` (latents keyed by image name, see ``save_latents``), ``out`` with suffix .json (settings,
    mean and per-image figures) and .png (real | encoder | refined sheet of the first ``sheet_rows`` images).
    ``options`` go to ``invert_images`` (steps, lr, lambda_*, batch). Returns the .json report.
    """
    import time

    from handsoff.data.images import ImageFolder
    from handsoff.fileio import atomic_write_json
    from handsoff.visualize import image_grid, save_image_atomic

    out = check_latents_path(out)
    folder = ImageFolder(images_dir, G.img_resolution, resize=True)  # square images of any size
    images = folder.batch(range(len(folder)))
    t0 = time.perf_counter()
    result = invert_images(G, images, perceptual, encoder, progress=progress, **options)
    stages = result["stages"]
    settings = {**(settings or {}), "images": str(images_dir),
                "perceptual": getattr(perceptual, "name", "none"), **options, "batch": result["batch"],
                "seconds_per_image": (time.perf_counter() - t0) / len(images)}
    out = save_latents(out, folder.names, result["ws"], settings)
    per_image = {name: {stage: {k: float(stages[stage][k][i]) for k in ("mse", "psnr", "perceptual")}
                        for stage in stages} for i, name in enumerate(folder.names)}
    report = {"settings": settings, "mean": summarize(stages), "images": per_image}
    atomic_write_json(out.with_suffix(".json"), report)
    n = min(len(images), sheet_rows)
    rows = torch.stack([images[:n], stages["encoder"]["reconstructions"][:n],
                        stages["refined"]["reconstructions"][:n]], 1).reshape(-1, *images.shape[1:])
    save_image_atomic(image_grid(rows.clamp(-1, 1), columns=3), out.with_suffix(".png"))
    return report

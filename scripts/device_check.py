"""One prepared check for a lent GPU machine: the CUDA tests, then every stage measured at paper scale.

    python scripts/device_check.py --out $OUT                # on the GPU machine (about 8 minutes)
    python scripts/device_check.py --smoke --out /tmp/check  # the same code at tiny sizes on CPU (CI can run it)

With random weights (speed and memory do not depend on them), per setting: generator images/s (StyleGAN2
config-f widths at 1024 and 256 px), labeled images/s (generator features + a 10-member seg + depth label
generator at every label pixel, 512 and 256 px labels), inversion seconds per image (W+ optimization with the
discriminator-feature distance), label-generator fit seconds per step (the one-off feature caching of its images
included), downstream training images/s at 512 px
(DeepLabV3 and the U-Net judge on ResNet-50), and the peak memory of each (CUDA: max allocated; CPU: the
process's peak RSS so far). Writes ``device_check.json`` and ``device_check.md`` (a table) into --out. Without
--smoke the CUDA test subset (``pytest -k cuda``) runs first; its summary line is recorded.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

FFHQ = dict(z_dim=512, w_dim=512, n_mlp=8, channel_base=32768, channel_max=512)  # config-f widths
TINY = dict(z_dim=32, w_dim=32, n_mlp=2, channel_base=512, channel_max=32)
FULL = dict(generator=[1024, 256], labels=[(1024, 512), (256, 256)], inversion=(256, 8, 20), fit=(256, 256, 16, 20),
            downstream=(512, 8, "resnet50"), reps=5)
SMOKE = dict(generator=[32], labels=[(32, 32)], inversion=(32, 2, 3), fit=(32, 32, 4, 3),
             downstream=(32, 2, "resnet18"), reps=2)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def timed(fn, device: torch.device, reps: int) -> float:
    """Seconds per call of ``fn`` after one warm-up call."""
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / reps


def generator(resolution: int, widths: dict, device: torch.device):
    from handsoff.generator import Generator

    torch.manual_seed(0)
    G = Generator(resolution=resolution, **widths).to(device).eval()
    G.mapping.update_w_avg(seed=0)
    return G


def measure(name: str, device: torch.device, work) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = {"stage": name, **work()}
    result["peak_memory_gb"] = round(peak_memory_gb(device), 2)
    print(json.dumps(result), flush=True)
    return result


def check(sizes: dict, widths: dict, device: torch.device, batch: int) -> list[dict]:
    from downstream import images_per_second

    from handsoff.inversion import DiscriminatorFeatureDistance, refine_latents
    from handsoff.label_generator import Depth, LabelGenerator, Segmentation, fit_label_generator
    from handsoff.label_generator.model import resolve_label_precision

    reps, rows = sizes["reps"], []
    for resolution in sizes["generator"]:
        G = generator(resolution, widths, device)
        z = torch.randn(batch, G.z_dim, device=device)
        with torch.no_grad():
            seconds = timed(lambda: G(z), device, reps)
        rows.append(measure(f"generator {resolution} px", device, lambda: {"images_per_s": round(batch / seconds, 2)}))
    for resolution, label_size in sizes["labels"]:
        G = generator(resolution, widths, device)
        model = LabelGenerator(G, [Segmentation([f"c{i}" for i in range(8)]), Depth()], label_size,
                               members=10).to(device).eval()
        ws = G.mapping(torch.randn(2, G.z_dim, device=device), truncation_psi=0.7)
        auto = resolve_label_precision("auto", device)
        for precision in dict.fromkeys(["fp32", auto]):  # fp32, and what 'auto' takes here where that differs
            seconds = timed(lambda: model.predict(ws, precision=precision), device, reps)
            rows.append(measure(f"labeled images, {resolution} px generator, {label_size} px labels, {precision}"
                                + (" (auto)" if precision == auto else ""), device,
                                lambda: {"labeled_images_per_s": round(len(ws) / seconds, 3)}))
    resolution, n, steps = sizes["inversion"]
    from handsoff.generator import Discriminator

    G = generator(resolution, widths, device)
    D = Discriminator(resolution=resolution, channel_base=widths["channel_base"],
                      channel_max=widths["channel_max"]).to(device).eval()
    targets = G(torch.randn(n, G.z_dim, device=device)).detach().clamp(-1, 1)

    def invert():
        start = time.perf_counter()
        refine_latents(G, targets, G.w_avg[None, None].expand(n, G.n_latent, -1), DiscriminatorFeatureDistance(D),
                       steps=steps, batch=n, progress=False)
        sync(device)
        return {"seconds_per_image": round((time.perf_counter() - start) / n, 3), "steps": steps}

    rows.append(measure(f"inversion {resolution} px", device, invert))
    resolution, label_size, images, steps = sizes["fit"]
    G = generator(resolution, widths, device)
    ws = G.mapping(torch.randn(images, G.z_dim, device=device)).detach()
    rng = np.random.default_rng(0)
    samples = [{"name": f"{i}", "mask": rng.integers(0, 8, (label_size, label_size)),
                "depth": rng.uniform(1, 10, (label_size, label_size)).astype(np.float32)} for i in range(images)]

    def fit():
        model = LabelGenerator(G, [Segmentation([f"c{i}" for i in range(8)]), Depth()], label_size,
                               members=10).to(device)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            fit_label_generator(model, ws, samples, tmp, max_steps=steps, min_steps=steps, progress=False)
            sync(device)
        return {"seconds_per_step": round((time.perf_counter() - start) / steps, 3), "images": images}

    rows.append(measure(f"label generator fit, {label_size} px labels", device, fit))
    size, batch_ds, backbone = sizes["downstream"]
    for architecture in ("deeplabv3", "unet"):
        rows.append(measure(f"downstream {architecture}-{backbone} {size} px", device, lambda: {
            "images_per_s": round(images_per_second(architecture, backbone, size, batch_ds, reps, device), 2)}))
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| stage | speed | peak memory (GB) |", "| --- | --- | --- |"]
    for row in rows:
        speed = ", ".join(f"{k} {v}" for k, v in row.items() if k not in ("stage", "peak_memory_gb"))
        lines.append(f"| {row['stage']} | {speed} | {row['peak_memory_gb']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, on CPU unless --device says otherwise")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch", type=int, default=None, help="generator batch (default 16; smoke 4)")
    args = parser.parse_args()
    from handsoff.runtime import resolve_device, tune_allocator

    tune_allocator()
    device = resolve_device(args.device or ("cpu" if args.smoke else "cuda"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
              or platform.machine(), "torch": torch.__version__, "smoke": args.smoke, "threads":
              torch.get_num_threads()}
    if not args.smoke:
        tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-k", "cuda", str(ROOT / "tests")],
                               capture_output=True, text=True, cwd=ROOT)
        report["cuda_tests"] = (tests.stdout.strip().splitlines() or ["no output"])[-1]
        print("cuda tests:", report["cuda_tests"], flush=True)
    start = time.perf_counter()
    report["rows"] = check(SMOKE if args.smoke else FULL, TINY if args.smoke else FFHQ, device,
                           args.batch or (4 if args.smoke else 16))
    report["seconds"] = round(time.perf_counter() - start, 1)
    (out / "device_check.json").write_text(json.dumps(report, indent=1) + "\n")
    md = f"{report['device']}, torch {report['torch']}\n\n{table(report['rows'])}\n"
    (out / "device_check.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()

"""Generator forward speed on CPU: grouped-conv weight-modulation reference vs handsoff fp32 vs handsoff bf16.

    python benchmarks/generator.py                      # 64 and 256 px, batch 16, FFHQ and slim widths
    python benchmarks/generator.py --resolutions 64 --widths slim --reps 2

Every measurement runs in its own subprocess, so peak RSS is per variant, and under both allocator settings:
glibc's defaults (how a reference implementation usually runs) and handsoff's ``tune_allocator`` (what the
``handsoff`` CLI uses). Ratios are against the reference measured in the same run under the same allocator,
and, in the last column, against the reference under glibc's defaults.

Variants:
    reference  weight modulation + grouped conv (the StyleGAN2 paper's form, as in the reference
               implementations), fp32, contiguous tensors
    fp32       handsoff: modulated activations, one shared-weight conv, fused elementwise work, fp32
    bf16       the same in bfloat16, channels-last (every block but 4x4, as NVIDIA's num_fp16_res)

After each size, the precision that ``--precision auto`` picks on this CPU (``runtime.reduced_precision_pays``) and
its speed against fp32: it must never be below 1 by more than noise.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

WIDTHS = {
    # FFHQ config-f widths (channel_base 32768, 512 style), and the slim CPU config of the demo generator.
    "ffhq": dict(z_dim=512, w_dim=512, channel_base=32768, channel_max=512),
    "slim": dict(z_dim=256, w_dim=256, channel_base=8192, channel_max=256),
}
VARIANTS = ("reference", "fp32", "bf16")


def measure(widths: str, resolution: int, variant: str, batch: int, reps: int) -> dict:
    import torch

    from handsoff.generator import Generator

    torch.manual_seed(0)
    G = Generator(resolution=resolution, num_fp16_res=99 if variant == "bf16" else 0, **WIDTHS[widths]).eval()
    G.synthesis.fused_modconv = variant == "reference"
    ws = G.mapping(torch.randn(batch, G.z_dim))
    with torch.no_grad():
        G.synthesis(ws)  # warm-up: oneDNN primitive creation, allocator growth
        start = time.perf_counter()
        for _ in range(reps):
            G.synthesis(ws)
        seconds = time.perf_counter() - start
    return {"images_per_s": reps * batch / seconds,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_worker(args) -> None:
    if args.allocator == "tuned":
        from handsoff.runtime import tune_allocator

        assert tune_allocator(), "could not tune the allocator"
    print(json.dumps(measure(args.widths[0], args.resolutions[0], args.variant, args.batch, args.reps)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--widths", nargs="+", default=["ffhq", "slim"], choices=sorted(WIDTHS))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--allocator", choices=["default", "tuned"], help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return run_worker(args)

    import torch

    from handsoff.runtime import bf16_speedup, reduced_precision_pays

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, {args.reps} reps")
    header = (f"{'widths':6} {'res':>4} {'allocator':9} {'variant':9} {'img/s':>8} {'peak RSS MiB':>13} "
              f"{'x ref (same alloc)':>18} {'x ref (default alloc)':>21}")
    print(header)
    print("-" * len(header))
    env = {**os.environ, "HANDSOFF_NO_MALLOPT": ""}
    for widths in args.widths:
        for res in args.resolutions:
            results = {}
            for allocator in ("default", "tuned"):
                for variant in VARIANTS:
                    cmd = [sys.executable, __file__, "--worker", "--allocator", allocator, "--variant", variant,
                           "--widths", widths, "--resolutions", str(res), "--batch", str(args.batch),
                           "--reps", str(args.reps)]
                    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
                    results[allocator, variant] = r = json.loads(out.strip().splitlines()[-1])
                    same = r["images_per_s"] / results[allocator, "reference"]["images_per_s"]
                    default = r["images_per_s"] / results["default", "reference"]["images_per_s"]
                    print(f"{widths:6} {res:>4} {allocator:9} {variant:9} {r['images_per_s']:8.2f} "
                          f"{r['peak_rss_mib']:13.0f} {same:18.2f} {default:21.2f}", flush=True)
            # What precision 'auto' picks on this CPU, and what that choice is worth here against float32.
            chosen = "bf16" if reduced_precision_pays(torch.device("cpu")) else "fp32"
            ratio = results["tuned", chosen]["images_per_s"] / results["tuned", "fp32"]["images_per_s"]
            print(f"{widths:6} {res:>4} auto picks {chosen} (micro-benchmark: bf16 {bf16_speedup():.2f}x fp32); "
                  f"picked / fp32 = {ratio:.2f}", flush=True)


if __name__ == "__main__":
    main()

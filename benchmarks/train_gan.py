"""GAN training speed on CPU for the shipped configuration: float32 vs mixed precision (bf16), side by side.

    python benchmarks/train_gan.py                 # shipped heads-64 config, batch 32, 4 timed steps each
    python benchmarks/train_gan.py --steps 8 --rounds 2

Each variant runs in its own subprocess (tuned allocator, as the CLI runs), alternating fp32 / mixed for
``--rounds`` rounds so that machine noise hits both; a step is one full StyleGAN2 iteration (G main, D main)
with lazy R1 amortized by timing ``r1_interval`` consecutive steps where possible. Prints images/s per variant
and the ratio.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def measure(precision: str, batch: int, steps: int) -> dict:
    import torch

    from handsoff.generator.training import TrainingConfig, build_state, train_step
    from handsoff.runtime import tune_allocator

    tune_allocator()
    config = TrainingConfig(data="", out="", precision=precision, batch=batch)
    state = build_state(config, torch.device("cpu"))
    reals = torch.rand(batch, 3, config.resolution, config.resolution) * 2 - 1
    train_step(state, reals, config)  # warm-up (includes the first R1 step)
    start = time.perf_counter()
    for _ in range(steps):
        train_step(state, reals, config)
    seconds = time.perf_counter() - start
    return {"images_per_s": steps * batch / seconds, "r1_steps": (steps + config.r1_interval - 2) // config.r1_interval,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "config": {k: getattr(config, k) for k in ("resolution", "z_dim", "w_dim", "n_mlp", "channel_base",
                                                         "channel_max", "num_fp16_res")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--worker", choices=["fp32", "mixed"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.worker, args.batch, args.steps)))
        return

    results: dict[str, list[dict]] = {"fp32": [], "mixed": []}
    for _ in range(args.rounds):
        for precision in results:
            out = subprocess.run([sys.executable, __file__, "--worker", precision, "--batch", str(args.batch),
                                  "--steps", str(args.steps)], capture_output=True, text=True, check=True)
            results[precision].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"config: {results['fp32'][0]['config']}, batch {args.batch}, {args.steps} steps x {args.rounds} rounds")
    print(f"{'precision':<10}{'images/s (best)':>18}{'images/s (mean)':>18}{'peak RSS MiB':>14}")
    best = {}
    for precision, runs in results.items():
        rates = [r["images_per_s"] for r in runs]
        best[precision] = max(rates)
        print(f"{precision:<10}{max(rates):>18.2f}{sum(rates) / len(rates):>18.2f}"
              f"{max(r['peak_rss_mib'] for r in runs):>14.0f}")
    print(f"mixed (bf16) / fp32 training speed: {best['mixed'] / best['fp32']:.2f}x")


if __name__ == "__main__":
    main()

"""What the memory-heavy stages need at paper resolutions, planned on meta tensors (nothing is allocated).

    python benchmarks/memory.py                      # StyleGAN2 config-f at 256, 512 and 1024 px
    python benchmarks/memory.py --resolutions 256 --budgets 8 16

Per resolution: the generator's weights; inversion's memory per image of an optimization batch (what autograd
saves for one image's backward pass through the generator and the discriminator-feature distance, times
``STEP_MEMORY_FACTOR``, exactly what ``--batch`` auto-selection uses) and the batch it picks for each budget; the
generator features of one image (the label generator's fitting cache holds these, up to ``cache_gb``; generation
holds one batch of them). Measured peaks of a whole 256-px run are in the README.
"""

from __future__ import annotations

import argparse


def plan(resolution: int) -> dict:
    import torch

    from handsoff.generator import Discriminator, Generator
    from handsoff.inversion.optimize import STEP_MEMORY_FACTOR, saved_bytes_per_image
    from handsoff.inversion.perceptual import build_perceptual

    with torch.device("meta"):
        G = Generator(resolution=resolution, z_dim=512, w_dim=512, n_mlp=8, channel_base=32768,
                      channel_max=512).eval().requires_grad_(False)
        D = Discriminator(resolution=resolution, channel_base=32768, channel_max=512)
    weights = sum(p.numel() for p in G.parameters()) * 4 + sum(p.numel() for p in D.parameters()) * 4
    step = saved_bytes_per_image(G, build_perceptual("discriminator", D)) * STEP_MEMORY_FACTOR
    s = G.synthesis
    features = sum(c * r * r for c, r in zip(s.feature_channels, s.feature_resolutions)) * 4
    return {"weights_gib": weights / 2**30, "inversion_gib_per_image": step / 2**30,
            "features_gib_per_image": features / 2**30, "channels": sum(s.feature_channels)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--budgets", type=float, nargs="+", default=[8, 16, 40, 80], help="GiB")
    args = parser.parse_args()
    print(f"{'px':>5} {'G+D weights':>12} {'inversion / image':>18} {'features / image':>17} "
          + " ".join(f"{f'batch @ {b:g} GiB':>15}" for b in args.budgets))
    for res in args.resolutions:
        p = plan(res)
        held = p["weights_gib"] + 1.0  # weights plus about 1 GiB of torch and the data
        batches = [max(1, int((b - held) // p["inversion_gib_per_image"])) for b in args.budgets]
        print(f"{res:>5} {p['weights_gib']:>10.2f} G {p['inversion_gib_per_image']:>16.2f} G "
              f"{p['features_gib_per_image']:>15.3f} G " + " ".join(f"{b:>15d}" for b in batches))


if __name__ == "__main__":
    main()

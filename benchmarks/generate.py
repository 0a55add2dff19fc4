"""Labeled-image throughput of generation vs plain image generation, side by side in one run.

    python benchmarks/generate.py --label-generator runs/heads-pipeline/label_generator [--n 256] [--rounds 3]

Variants, alternated for ``--rounds`` rounds so that machine noise hits all (best round reported):
    images   G.mapping + G.synthesis only (what sampling a GAN costs)
    labeled  the same plus features, the label generator's ensemble at every label pixel and the decoding of
             every task with its uncertainty (``LabelGenerator.predict``), i.e. ``handsoff generate`` minus
             file writing, in the label precision 'auto' picks on this machine (``--label-precision``)
    labeled-fp32  the same in fp32, where 'auto' picks bf16
    written  the whole ``generate_dataset`` run, files and all (one round, into a temporary folder)

The goal (issue 7): labels cost at most 25% extra over the generator, i.e. labeled / images >= 0.8.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from handsoff.generation import GenerationConfig, generate_dataset
from handsoff.generator.sampling import latents_for_seeds
from handsoff.label_generator import load_label_generator
from handsoff.label_generator.model import LABEL_PRECISIONS, resolve_label_precision
from handsoff.runtime import tune_allocator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label-generator", required=True)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--class-frequency", type=int, default=0, metavar="N",
                        help="also generate N images (after filtering) and compare their class frequencies with N "
                        "real rendered heads (heads label generators only)")
    parser.add_argument("--truncation", type=float, default=0.7)
    parser.add_argument("--label-precision", choices=LABEL_PRECISIONS, default="auto")
    args = parser.parse_args()
    tune_allocator()
    model = load_label_generator(args.label_generator)
    G = model.G
    z = latents_for_seeds(0, range(args.n), G.z_dim)
    chosen = resolve_label_precision(args.label_precision, "cpu")
    precisions = {"labeled": chosen, **({"labeled-fp32": "fp32"} if chosen != "fp32" else {})}
    rates = {"images": [], **{name: [] for name in precisions}}
    with torch.no_grad():
        for p in precisions.values():
            model.predict_z(z[:args.batch], precision=p)  # warm-up
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            for i in range(0, args.n, args.batch):
                G(z[i:i + args.batch], truncation_psi=0.7)
            rates["images"].append(args.n / (time.perf_counter() - t0))
            for name, p in precisions.items():
                t0 = time.perf_counter()
                for i in range(0, args.n, args.batch):
                    model.predict_z(z[i:i + args.batch], truncation_psi=0.7, precision=p)
                rates[name].append(args.n / (time.perf_counter() - t0))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        generate_dataset(model, f"{tmp}/ds", GenerationConfig(n=args.n, batch=args.batch, label_precision=chosen),
                         progress=False)
        written = args.n / (time.perf_counter() - t0)
    tasks = ",".join(t.name for t in model.tasks)
    e = model.ensemble
    print(f"generator {G.img_resolution} px, label generator: {tasks}, {e.members} members {e.hidden}/{e.hidden2}, "
          f"labels {model.label_size} px in {chosen} (--label-precision {args.label_precision}); n={args.n}, "
          f"batch {args.batch}, {torch.get_num_threads()} threads")
    print(f"{'variant':<10}{'img/s (best)':>14}{'img/s (mean)':>14}")
    for name, r in rates.items():
        print(f"{name:<10}{max(r):>14.1f}{sum(r) / len(r):>14.1f}")
    print(f"{'written':<10}{written:>14.1f}{'':>14}")
    ratio = max(rates["labeled"]) / max(rates["images"])
    print(f"labeled / images throughput: {ratio:.2f} (labels cost {100 * (1 / ratio - 1):.0f}% extra; "
          f"goal <= 25%)")
    if args.class_frequency:
        class_frequency(model, args.class_frequency, args.truncation, args.batch)


def class_frequency(model, n: int, truncation: float, batch: int) -> None:
    """Class frequencies of a generated heads dataset (n kept images) vs n real rendered heads (test split)."""
    import json
    import math

    import numpy as np

    from handsoff.domains import heads
    from handsoff.metrics.labels import presence_pixels

    n_total = math.ceil(n / 0.9)
    with tempfile.TemporaryDirectory() as tmp:
        generate_dataset(model, f"{tmp}/ds", GenerationConfig(n=n_total, batch=batch, truncation=truncation))
        stats = json.loads(open(f"{tmp}/ds/dataset.json").read())["source"]["statistics"]
    real = np.concatenate([heads.render_heads(heads.SPLIT_SEEDS["test"], range(i, min(i + 64, n)), 64).masks
                           for i in range(0, n, 64)]).astype(np.int64)
    counts = np.stack([np.bincount(m.reshape(-1), minlength=len(heads.CLASSES)) for m in real])
    pixel_share = counts.sum(0) / counts.sum()
    image_share = (counts >= presence_pixels(64 * 64)).mean(0)
    print(f"\nclass frequencies: {stats['counts']['kept']} generated (truncation {truncation}, 10% most uncertain "
          f"dropped) vs {n} real rendered heads")
    print(f"{'class':<11}{'pixels gen':>11}{'pixels real':>12}{'images gen':>11}{'images real':>12}")
    for i, c in enumerate(heads.CLASSES):
        print(f"{c:<11}{stats['class_pixel_share'][c]:>11.4f}{pixel_share[i]:>12.4f}"
              f"{stats['class_image_share'][c]:>11.3f}{image_share[i]:>12.3f}")


if __name__ == "__main__":
    main()

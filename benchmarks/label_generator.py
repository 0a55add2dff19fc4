"""Label generator cost: factorized hypercolumn vs materialized, per image and for training memory.

    python benchmarks/label_generator.py                       # FFHQ config-f layout @ 512 px labels + heads-64
    python benchmarks/label_generator.py --skip-ffhq           # only the shipped heads generator

Each measurement runs in its own subprocess (so peak RSS is its own), with the tuned allocator:

* predict: features (G synthesis) + a 10-member 256/32 ensemble at every label pixel, per image.
  factorized = ``LabelGenerator.dense_outputs`` (first layer per resolution group at native resolution; per band
  of label rows, one product for the groups at the label resolution and, per block of pixels, one for the lower
  groups' results interpolated in height against their width-interpolation weights; see ``first_layer_bands``);
  materialized = every feature map resized to the label size and concatenated (C x L x L), then the ensemble
  on each pixel's hypercolumn (the official code's design), run only where it fits in memory. Their times come
  from one process that runs them alternately (the fastest of ``--reps`` runs; medians also printed): this
  machine is shared, and the factorized path, bound by memory traffic more than the materialized one, moves
  with its neighbours' load.
* train: peak RSS of ``fit_label_generator`` on 50 images (a few steps), next to the size of the materialized
  design's hypercolumns for the same 50 images (C x L x L x 4 bytes each, what the official code holds in RAM).

Arithmetic: both designs in fp32, and also both in bf16 where handsoff's 'auto' label precision takes bf16 on this
machine (bf16 matrix products measured faster than fp32: ``label_generator.model.resolve_label_precision``).
Speedups are reported with both designs in the same arithmetic: only then is the share of the bound meaningful.
Where bf16 is the default, handsoff's default (factorized bf16) against the official design as it runs
(materialized fp32) is printed too.

FFHQ uses random weights (speed and memory do not depend on them). The last line,
``factorized speedup (fp32): N.Nx, training peak RSS: N.N GB``, is for 512 px labels and 50 images. Also printed:
the multiply-adds of both designs, whose ratio bounds the speedup any factorized implementation can reach at equal
arithmetic speed.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import time

FFHQ = dict(resolution=1024, z_dim=512, w_dim=512, n_mlp=8, channel_base=32768, channel_max=512)


def _generator(which: str):
    import torch

    from handsoff.generator import Generator, load_generator

    if which == "ffhq":
        torch.manual_seed(0)
        return Generator(**FFHQ, num_fp16_res=4).eval().requires_grad_(False)
    return load_generator("heads-64")


def _model(G, label_size: int, classes: int = 8):
    import torch

    from handsoff.label_generator import LabelGenerator, Segmentation

    torch.manual_seed(0)
    return LabelGenerator(G, [Segmentation([str(i) for i in range(classes)])], label_size).eval()


def measure_predict(which: str, label_size: int, modes: list[str], reps: int) -> dict:
    """Seconds per image of ``modes`` ("factorized fp32", "materialized bf16", ...: design and arithmetic), run
    alternately ``reps`` times after one warm-up each, so that all see the same machine: the fastest run of each (as
    ``timeit`` reports: slower runs are other processes' interference) and, under "median", the medians; peak RSS
    of this process."""
    import statistics

    import torch

    from handsoff.label_generator.features import materialized_hypercolumns
    from handsoff.label_generator.model import LABEL_DTYPES

    G = _generator(which)
    model = _model(G, label_size)
    ws = G.mapping(torch.randn(1, G.z_dim, generator=torch.Generator().manual_seed(1)))
    e = model.ensemble
    ensembles = {p: e if p == "fp32" else copy.deepcopy(e).to(LABEL_DTYPES[p])  # the materialized design's
                 for design, p in map(str.split, modes) if design == "materialized"}
    times = {mode: {"features": [], "ensemble": []} for mode in modes}
    with torch.no_grad():
        for rep in range(reps + 1):  # the first repetition warms up and is not counted
            for mode in modes:
                design, precision = mode.split()
                dtype = LABEL_DTYPES[precision]
                t0 = time.perf_counter()
                _, feats = model.features(ws)
                t1 = time.perf_counter()
                if design == "factorized":
                    out = model.dense_outputs(feats, dtype=dtype)
                else:  # the official design: hypercolumns materialized in the ensemble's dtype, rows in chunks
                    ensemble = ensembles[precision]
                    hyper = materialized_hypercolumns(feats, label_size)[0].to(dtype)          # (C, L, L)
                    rows = hyper.reshape(hyper.shape[0], -1).t()
                    out = torch.cat([ensemble(rows[i:i + 16384]) for i in range(0, len(rows), 16384)])
                    del hyper, rows
                t2 = time.perf_counter()
                if rep:
                    times[mode]["features"].append(t1 - t0)
                    times[mode]["ensemble"].append(t2 - t1)
                del out
    result = {"channels": sum(G.synthesis.feature_channels),
              "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    for mode, t in times.items():
        total = [f + e for f, e in zip(t["features"], t["ensemble"])]
        result[mode] = {"features": min(t["features"]), "ensemble": min(t["ensemble"]), "total": min(total),
                        "median": {"ensemble": statistics.median(t["ensemble"]), "total": statistics.median(total)}}
    return result


def multiply_adds(which: str, label_size: int) -> dict:
    """Multiply-adds per image of the ensemble (all layers), factorized vs materialized, and the hypercolumn's
    channels: the ratio is the most a factorized implementation can gain at equal arithmetic speed (groups at or
    above the label resolution cost the same either way)."""
    from handsoff.label_generator.features import feature_groups

    G = _generator(which)
    model = _model(G, label_size)
    e = model.ensemble
    width = e.members * e.hidden
    rest = label_size**2 * e.members * (e.hidden * e.hidden2 + e.hidden2 * e.out_channels)
    groups = feature_groups(G.synthesis.feature_channels, G.synthesis.feature_resolutions)
    factorized = sum(min(g.resolution, label_size)**2 * (g.stop - g.start) for g in groups) * width + rest
    materialized = label_size**2 * groups[-1].stop * width + rest
    return {"factorized": factorized, "materialized": materialized, "channels": groups[-1].stop}


def measure_train(which: str, label_size: int, images: int, steps: int) -> dict:
    import tempfile

    import numpy as np
    import torch

    from handsoff.label_generator import fit_label_generator

    G = _generator(which)
    model = _model(G, label_size)
    ws = G.mapping(torch.randn(images, G.z_dim, generator=torch.Generator().manual_seed(2)))
    rng = np.random.default_rng(0)
    samples = [{"name": f"i{i}", "image": np.zeros((G.img_resolution, G.img_resolution, 3), np.uint8),
                "mask": rng.integers(0, 8, (label_size, label_size))} for i in range(images)]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        fit_label_generator(model, ws, samples, tmp, max_steps=steps, min_steps=steps, images_per_step=4,
                            pixels_per_image=1024, progress=False)
        seconds = time.perf_counter() - t0
    channels = sum(G.synthesis.feature_channels)
    return {"seconds_per_step": seconds / steps, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            / 2**20, "materialized_gb": images * channels * label_size**2 * 4 / 2**30, "channels": channels}


def run(kind: str, which: str, label_size: int, **kw) -> dict:
    args = [sys.executable, __file__, "--worker", kind, which, str(label_size), json.dumps(kw)]
    out = subprocess.run(args, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["killed"])[-1], "returncode": out.returncode}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from handsoff.label_generator.model import LABEL_PRECISIONS, resolve_label_precision

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--skip-ffhq", action="store_true")
    parser.add_argument("--skip-heads", action="store_true")
    parser.add_argument("--precision", choices=LABEL_PRECISIONS, default="auto",
                        help="label-map arithmetic to time beside fp32 (auto: bf16 where it measures faster)")
    parser.add_argument("--materialize-limit-gb", type=float, default=14.0,
                        help="skip the materialized run where its hypercolumn would exceed this")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    from handsoff.runtime import tune_allocator

    tune_allocator()
    if args.worker:
        kind, which, size, kw = args.worker
        fn = measure_predict if kind == "predict" else measure_train
        print(json.dumps(fn(which, int(size), **json.loads(kw))))
        return

    import torch

    # fp32, and bf16 where handsoff's 'auto' takes it on this machine (bf16 products measured faster than fp32).
    chosen = resolve_label_precision(args.precision, "cpu")
    precisions = ["fp32"] + (["bf16"] if chosen == "bf16" else [])
    print(f"label maps: --precision {args.precision} -> {chosen} on this CPU "
          f"({torch.get_num_threads()} threads)")
    cases = ([] if args.skip_heads else [("heads-64", 64)]) + ([] if args.skip_ffhq else [("ffhq", 512)])
    final = None
    for which, size in cases:
        # Peak RSS of the factorized path on its own; the times come from one process that alternates the variants
        # (the materialized design only where its hypercolumn fits in memory).
        macs = multiply_adds(which, size)
        bound = macs["materialized"] / macs["factorized"]
        mat_gb = macs["channels"] * size**2 * 4 / 2**30
        fits = mat_gb <= args.materialize_limit_gb
        alone = run("predict", which, size, modes=[f"factorized {chosen}"], reps=1)
        modes = [f"{design} {p}" for p in precisions for design in ("factorized", "materialized")] if fits else \
            [f"factorized {p}" for p in precisions]
        paired = run("predict", which, size, modes=modes, reps=args.reps)
        print(f"\n{which}: {macs['channels']} feature channels, labels {size}x{size} "
              f"(one materialized hypercolumn: {mat_gb:.2f} GB in fp32); seconds per image: the fastest of "
              f"{args.reps} runs, all variants alternating in one process")
        print(f"{'per image':<20}{'features s':>12}{'ensemble s':>12}{'total s':>10}")
        for mode in modes + ([] if fits else ["materialized fp32"]):
            r = paired.get(mode, {"error": f"hypercolumn {mat_gb:.1f} GB > limit"})
            if "error" in r:
                print(f"{mode:<20}  not run: {r['error']}")
            else:
                print(f"{mode:<20}{r['features']:>12.3f}{r['ensemble']:>12.3f}{r['total']:>10.3f}")
        print(f"factorized {chosen} alone: peak RSS {alone['peak_rss_gb']:.2f} GB")
        print(f"multiply-adds per image: factorized {macs['factorized'] / 1e9:.1f} G, materialized "
              f"{macs['materialized'] / 1e9:.1f} G -> arithmetic bound on the speedup {bound:.1f}x at equal "
              "arithmetic speed")
        speedups = {}
        for p in precisions:
            f, m = paired.get(f"factorized {p}"), paired.get(f"materialized {p}")
            if not (f and m and "error" not in f and "error" not in m):
                continue
            speedups[p] = speedup = m["ensemble"] / f["ensemble"]
            median = m["median"]["ensemble"] / f["median"]["ensemble"]
            print(f"speedup, both designs in {p} (ensemble incl. first layer): {speedup:.1f}x (medians: "
                  f"{median:.1f}x); with features: {m['total'] / f['total']:.1f}x; share of the bound reached: "
                  f"{speedup / bound:.0%} (medians: {median / bound:.0%})")
        if chosen != "fp32" and "materialized fp32" in paired and "error" not in paired["materialized fp32"]:
            versus = paired["materialized fp32"]["ensemble"] / paired[f"factorized {chosen}"]["ensemble"]
            print(f"handsoff's default here (factorized {chosen}) vs the official design (materialized fp32): "
                  f"{versus:.1f}x ({versus / bound:.0%} of the equal-arithmetic bound; {chosen} arithmetic is "
                  "faster, so this may exceed it)")
        train = run("train", which, size, images=50, steps=args.train_steps)
        if "error" in train:
            print(f"training on 50 images: failed ({train['error']})")
        else:
            print(f"training on 50 images: peak RSS {train['peak_rss_gb']:.2f} GB "
                  f"({train['seconds_per_step']:.2f} s/step) vs materialized hypercolumns "
                  f"{train['materialized_gb']:.0f} GB ({train['materialized_gb'] / train['peak_rss_gb']:.0f}x)")
        if size == 512:
            final = (speedups.get("fp32", float("nan")), train.get("peak_rss_gb", float("nan")))
    if final:
        print(f"factorized speedup (fp32): {final[0]:.1f}x, training peak RSS: {final[1]:.1f} GB")


if __name__ == "__main__":
    main()

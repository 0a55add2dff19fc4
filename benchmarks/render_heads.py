"""Rendering speed of the heads domain, and the label statistics of a large render.

    python benchmarks/render_heads.py --n 10000          # images/s, projected time for 10k, class table

Renders in batches in this process (with handsoff's allocator settings, as the CLI), then prints images/s for
rendering alone and for rendering + writing the standard layout, and, over all rendered images, the share of
images containing each class, the mean pixel share of each class, and keypoint visibility rates.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from handsoff.domains.heads import CLASSES, KEYPOINTS, render_heads, write_heads_dataset
from handsoff.runtime import tune_allocator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--write-n", type=int, default=1000, help="images rendered and written to disk")
    args = parser.parse_args()
    tune_allocator()

    present = np.zeros(len(CLASSES))
    pixels = np.zeros(len(CLASSES))
    visible = np.zeros(len(KEYPOINTS))
    start = time.perf_counter()
    for first in range(0, args.n, args.batch):
        r = render_heads(args.seed, range(first, min(first + args.batch, args.n)), args.size)
        for c in range(len(CLASSES)):
            present[c] += (r.masks == c).any(axis=(1, 2)).sum()
            pixels[c] += (r.masks == c).mean(axis=(1, 2)).sum()
        visible += (r.keypoints[..., 2] == 2).sum(0)
    render_s = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        write_heads_dataset(f"{tmp}/d", args.write_n, seed=args.seed, size=args.size, batch=args.batch,
                            progress=False)
        write_s = time.perf_counter() - start

    print(f"render only: {args.n} images at {args.size} px in {render_s:.1f} s = {args.n / render_s:.1f} images/s")
    print(f"render + write layout: {args.write_n / write_s:.1f} images/s "
          f"(10,000 images in {10_000 / (args.write_n / write_s) / 60:.1f} min)")
    print(f"\n{'class':12} {'images with it':>15} {'mean pixel share':>17}")
    for c, name in enumerate(CLASSES):
        print(f"{name:12} {present[c] / args.n:15.1%} {pixels[c] / args.n:17.2%}")
    print(f"\n{'keypoint':20} {'visible':>8}")
    for k, name in enumerate(KEYPOINTS):
        print(f"{name:20} {visible[k] / args.n:8.1%}")


if __name__ == "__main__":
    main()

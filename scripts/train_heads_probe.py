"""Train the measuring probe shipped in handsoff/weights/probes/heads-64 (see handsoff.metrics.probe).

    python scripts/train_heads_probe.py [--n 6000] [--epochs 6] [--out handsoff/weights/probes/heads-64]
    python scripts/train_heads_probe.py --framing portrait     # -> handsoff/weights/probes/heads-portrait-64

Trains on the renderer's oracle split and reports, on 1,000 images of the (disjoint) reference split, the
oracle segmenter's pixel accuracy and mIoU and the factor regression's R^2.
"""

import argparse
import time

import numpy as np
import torch

from handsoff.domains import heads
from handsoff.generator.checkpoints import SHIPPED_DIR
from handsoff.metrics.gan_quality import render_real, train_heads_probe
from handsoff.metrics.probe import save_probe
from handsoff.runtime import tune_allocator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=6000)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--framing", choices=list(heads.FRAMINGS), default="bust")
    parser.add_argument("--out", help="default: handsoff/weights/probes/heads-64 (bust) or heads-portrait-64")
    args = parser.parse_args()
    out_dir = args.out or str(SHIPPED_DIR / "probes" / heads.SHIPPED_NAMES[args.framing])
    tune_allocator()
    t0 = time.perf_counter()
    probe = train_heads_probe(n=args.n, epochs=args.epochs, framing=args.framing)
    seconds = time.perf_counter() - t0

    images, masks, factors = render_real(heads.SPLIT_SEEDS["reference"], 0, 1000, framing=args.framing)
    pred = probe.segment(images)
    k = len(heads.CLASSES)
    inter = torch.bincount((masks * k + pred).reshape(-1), minlength=k * k).reshape(k, k).double()
    iou = inter.diag() / (inter.sum(0) + inter.sum(1) - inter.diag()).clamp(min=1)
    targets = heads.probe_targets(factors, masks.numpy())
    with torch.no_grad():
        out = torch.cat([probe(images[i:i + 256])["factors"] for i in range(0, len(images), 256)]).double().numpy()
    mean, std = np.array(probe.config["target_mean"]), np.array(probe.config["target_std"])
    pred_targets = out * std + mean
    r2 = 1 - ((pred_targets - targets) ** 2).sum(0) / ((targets - targets.mean(0)) ** 2).sum(0).clip(1e-12)
    metrics = {"pixel_accuracy": float((pred == masks).double().mean()), "miou": float(iou.mean()),
               "iou": {c: round(float(v), 4) for c, v in zip(heads.CLASSES, iou)},
               "factor_r2_median": float(np.median(r2)), "train_images": args.n, "epochs": args.epochs,
               "train_seconds": round(seconds)}
    save_probe(probe, out_dir, metadata={"trained_on": f"heads oracle split (seed {heads.SPLIT_SEEDS['oracle']}), "
                                     f"{args.n} images, {args.framing} framing", "framing": args.framing,
                                     "reference_split_metrics": metrics})
    print(metrics)


if __name__ == "__main__":
    main()

"""Inversion and label-generator quality on the heads domain (the figures of issues 5 and 6).

    python benchmarks/heads_pipeline.py --encoder runs/encoder-heads-64 [--generator heads-64] [--out runs/hp]
    python benchmarks/heads_pipeline.py --framing portrait --generator runs/heads-portrait-64/network-00100000

1. Inversion of 50 labeled real heads (labeled split; never the GAN's training set): mean MSE / PSNR /
   perceptual distance for the average latent, the encoder, encoder + optimization; seconds per image; and
   the oracle check: the probe's segmentation of each reconstruction against the real image's true mask
   (dataset-level mIoU), next to the probe on the real images themselves (its own ceiling).
2. Label generator fitted on the first 16 inverted images (seg, kp, depth), applied to the latents of 100
   held-out real heads (test split, inverted the same way), scored against their true labels: mIoU, PCK,
   depth RMSE. This measures the label generator before any downstream network.

Writes OUT/results.json, OUT/inversion.png (real | encoder | refined) and the fitted label generator.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from handsoff.domains import heads
from handsoff.generator import load_networks
from handsoff.generator.checkpoints import SHIPPED_DIR
from handsoff.inversion import build_perceptual, invert_images, load_encoder, summarize
from handsoff.label_generator import LabelGenerator, fit_label_generator, save_label_generator
from handsoff.metrics.labels import confusion_matrix, depth_errors, miou, pck
from handsoff.metrics.probe import load_probe
from handsoff.runtime import tune_allocator
from handsoff.tasks import tasks_from_card
from handsoff.visualize import image_grid, save_image_atomic


def render_split(split: str, n: int, size: int, framing: str) -> dict:
    r = heads.render_heads(heads.SPLIT_SEEDS[split], range(n), size, framing)
    images = torch.from_numpy(r.images).permute(0, 3, 1, 2).float() / 127.5 - 1
    return {"images": images, "masks": r.masks.astype(np.int64), "depth": r.depth, "keypoints": r.keypoints,
            "names": [f"{heads.SPLIT_SEEDS[split]:04d}_{i:07d}" for i in range(n)], "raw": r}


def oracle_miou(probe, images: torch.Tensor, masks: np.ndarray) -> float:
    pred = probe.segment(images.clamp(-1, 1))
    return miou(confusion_matrix(pred, masks, len(heads.CLASSES)), heads.CLASSES)["miou"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--framing", choices=sorted(heads.FRAMINGS), default="bust",
                        help="of the real heads; also picks the probe (the framing's) and the default generator")
    parser.add_argument("--generator", default=None, help="default: the framing's shipped generator")
    parser.add_argument("--encoder", default=None)
    parser.add_argument("--steps", type=int, default=500, help="optimization steps per image")
    parser.add_argument("--labeled", type=int, default=50)
    parser.add_argument("--fit-on", type=int, default=16)
    parser.add_argument("--held-out", type=int, default=100)
    parser.add_argument("--held-out-steps", type=int, default=None, help="steps for the held-out inversions")
    parser.add_argument("--members", type=int, default=10)
    parser.add_argument("--max-steps", type=int, default=3000)
    parser.add_argument("--out", type=Path, default=Path("runs/heads-pipeline"))
    parser.add_argument("--docs", type=Path, default=None, help="also write the reconstruction sheet here")
    args = parser.parse_args()
    args.generator = args.generator or heads.SHIPPED_NAMES[args.framing]
    tune_allocator()
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)

    nets = load_networks(args.generator)
    G, D = nets.generator, nets.discriminator
    perceptual = build_perceptual("discriminator", D)
    encoder = load_encoder(args.encoder) if args.encoder else None
    probe = load_probe(SHIPPED_DIR / "probes" / heads.SHIPPED_NAMES[args.framing])
    results: dict = {"generator": str(args.generator), "framing": args.framing, "encoder": args.encoder,
                     "steps": args.steps}

    labeled = render_split("labeled", args.labeled, G.img_resolution, args.framing)
    t0 = time.perf_counter()
    inv = invert_images(G, labeled["images"], perceptual, encoder, steps=args.steps)
    seconds = time.perf_counter() - t0
    stages = inv["stages"]
    results["inversion"] = {"images": args.labeled, "mean": summarize(stages),
                            "seconds_per_image": seconds / args.labeled,
                            "oracle_miou": {s: oracle_miou(probe, stages[s]["reconstructions"], labeled["masks"])
                                            for s in stages},
                            "oracle_miou_on_real_images": oracle_miou(probe, labeled["images"], labeled["masks"])}
    n = min(8, args.labeled)
    rows = torch.stack([labeled["images"][:n], stages["encoder"]["reconstructions"][:n],
                        stages["refined"]["reconstructions"][:n]], 1).reshape(-1, *labeled["images"].shape[1:])
    sheet = image_grid(rows.clamp(-1, 1), columns=3)
    save_image_atomic(sheet, args.out / "inversion.png")
    if args.docs:
        save_image_atomic(sheet, args.docs)
    print(json.dumps(results["inversion"], indent=1))

    # Label generator on the first fit_on inverted images.
    samples = [{"name": labeled["names"][i], "image": labeled["raw"].images[i], "mask": labeled["masks"][i],
                "depth": labeled["depth"][i], "keypoints": labeled["keypoints"][i]} for i in range(args.fit_on)]
    card = heads.dataset_card(G.img_resolution, heads.SPLIT_SEEDS["labeled"], args.framing)
    tasks = tasks_from_card(["seg", "kp", "depth"], card)
    model = LabelGenerator(G, tasks, G.img_resolution, members=args.members, generator_ref=str(args.generator))
    t0 = time.perf_counter()
    summary = fit_label_generator(model, inv["ws"][:args.fit_on], samples, args.out / "label_generator",
                                  max_steps=args.max_steps)
    summary["seconds"] = time.perf_counter() - t0
    save_label_generator(model, args.out / "label_generator", metadata={"fit": summary,
                                                                       "labels_card": card.to_json()})

    held = render_split("test", args.held_out, G.img_resolution, args.framing)
    inv_held = invert_images(G, held["images"], perceptual, encoder,
                             steps=args.held_out_steps if args.held_out_steps is not None else args.steps)
    pred = model.predict(inv_held["ws"])
    conf = sum(confusion_matrix(p["label"], m, len(heads.CLASSES)) for p, m in zip(pred["seg"], held["masks"]))
    kp_pred = np.stack([p["label"].numpy() for p in pred["kp"]])
    results["label_generator"] = {
        "fit_on": args.fit_on, "held_out": args.held_out, "fit": summary,
        "held_out_inversion": summarize(inv_held["stages"]),
        "segmentation": miou(conf, heads.CLASSES),
        "keypoints": pck(kp_pred, held["keypoints"], G.img_resolution),
        "depth": depth_errors([p["label"] for p in pred["depth"]], list(held["depth"])),
        "oracle_miou_of_reconstructions": oracle_miou(probe, inv_held["stages"]["refined"]["reconstructions"],
                                                      held["masks"]),
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    lg = results["label_generator"]
    print(f"label generator on {args.held_out} held-out inverted heads: mIoU {lg['segmentation']['miou']:.4f}, "
          f"PCK@0.05 {lg['keypoints']['pck@0.05']:.4f}, PCK@0.1 {lg['keypoints']['pck@0.1']:.4f}, "
          f"depth RMSE {lg['depth']['rmse']:.4f}")


if __name__ == "__main__":
    main()

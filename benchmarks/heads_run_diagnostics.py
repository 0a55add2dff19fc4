"""Where a heads run (``handsoff demo`` / ``handsoff run`` on rendered heads) loses, by the framing's oracle probe.

    python benchmarks/heads_run_diagnostics.py handsoff-demo

1. Reconstructions: the probe's segmentation of G(w) for every inverted labeled image against that image's true
   mask (dataset-level mIoU and IoU per class), next to the probe on the real images (its ceiling), and the PSNR
   of the reconstructions. The label generator learns from real masks laid over reconstructions: where they
   disagree (a brow a pixel off), it learns the wrong thing.
2. The generated dataset: the probe's segmentation of each generated image against the label the label
   generator wrote for it (mIoU, IoU per class; void pixels left out), and the share of images containing each
   class by the probe vs by the labels (a class drawn but never labeled, or labeled but never drawn, shows here).
3. Where the wrong labels are: the label generator labels ``--samples`` fresh latents (seed 123, the run's
   truncation) with its per-pixel uncertainty (the members' Jensen-Shannon divergence). Per class: the share of
   its labeled pixels in the most uncertain tenth and how often the probe agrees with them there and elsewhere;
   then the labels' mIoU against the probe over the pixels kept when the most uncertain 5, 10, 20% are left void
   (``generate --void-top``: per image), and with one threshold over all images.

The probe is ``handsoff/weights/probes/NAME`` of the framing the run's labeled data were rendered in. It is a
64-px CNN trained on real renders, so on generated images it is a judge with its own errors, not ground truth.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from handsoff.data.layout import LabeledFolder
from handsoff.domains import heads
from handsoff.generator import load_generator
from handsoff.generator.checkpoints import SHIPPED_DIR
from handsoff.inversion import load_latents
from handsoff.metrics.gan_quality import class_statistics
from handsoff.metrics.labels import confusion_matrix, miou
from handsoff.metrics.probe import load_probe
from handsoff.tasks.segmentation import VOID


def load_split(folder: Path, names: list[str] | None = None) -> tuple[list[str], torch.Tensor, np.ndarray]:
    """Images (N, 3, H, W) in [-1, 1] and masks (N, H, W) of a labeled folder (all, or ``names`` in order)."""
    data = LabeledFolder(folder)
    names = names or data.names
    samples = [data.load(n) for n in names]
    images = torch.from_numpy(np.stack([s["image"] for s in samples])).permute(0, 3, 1, 2).float() / 127.5 - 1
    return names, images, np.stack([s["mask"] for s in samples])


def scored(probe, images: torch.Tensor, masks: np.ndarray) -> dict:
    pred = probe.segment(images.clamp(-1, 1))
    labeled = masks != VOID
    result = miou(confusion_matrix(pred.numpy()[labeled], masks[labeled], len(heads.CLASSES)), heads.CLASSES)
    return {"miou": result["miou"], "iou": result["iou"], "prediction": pred}


def uncertainty_report(model, probe, samples: int, truncation: float) -> None:
    """Section 3: how the labels' disagreement with the probe is spread over their uncertainty."""
    z = torch.randn(samples, model.G.z_dim, generator=torch.Generator().manual_seed(123))
    labels, uncertainty, reference = [], [], []
    for i in range(0, samples, 16):
        result = model.predict_z(z[i:i + 16], truncation_psi=truncation, precision="fp32")
        reference.append(probe.segment(result["images"]))
        labels += [d["label"] for d in result["seg"]]
        uncertainty += [d["uncertainty"] for d in result["seg"]]
    label, js, ref = torch.stack(labels), torch.stack(uncertainty), torch.cat(reference)
    n = len(heads.CLASSES)

    def kept_miou(keep: torch.Tensor) -> float:
        return miou(confusion_matrix(label[keep], ref[keep], n), heads.CLASSES)["miou"]

    # One threshold over all images per fraction (a subsample: torch.quantile takes at most 2^24 values).
    thresholds = dict(zip((0.05, 0.1, 0.2), torch.quantile(js.flatten()[::7], torch.tensor([0.95, 0.9, 0.8])).tolist()))
    uncertain = js > thresholds[0.1]  # the most uncertain tenth
    agree = label == ref
    print(f"\n3. {samples} labeled latents (psi {truncation}): probe vs labels by the labels' uncertainty (JS)")
    print(f"{'':<26}" + "".join(f"{c[:7]:>8}" for c in heads.CLASSES))
    shares, certain, doubtful = {}, {}, {}
    for c, name in enumerate(heads.CLASSES):
        mine = label == c
        shares[name] = float((mine & uncertain).sum() / mine.sum().clamp(min=1))
        certain[name] = float((agree & mine & ~uncertain).sum() / (mine & ~uncertain).sum().clamp(min=1))
        doubtful[name] = float((agree & mine & uncertain).sum() / (mine & uncertain).sum().clamp(min=1))
    print(row("share in uncertain tenth", shares))
    print(row("agree, certain pixels", certain))
    print(row("agree, uncertain tenth", doubtful))
    everything = kept_miou(torch.ones_like(agree))
    for fraction in (0.05, 0.1, 0.2):
        per_image = js <= torch.quantile(js.flatten(1), 1 - fraction, dim=1)[:, None, None]
        overall = js <= thresholds[fraction]
        print(f"mIoU over kept pixels, void top {fraction:.0%}: per image {kept_miou(per_image):.3f}, one threshold "
              f"{kept_miou(overall):.3f} (all pixels {everything:.3f})")


def row(name: str, values: dict) -> str:
    return f"{name:<26}" + "".join(f"{v:>8.2f}" for v in values.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="output folder of `handsoff demo` or `handsoff run`")
    parser.add_argument("--samples", type=int, default=200, help="latents labeled for section 3")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    config = json.loads((args.run / "config.json").read_text())
    labeled = Path(config["labeled"])
    framing = LabeledFolder(labeled).card.source.get("framing", "bust")
    probe = load_probe(SHIPPED_DIR / "probes" / heads.SHIPPED_NAMES[framing])
    G = load_generator(config["generator"])
    header = f"{'':<26}" + "".join(f"{c[:7]:>8}" for c in heads.CLASSES)

    names, ws, _ = load_latents(args.run / "inversion" / "latents.safetensors")
    mirrored = args.run / "labeled-mirrored"  # label_generator.mirror: the labeled images and their mirrors
    _, reals, masks = load_split(mirrored if mirrored.is_dir() else labeled, names)
    reconstructions = G.synthesis(ws).clamp(-1, 1)
    psnr = float((10 * torch.log10(4 / ((reconstructions - reals) ** 2).mean((1, 2, 3)))).mean())
    real, rec = scored(probe, reals, masks), scored(probe, reconstructions, masks)
    print(f"{args.run}: {framing} heads, generator {config['generator']}\n\n"
          f"1. {len(names)} inverted labeled heads: reconstruction PSNR {psnr:.2f} dB; probe vs true masks, mIoU "
          f"{rec['miou']:.3f} on reconstructions, {real['miou']:.3f} on the real images\n{header}")
    print(row("IoU, real images", real["iou"]))
    print(row("IoU, reconstructions", rec["iou"]))

    _, images, labels = load_split(args.run / "dataset")
    gen = scored(probe, images, labels)
    n = len(heads.CLASSES)
    by_probe = class_statistics(gen["prediction"].long(), n)["presence"]
    # void pixels counted as background: presence of the other classes is what matters here
    by_labels = class_statistics(torch.from_numpy(np.where(labels == VOID, 0, labels)).long(), n)["presence"]
    print(f"\n2. {len(images)} generated heads: probe vs generated labels, mIoU {gen['miou']:.3f}\n{header}")
    print(row("IoU", gen["iou"]))
    print(row("present, by the probe", dict(zip(heads.CLASSES, by_probe))))
    print(row("present, by the labels", dict(zip(heads.CLASSES, by_labels))))

    from handsoff.label_generator import load_label_generator

    model = load_label_generator(args.run / "label_generator", generator=G)
    uncertainty_report(model, probe, args.samples, config["generation"]["truncation"])


if __name__ == "__main__":
    main()

"""Evaluate snapshots of a heads training run and ship the best as ``heads-64`` (handsoff/weights/heads-64).

    python scripts/ship_heads_generator.py runs/heads-64                # evaluate new snapshots, ship the best
    python scripts/ship_heads_generator.py runs/heads-64 --last 3 --n 2000
    python scripts/ship_heads_generator.py runs/heads-portrait-64 --framing portrait   # -> heads-portrait-64
    python scripts/ship_heads_generator.py runs/heads-portrait-64 --framing portrait --ship network-00360000

For each ``network-*`` snapshot not yet evaluated (results cached in RUN/fpd.json), computes the Frechet probe
distance against real rendered heads (see handsoff.metrics.gan_quality) and the real-vs-real floor with the
shipped probe. The snapshot with the lowest FPD is copied (G_ema + D, float32) into the package together with
its figures, training command and images seen, and a sample grid is written to docs/heads-64-samples.png.
Neighbouring snapshots differ in FPD by less than they differ in what the demo measures, so ``--ship NAME`` ships
a snapshot chosen by its demo instead (it must be evaluated, or among those this call evaluates).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from handsoff.domains import heads
from handsoff.fileio import atomic_save
from handsoff.generator import load_networks, save_networks
from handsoff.generator.checkpoints import SHIPPED_DIR
from handsoff.metrics.gan_quality import evaluate_generator, format_report, generate, render_real
from handsoff.metrics.probe import load_probe
from handsoff.runtime import tune_allocator
from handsoff.visualize import image_grid, save_image_atomic

ROOT = Path(__file__).parents[1]


def snapshot_images(snapshot: Path) -> int:
    """Images seen of a ``network-NNNNNNNN`` snapshot folder, from its name."""
    return int(snapshot.name.split("-")[1])


# train-gan flags for the TrainingConfig fields a heads run may change from their defaults.
TRAINING_FLAGS = {"channel_base": "--channel-base", "channel_max": "--channel-max", "lr": "--lr", "batch": "--batch",
                  "r1_gamma": "--gamma", "augment": "--augment", "init_from": "--init-from"}


def training_command(run: Path, images_seen: int, framing: str) -> str:
    """The commands that train ``run`` (from its training.json) to ``images_seen``, from rendering the data on; a run
    started ``--init-from`` another is preceded by the source's commands up to the images the source had then."""
    from handsoff.generator.training import TrainingConfig

    config = json.loads((run / "training.json").read_text())
    defaults = TrainingConfig(data="", out="")
    flags = "".join(f" {flag} {config[k]}" for k, flag in TRAINING_FLAGS.items()
                    if config.get(k) is not None and config[k] != getattr(defaults, k))
    train = (f"handsoff train-gan --data {config['data']} --out {config['out']} --size {config['resolution']} "
             f"--images {images_seen} --snapshot {config['snapshot_images']} --tick {config['tick_images']} "
             f"--seed {config['seed']}{flags}")
    source = config.get("init_from")
    if not source:
        flag = "" if framing == "bust" else f" --framing {framing}"
        return f"handsoff render-heads --out {config['data']} --n 50000 --seed 4 --size 64{flag} && {train}"
    # The source's state is saved with each of its snapshots, so the run started from the source's last snapshot
    # before this run's first logged tick.
    first = json.loads((run / "log.jsonl").read_text().splitlines()[0])["images_seen"]
    start = max(images for images in map(snapshot_images, Path(source).glob("network-*")) if images < first)
    return f"{training_command(Path(source), start, framing)} && {train}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--n", type=int, default=2000, help="images per set for the Frechet distance")
    parser.add_argument("--last", type=int, default=2, help="evaluate at most this many newest snapshots")
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--no-ship", action="store_true")
    choice.add_argument("--ship", metavar="SNAPSHOT",
                        help="ship this snapshot (e.g. network-00360000, chosen by the demo), not the lowest FPD")
    parser.add_argument("--framing", choices=list(heads.FRAMINGS), default="bust",
                        help="the heads framing the run was trained on (bust ships heads-64, portrait "
                             "heads-portrait-64); measured with that framing's probe and real heads")
    args = parser.parse_args()
    name = heads.SHIPPED_NAMES[args.framing]  # generator and probe share the name
    tune_allocator()
    torch.set_grad_enabled(False)

    cache_path = args.run / "fpd.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    snapshots = sorted(p for p in args.run.glob("network-*") if p.is_dir())
    new = [s for s in snapshots if s.name not in cache]
    to_evaluate = new[-args.last:] if args.last > 0 else []
    if args.ship and args.ship not in cache and args.ship not in {s.name for s in to_evaluate}:
        parser.error(f"--ship {args.ship}: neither in {cache_path} nor among the snapshots to evaluate "
                     f"({', '.join(s.name for s in to_evaluate) or 'none'}; see --last)")
    if to_evaluate:  # the probe and two sets of real heads only when there is something to measure
        probe = load_probe(SHIPPED_DIR / "probes" / name)
        seed_ref = heads.SPLIT_SEEDS["reference"]
        reals = tuple(render_real(seed_ref, first, args.n, framing=args.framing)[0] for first in (0, args.n))
    for snap in to_evaluate:
        G = load_networks(snap).generator
        result = evaluate_generator(G, probe, n=args.n, reals=reals)
        result["images_seen"] = snapshot_images(snap)
        cache[snap.name] = result
        print(f"{snap.name}:\n{format_report(result)}")
        atomic_save(cache_path, lambda tmp: tmp.write_text(json.dumps(cache, indent=1)))
    if args.no_ship or not cache:
        return

    best_name = args.ship or min(cache, key=lambda k: cache[k]["fpd"])
    best = cache[best_name]
    shipped = SHIPPED_DIR / name
    if not args.ship and (shipped / "config.json").exists():
        current = json.loads((shipped / "config.json").read_text())["metadata"].get("figures", {})
        if current.get("fpd", float("inf")) <= best["fpd"] and current.get("n") == best["n"]:
            print(f"shipped {name} (FPD {current['fpd']:.3f}) is at least as good as {best_name}; kept")
            return
    nets = load_networks(args.run / best_name)
    training = json.loads((args.run / best_name / "config.json").read_text())["metadata"].get("training", {})
    metadata = {"name": name, "framing": args.framing,
                "trained_on": f"50,000 rendered heads, seed 4 (the 'gan' split), 64 px, {args.framing} framing",
                "training_command": training_command(args.run, best["images_seen"], args.framing),
                "images_seen": best["images_seen"],
                "snapshot": best_name,
                "training": training, "figures": {k: best[k] for k in ("n", "fpd", "fpd_real_floor", "fpd_ratio")},
                "class_statistics": best["classes"]}
    save_networks(shipped, nets.generator, nets.discriminator, metadata=metadata, overwrite=True)
    images = generate(nets.generator, 32, seed=0, truncation=1.0, progress=False)
    save_image_atomic(image_grid(images, columns=8), ROOT / "docs" / f"{name}-samples.png")
    print(f"shipped {best_name} as {name}: FPD {best['fpd']:.3f} (floor {best['fpd_real_floor']:.3f}, "
          f"{best['fpd_ratio']:.2f}x), {best['images_seen']} images seen")


if __name__ == "__main__":
    main()

"""The ``handsoff`` command line: one subcommand per pipeline stage."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from handsoff.domains.heads import DEFAULT_FRAMING, FRAMINGS, SHIPPED_NAMES
from handsoff.downstream.model import ARCHITECTURES
from handsoff.downstream.train import SCHEDULES
from handsoff.errors import UsageError
from handsoff.generator.trunk import Trunk
from handsoff.label_generator.model import LABEL_PRECISIONS
from handsoff.runtime import resolve_device
from handsoff.tasks import DEFAULT_TASKS, KEYPOINT_SIGMA, TASK_NAMES

PIPELINE = """\
data: render-heads renders the embedded domain; import-data converts labeled data; show draws a contact sheet
pipeline (HandsOff, Xu et al. CVPR 2023):
  0. generator     a StyleGAN2 checkpoint: init-generator, convert, sample; train-gan trains one
  1. inversion     put each labeled real image into W+: train-encoder, invert
  2. label gen.    fit an MLP ensemble on generator features of the inverted images: fit
  3. generation    sample latents, predict labels, filter by uncertainty: generate
  4. evaluation    train a downstream network on the dataset, test on real images:
                   train-downstream, evaluate, benchmark
  demo runs every stage on the embedded heads domain; run does the same for your domain from a config file.
"""

# Defaults of init-generator: a slim 64 px StyleGAN2, widths chosen for CPU speed.
SLIM_GENERATOR = dict(resolution=64, z_dim=256, w_dim=256, n_mlp=8, channel_base=8192, channel_max=256)


@torch.no_grad()
def sample_images(G: Trunk, n: int, seed: int, truncation: float, batch: int, force_fp32: bool = False) -> torch.Tensor:
    """n images (n, C, R, R) in [-1, 1] for sample indices 0..n-1 of ``seed``, with a progress bar."""
    from handsoff.generator import latents_for_seeds

    device = G.w_avg.device
    images = []
    with tqdm(total=n, desc="sampling", unit="img") as bar:
        for start in range(0, n, batch):
            z = latents_for_seeds(seed, range(start, min(start + batch, n)), G.z_dim).to(device)
            images.append(G(z, truncation_psi=truncation, force_fp32=force_fp32).cpu())
            bar.update(len(z))
    return torch.cat(images)


def cmd_sample(args) -> int:
    from handsoff.generator import load_generator
    from handsoff.visualize import image_grid, save_image_atomic

    G = load_generator(args.checkpoint, device=resolve_device(args.device))
    images = sample_images(G, args.n, args.seed, args.truncation, args.batch, force_fp32=args.fp32)
    out = save_image_atomic(image_grid(images), args.out)
    print(f"wrote {out} ({args.n} samples, seed {args.seed}, truncation {args.truncation})")
    return 0


def cmd_convert(args) -> int:
    from handsoff.generator import load_networks, save_networks

    nets = load_networks(args.input)
    out = save_networks(args.output, nets.generator, nets.discriminator,
                        metadata={"converted_from": Path(args.input).name, "source_format": nets.source_format},
                        overwrite=args.force)
    what = "generator + discriminator" if nets.discriminator is not None else "generator"
    print(f"wrote {out} ({what}, {nets.source_format} format, config {nets.generator.config})")
    return 0


def build_random_networks(config: dict, seed: int):
    """A randomly initialized generator (w_avg estimated) and matching discriminator, deterministic by seed."""
    from handsoff.generator import Discriminator, Generator

    torch.manual_seed(seed)
    G = Generator(**config)
    G.mapping.update_w_avg(seed=seed)
    D = Discriminator(resolution=config["resolution"], channel_base=config["channel_base"],
                      channel_max=config["channel_max"], img_channels=config.get("img_channels", 3))
    return G.eval(), D.eval()


def cmd_init_generator(args) -> int:
    from handsoff.generator import save_networks

    config = dict(resolution=args.resolution, z_dim=args.z_dim, w_dim=args.w_dim, n_mlp=args.n_mlp,
                  channel_base=args.channel_base, channel_max=args.channel_max)
    G, D = build_random_networks(config, args.seed)
    out = save_networks(args.out, G, D, metadata={"init": "random", "seed": args.seed}, overwrite=args.force)
    print(f"wrote {out} (randomly initialized, seed {args.seed}, config {G.config})")
    return 0


def _summary(results: dict) -> str:
    from handsoff.metrics.labels import results_table
    from handsoff.pipeline.run import comparison

    return results_table(comparison(results["methods"]))


def _add_framing_options(p, generator: bool = True, default: str = DEFAULT_FRAMING) -> None:
    p.add_argument("--framing", choices=list(FRAMINGS), default=default,
                   help="of the rendered heads: bust (heads and shoulders anywhere in a cluttered frame, the original "
                   "domain) or portrait (faces centred and 2x closer, as aligned-face datasets crop them)")
    if generator:
        p.add_argument("--generator", help="generator name or folder (default: the framing's shipped one, "
                       f"{', '.join(f'{k}: {v}' for k, v in SHIPPED_NAMES.items())})")


def cmd_demo(args) -> int:
    """Every stage on the embedded heads domain, from the shipped generator: see handsoff.pipeline.benchmark."""
    from handsoff.pipeline.benchmark import run_demo

    t0 = time.perf_counter()
    results = run_demo(args.out, seed=args.seed, device=args.device, progress=not args.quiet, framing=args.framing,
                       generator=args.generator)
    out = Path(args.out)
    print(f"\nHandsOff demo ({time.perf_counter() - t0:.0f} s): downstream network on "
          f"{results['settings']['test'] and 'real test heads'}\n{_summary(results)}")
    print(f"report:          {out / 'report.html'}\nresults:         {out / 'results.json'}\n"
          f"label generator: {out / 'label_generator'} (try `handsoff generate --label-generator "
          f"{out / 'label_generator'} --n 100 --out more-heads`)")
    return 0


def cmd_run(args) -> int:
    from handsoff.pipeline import PipelineConfig, load_config, run_pipeline
    from handsoff.pipeline.report import write_report

    if args.print_defaults:
        import yaml

        example = PipelineConfig(out="runs/my-domain", generator="stylegan2.pkl", labeled="data/labeled",
                                 validation="data/validation", test="data/test")
        print(yaml.safe_dump(example.to_json(), sort_keys=False), end="")
        return 0
    if not args.config:
        raise UsageError("handsoff run: give a config file (see `handsoff run --print-defaults`)")
    config = load_config(args.config)
    if args.device:
        config = config.model_copy(update={"device": args.device})
    t0 = time.perf_counter()
    results = run_pipeline(config, progress=not args.quiet)
    report = write_report(config.out) if args.report else None
    print(f"\nfinished in {time.perf_counter() - t0:.0f} s; results: {Path(config.out) / 'results.json'}"
          + (f", report: {report}" if report else ""))
    if results["methods"]:
        print(_summary(results))
    return 0


def cmd_report(args) -> int:
    from handsoff.pipeline.report import write_report

    print(f"wrote {write_report(args.run, args.out)}")
    return 0


def cmd_benchmark(args) -> int:
    from handsoff.pipeline.benchmark import run_benchmark

    settings = {"inversion": {"steps": args.inversion_steps},
                "label_generator": {"max_steps": args.lg_steps, "min_steps": args.lg_steps, "mirror": args.mirror},
                "downstream": {"architecture": args.arch, "backbone": args.backbone, "epochs": args.epochs,
                               "batch": args.batch, "lr": args.lr,
                               "images_per_epoch": args.images_per_epoch, "patience": args.epochs,
                               "labeled_share": args.labeled_share,
                               **({"backbone_weights": args.backbone_weights} if args.backbone_weights else {})},
                "generation": {"void_top": args.void_top}}
    results = run_benchmark(args.out, labeled=args.labeled, seeds=args.seeds,
                            validation=args.validation, test=args.test, oracle=args.oracle,
                            generated=args.generated, settings=settings, device=args.device,
                            framing=args.framing, generator=args.generator, progress=not args.quiet)
    from handsoff.metrics.labels import results_table
    from handsoff.pipeline.benchmark import versus_table

    print(f"\n{results['seeds']} seed(s), mean ± std, {results['downstream_init']}\n"
          f"{results_table(results['methods'])}\n\n{versus_table(results['versus_transfer'])}")
    print(f"wrote {Path(args.out) / 'results.json'}, {Path(args.out) / 'table.txt'}")
    return 0


def cmd_train_gan(args) -> int:
    from handsoff.generator.training import TrainingConfig, train_gan

    config = TrainingConfig(
        data=args.data, out=args.out, resolution=args.size, z_dim=args.z_dim, w_dim=args.w_dim, n_mlp=args.n_mlp,
        channel_base=args.channel_base, channel_max=args.channel_max, batch=args.batch,
        batch_per_round=args.batch_per_round, total_images=args.images, lr=args.lr, r1_gamma=args.gamma,
        r1_interval=args.r1_interval, pl_weight=args.pl_weight, style_mixing=args.style_mixing,
        augment=args.augment, augment_p=args.augment_p, ada_target=args.ada_target, precision=args.precision,
        num_fp16_res=args.fp16_res, seed=args.seed, device=args.device, tick_images=args.tick,
        snapshot_images=args.snapshot, init_from=args.init_from)
    t0 = time.perf_counter()
    last = train_gan(config)
    print(f"latest network: {last} ({time.perf_counter() - t0:.0f} s this session); sample it with "
          f"`handsoff sample --checkpoint {last}`")
    return 0


def _perceptual(args, discriminator):
    from handsoff.inversion import build_perceptual

    if args.perceptual == "none":
        return None
    return build_perceptual(args.perceptual, discriminator, args.lpips_vgg, args.lpips_lin)


def cmd_train_encoder(args) -> int:
    from handsoff.generator import load_networks
    from handsoff.inversion import save_encoder, train_encoder

    nets = load_networks(args.generator, device=resolve_device(args.device))
    perceptual = _perceptual(args, nets.discriminator)
    log: list[dict] = []
    t0 = time.perf_counter()
    encoder = train_encoder(nets.generator, perceptual, steps=args.steps, batch=args.batch, lr=args.lr,
                            iterations=args.iterations, width=args.width, seed=args.seed, log=log)
    out = save_encoder(encoder, args.out, metadata={
        "generator": str(args.generator), "perceptual": getattr(perceptual, "name", "none"), "steps": args.steps,
        "batch": args.batch, "seed": args.seed, "seconds": round(time.perf_counter() - t0, 1),
        "final_losses": {k: sum(e[k] for e in log[-50:]) / len(log[-50:]) for k in ("latent", "mse", "perceptual")}})
    from handsoff.fileio import atomic_write_bytes

    atomic_write_bytes(out / "log.jsonl", "".join(json.dumps(e) + "\n" for e in log).encode())
    print(f"wrote encoder {out} ({args.steps} steps in {time.perf_counter() - t0:.0f} s)")
    return 0


def cmd_invert(args) -> int:
    from handsoff.generator import load_networks
    from handsoff.inversion import check_latents_path, invert_folder, load_encoder

    check_latents_path(args.out)
    device = resolve_device(args.device)
    nets = load_networks(args.generator, device=device)
    encoder = load_encoder(args.encoder, device) if args.encoder else None
    report = invert_folder(nets.generator, args.images, args.out, _perceptual(args, nets.discriminator), encoder,
                           settings={"generator": str(args.generator), "encoder": args.encoder},
                           sheet_rows=args.sheet_rows, steps=args.steps, lr=args.lr,
                           lambda_perceptual=args.lambda_perceptual, lambda_mse=args.lambda_mse,
                           lambda_reg=args.lambda_reg, batch=args.batch,
                           memory_gb=args.memory_gb)
    out = Path(args.out)
    print(f"wrote {out} ({len(report['images'])} latents), {out.with_suffix('.json')}, {out.with_suffix('.png')} "
          "(real | encoder | refined)")
    print(f"{'stage':<10}{'MSE':>10}{'PSNR dB':>10}{'perceptual':>12}")
    for stage, figs in report["mean"].items():
        print(f"{stage:<10}{figs['mse']:>10.5f}{figs['psnr']:>10.2f}{figs['perceptual']:>12.4f}")
    print(f"{report['settings']['seconds_per_image']:.2f} s per image")
    return 0


def cmd_fit(args) -> int:
    from handsoff.generator import load_generator
    from handsoff.label_generator import fit_from_folder, parse_task_names

    G = load_generator(args.generator, device=resolve_device(args.device))
    _, summary = fit_from_folder(G, args.latents, args.labels, args.out, tasks=parse_task_names(args.tasks),
                                 label_size=args.label_size, members=args.members, hidden=args.hidden,
                                 hidden2=args.hidden2, keypoint_sigma=args.keypoint_sigma, seed=args.seed,
                                 generator_ref=str(args.generator), max_steps=args.max_steps,
                                 min_steps=args.min_steps, patience=args.patience,
                                 images_per_step=args.images_per_step, pixels_per_image=args.pixels, lr=args.lr)
    if summary["unused_labeled_images"]:
        print(f"note: {summary['unused_labeled_images']} labeled images have no latent and were not used")
    print(f"wrote {args.out} ({summary['steps']} steps, {summary['stop_reason']}, {summary['seconds']:.0f} s); "
          f"preview {Path(args.out) / 'preview.png'} (left: real labels, right: label generator on the "
          "reconstruction)")
    for task in summary["final_loss"]:
        print(f"  {task}: loss {summary['final_loss'][task]:.4f} (constant prediction "
              f"{summary['constant_loss'][task]:.4f})")
    return 0


def _class_fractions(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise UsageError(f"--min-class-fraction expects CLASS=FRACTION, got {item!r}")
    return out


def cmd_generate(args) -> int:
    import math

    from handsoff.generation import GenerationConfig, generate_dataset, label_generator_source
    from handsoff.label_generator import load_label_generator

    device = resolve_device(args.device)
    generator = None
    if args.generator:
        from handsoff.generator import load_generator

        generator = load_generator(args.generator, device=device)
    lg_path = Path(args.label_generator)
    model = load_label_generator(lg_path, generator=generator, device=device)
    config = GenerationConfig(n=args.n, seed=args.seed, truncation=args.truncation, filter_top=args.filter_top,
                              filter_by=args.filter_by, keep_filtered=args.keep_filtered, batch=args.batch,
                              fmt=args.format, min_class_fraction=_class_fractions(args.min_class_fraction or []),
                              label_precision=args.label_precision, void_top=args.void_top)
    if args.shards:
        kept = args.n - math.floor(args.filter_top * args.n)
        config.shard_size = max(1, math.ceil(kept / args.shards))
    t0 = time.perf_counter()
    out = generate_dataset(model, args.out, config, source=label_generator_source(lg_path))
    if out is None:
        return 0  # a worker other than rank 0: rank 0 reports
    stats = json.loads((out / "dataset.json").read_text())["source"]["statistics"]
    c = stats["counts"]
    quotas = (f", {c['rejected']} rejected by class quotas (acceptance rate {stats['acceptance_rate']:.3f})"
              if config.min_class_fraction else "")
    print(f"wrote {out}: {c['kept']} kept, {c['filtered']} filtered as most uncertain{quotas} in "
          f"{time.perf_counter() - t0:.0f} s")
    if "class_image_share" in stats:
        shares = ", ".join(f"{k} {v:.3f}" for k, v in stats["class_image_share"].items())
        print(f"share of images containing each class: {shares}")
    return 0


def cmd_train_downstream(args) -> int:
    from handsoff.distributed import is_main_process
    from handsoff.downstream import train_downstream
    from handsoff.label_generator import parse_task_names

    result = train_downstream(args.data.split(","), args.val, args.out, tasks=parse_task_names(args.tasks),
                              backbone=args.backbone, backbone_weights=args.backbone_weights, epochs=args.epochs,
                              batch_size=args.batch, lr=args.lr, patience=args.patience, size=args.size,
                              seed=args.seed, images_per_epoch=args.images_per_epoch, architecture=args.arch,
                              schedule=args.schedule, device=args.device, shares=args.shares)
    best = max(result["history"], key=lambda h: h["score"])
    if is_main_process():  # under torchrun: once, from the worker that wrote it
        print(f"wrote {args.out}/model.safetensors (best epoch {best['epoch']} of {len(result['history'])} on the "
              f"validation split: {json.dumps(best['val'])})")
    return 0


def cmd_evaluate(args) -> int:
    from handsoff.downstream import evaluate_run
    from handsoff.metrics.labels import metric_table

    metrics = evaluate_run(args.model, args.data, args.out, device=args.device)
    print(metric_table({Path(args.model).name: metrics}))
    print(f"wrote {args.out or Path(args.model) / 'metrics.json'}")
    return 0


def cmd_render_heads(args) -> int:
    from handsoff.domains.heads import write_heads_dataset

    out = write_heads_dataset(args.out, args.n, seed=args.seed, size=args.size, start=args.start,
                              batch=args.batch, overwrite=args.force, framing=args.framing)
    print(f"wrote {args.n} labeled heads ({args.framing} framing) to {out}")
    return 0


def cmd_show(args) -> int:
    from handsoff.data.layout import LabeledFolder
    from handsoff.visualize import contact_sheet, save_image_atomic

    sheet = contact_sheet(LabeledFolder(args.dataset), n=args.n, columns=args.columns, scale=args.scale)
    print(f"wrote {save_image_atomic(sheet, args.out)}")
    return 0


def cmd_import_data(args) -> int:
    from handsoff.data import importers

    if args.layout == "handsoff-faces":
        report = importers.import_handsoff_faces(args.source, args.out, mapping=args.mapping, overwrite=args.force)
    elif args.layout == "coco":
        if not args.images:
            raise UsageError("import-data coco: --images DIR is required")
        report = importers.import_coco(args.source, args.images, args.out, mapping=args.mapping,
                                       overwrite=args.force)
    else:
        if not (args.images and args.palette):
            raise UsageError("import-data palette: --images DIR and --palette JSON are required (SOURCE = masks)")
        report = importers.import_palette_masks(args.images, args.source, args.palette, args.out,
                                                overwrite=args.force)
    print(f"wrote {args.out}: {report}")
    return 0


def _number(kind, minimum=None, maximum=None, low_open=False, high_open=False):
    """An argparse type: ``kind`` (int or float), finite, within [minimum, maximum] (open ends where asked), so a
    bad value is refused before any work with a message naming the option (argparse adds its name)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if minimum is not None and (value < minimum or (low_open and value == minimum)):
            raise argparse.ArgumentTypeError(f"must be {'>' if low_open else '>='} {minimum}, got {text}")
        if maximum is not None and (value > maximum or (high_open and value == maximum)):
            raise argparse.ArgumentTypeError(f"must be {'<' if high_open else '<='} {maximum}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _float_list(text: str) -> list[float]:
    """An argparse type: comma-separated numbers ("0.75,0.25"), checked where they are used."""
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _int_list(text: str) -> list[int]:
    """An argparse type: comma-separated positive integers ("16,50")."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be >= 1, got {text}")
    return values


POSITIVE_INT = _number(int, 1)
NONNEGATIVE_INT = _number(int, 0)
POSITIVE = _number(float, 0, low_open=True)
NONNEGATIVE = _number(float, 0)
PROBABILITY = _number(float, 0, 1)
FRACTION = _number(float, 0, 1, high_open=True)


class Parser(argparse.ArgumentParser):
    """argparse with a one-line usage error (``error: handsoff fit: argument --members: ...``), like every other
    handsoff error; the full usage stays one ``--help`` away."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="handsoff", description="Labeled datasets from a pretrained GAN and a handful of labeled "
                    "real images.", epilog=PIPELINE, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error (also "
                        "HANDSOFF_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("demo", help="every stage on the embedded heads domain (about 15 minutes on 2 CPU cores)",
                       description="Render labeled, validation, test and oracle heads; invert 16 labeled heads into "
                       "the shipped generator; fit the label generator; generate a dataset; train the downstream "
                       "network on it, on the 16 labeled heads alone (Transfer) and on 2,000 real heads (Oracle); "
                       "evaluate all three on real test heads; write results.json and report.html. Rerun to "
                       "resume.")
    p.add_argument("--out", default="handsoff-demo", help="output folder")
    p.add_argument("--seed", type=NONNEGATIVE_INT, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_framing_options(p)
    p.set_defaults(func=cmd_demo, writes="out")

    p = sub.add_parser("run", help="every stage for your own domain, from one config file (YAML)",
                       description="Run inversion, label generator, generation, downstream training and evaluation "
                       "as one config file says; rerun to resume. `--print-defaults` prints a config with every "
                       "setting.")
    p.add_argument("config", nargs="?", help="YAML or JSON config")
    p.add_argument("--print-defaults", action="store_true", help="print a complete example config and exit")
    p.add_argument("--no-report", dest="report", action="store_false", help="skip report.html")
    p.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N (overrides the config's device)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("report", help="(re)write the HTML report of a `run` or `demo` folder")
    p.add_argument("run", help="folder of a finished run (holds results.json)")
    p.add_argument("--out", default=None, help="HTML file (default RUN/report.html)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("benchmark", help="HandsOff vs Transfer vs Oracle on the heads domain, over seeds",
                       description="The paper's table on the embedded heads domain: per seed and labeled-set size, "
                       "the whole pipeline, the Transfer baseline (same network and schedule on the labeled real "
                       "images) and the Oracle (the same on --oracle real heads). Sizes are flags: small on a CPU, "
                       "full on a GPU. Rerun to resume.")
    from handsoff.pipeline.benchmark import BENCHMARK_ORACLE, DEMO  # the CPU sizes: the demo's, defined once

    ds = DEMO["downstream"]
    p.add_argument("--domain", default="heads", choices=["heads"], help="the embedded domain")
    p.add_argument("--labeled", type=_int_list, default=[4, 16, 50], help="labeled-set sizes, comma-separated")
    p.add_argument("--seeds", type=POSITIVE_INT, default=3)
    p.add_argument("--out", default="runs/benchmark-heads")
    p.add_argument("--generated", type=POSITIVE_INT, default=DEMO["generated"],
                   help="generated samples per cell (before filtering)")
    p.add_argument("--validation", type=POSITIVE_INT, default=DEMO["validation"])
    p.add_argument("--test", type=POSITIVE_INT, default=DEMO["test"])
    p.add_argument("--oracle", type=POSITIVE_INT, default=BENCHMARK_ORACLE,
                   help="real heads the Oracle trains on (the demo: 2,000)")
    p.add_argument("--inversion-steps", type=NONNEGATIVE_INT, default=DEMO["inversion"]["steps"],
                   help="W+ optimization steps per labeled image")
    p.add_argument("--lg-steps", type=POSITIVE_INT, default=DEMO["label_generator"]["max_steps"],
                   help="label generator training steps")
    p.add_argument("--mirror", action=argparse.BooleanOptionalAction, default=DEMO["label_generator"]["mirror"],
                   help="fit the label generator on the labeled heads and their left-right mirrors (--no-mirror: "
                   "the labeled heads alone, the paper's protocol)")
    p.add_argument("--arch", default=ds["architecture"], choices=ARCHITECTURES, help="downstream network (every "
                   "method)")
    p.add_argument("--backbone", default=ds["backbone"], help="resnet18 (CPU), resnet50, resnet101, "
                   "mobilenet_v3_large")
    p.add_argument("--backbone-weights", help="local ImageNet weights for the backbone (all methods)")
    p.add_argument("--epochs", type=POSITIVE_INT, default=ds["epochs"],
                   help="downstream epochs (every method: the same schedule)")
    p.add_argument("--images-per-epoch", type=POSITIVE_INT, default=ds["images_per_epoch"])
    p.add_argument("--labeled-share", type=FRACTION, default=ds["labeled_share"],
                   help="share of HandsOff's training images drawn from the labeled real images (0: generated only, "
                   "the paper's protocol)")
    p.add_argument("--void-top", type=FRACTION, default=DEMO["generation"]["void_top"],
                   help="per generated sample, this fraction of the dense labels' most uncertain pixels unlabeled")
    p.add_argument("--batch", type=POSITIVE_INT, default=ds["batch"])
    p.add_argument("--lr", type=POSITIVE, default=ds["lr"])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--quiet", action="store_true")
    _add_framing_options(p)
    p.set_defaults(func=cmd_benchmark, writes="out")

    p = sub.add_parser("init-generator", help="save a randomly initialized StyleGAN2 (no download needed)")
    p.add_argument("--out", required=True, help="output checkpoint folder")
    p.add_argument("--resolution", type=POSITIVE_INT, default=SLIM_GENERATOR["resolution"])
    p.add_argument("--z-dim", type=POSITIVE_INT, default=SLIM_GENERATOR["z_dim"])
    p.add_argument("--w-dim", type=POSITIVE_INT, default=SLIM_GENERATOR["w_dim"])
    p.add_argument("--n-mlp", type=POSITIVE_INT, default=SLIM_GENERATOR["n_mlp"])
    p.add_argument("--channel-base", type=POSITIVE_INT, default=SLIM_GENERATOR["channel_base"])
    p.add_argument("--channel-max", type=POSITIVE_INT, default=SLIM_GENERATOR["channel_max"])
    p.add_argument("--seed", type=NONNEGATIVE_INT, default=0)
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_init_generator, writes="out")

    p = sub.add_parser("convert", help="convert a rosinality .pt or NVIDIA .pkl checkpoint to handsoff's format")
    p.add_argument("input", help="checkpoint file (.pt, .pkl) or handsoff folder")
    p.add_argument("output", help="output folder (config.json + model.safetensors)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_convert, writes="output")

    p = sub.add_parser("sample", help="save a grid of generated images")
    p.add_argument("--checkpoint", required=True, help="checkpoint path (any format) or shipped name")
    p.add_argument("--n", type=POSITIVE_INT, default=16)
    p.add_argument("--seed", type=NONNEGATIVE_INT, default=0)
    p.add_argument("--truncation", type=POSITIVE, default=0.7)
    p.add_argument("--out", default="grid.png")
    p.add_argument("--batch", type=POSITIVE_INT, default=16)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--fp32", action="store_true", help="ignore the checkpoint's reduced-precision layers")
    p.set_defaults(func=cmd_sample)

    from handsoff.generator.training import TrainingConfig as T

    p = sub.add_parser("train-gan", help="train a StyleGAN2 (+ADA) on a folder of images; rerun to resume",
                       description="StyleGAN2 training: non-saturating loss, lazy R1, EMA generator, style mixing, "
                       "optional path-length regularization, adaptive augmentation, mixed precision, gradient "
                       "accumulation. Running the same command again resumes from OUT/state.pt.")
    p.add_argument("--data", required=True, help="image folder, or a labeled dataset (its images/ are used)")
    p.add_argument("--out", required=True, help="run folder (created, or resumed)")
    p.add_argument("--size", type=POSITIVE_INT, default=T.resolution, help="image resolution (images must match)")
    p.add_argument("--z-dim", type=POSITIVE_INT, default=T.z_dim)
    p.add_argument("--w-dim", type=POSITIVE_INT, default=T.w_dim)
    p.add_argument("--n-mlp", type=POSITIVE_INT, default=T.n_mlp)
    p.add_argument("--channel-base", type=POSITIVE_INT, default=T.channel_base)
    p.add_argument("--channel-max", type=POSITIVE_INT, default=T.channel_max)
    p.add_argument("--batch", type=POSITIVE_INT, default=T.batch, help="images per optimizer step")
    p.add_argument("--batch-per-round", type=POSITIVE_INT, default=None, help="split steps for gradient accumulation")
    p.add_argument("--images", type=POSITIVE_INT, default=T.total_images, help="train until this many images are seen")
    p.add_argument("--lr", type=POSITIVE, default=T.lr)
    p.add_argument("--gamma", type=NONNEGATIVE, default=None, help="R1 weight (default 0.0002 * size^2 / batch)")
    p.add_argument("--r1-interval", type=POSITIVE_INT, default=T.r1_interval)
    p.add_argument("--pl-weight", type=NONNEGATIVE, default=T.pl_weight, help="path-length regularization (0 = off)")
    p.add_argument("--style-mixing", type=PROBABILITY, default=T.style_mixing)
    p.add_argument("--augment", choices=["ada", "fixed", "none"], default=T.augment)
    p.add_argument("--augment-p", type=PROBABILITY, default=T.augment_p, help="initial (ada) or fixed probability")
    p.add_argument("--ada-target", type=PROBABILITY, default=T.ada_target)
    p.add_argument("--precision", choices=["auto", "mixed", "fp32"], default=T.precision,
                   help="mixed: bf16 (CPU) / fp16 (CUDA) in the --fp16-res highest resolutions; auto: mixed on CUDA, "
                   "and on a CPU only where bf16 measures faster than fp32 (measured once per machine, cached)")
    p.add_argument("--fp16-res", type=NONNEGATIVE_INT, default=T.num_fp16_res)
    p.add_argument("--seed", type=NONNEGATIVE_INT, default=T.seed)
    p.add_argument("--device", default=T.device, help="auto, cpu, cuda, ...")
    p.add_argument("--tick", type=POSITIVE_INT, default=T.tick_images, help="log every this many images")
    p.add_argument("--snapshot", type=POSITIVE_INT, default=T.snapshot_images,
                   help="export a network, a sample grid and the resumable state every this many images")
    p.add_argument("--init-from", metavar="RUN", help="start a new --out from RUN's state, widened to this "
                   "--channel-base / --channel-max (the wider networks compute exactly what RUN's did; training goes "
                   "on from RUN's images seen); keep it in the command that resumes the new run")
    p.set_defaults(func=cmd_train_gan, writes="out")

    def perceptual_args(p):
        p.add_argument("--perceptual", choices=["discriminator", "lpips", "none"], default="discriminator",
                       help="perceptual distance: the checkpoint's discriminator features (default), LPIPS-VGG "
                       "from local weights, or none")
        p.add_argument("--lpips-vgg", help="torchvision vgg16 state dict (.pth), for --perceptual lpips")
        p.add_argument("--lpips-lin", help="LPIPS linear heads (the lpips package's vgg.pth), for --perceptual lpips")
        p.add_argument("--device", default="auto")

    p = sub.add_parser("train-encoder", help="train a ReStyle-style inversion encoder on the generator's samples")
    p.add_argument("--generator", required=True, help="checkpoint path or shipped name (e.g. heads-64)")
    p.add_argument("--out", required=True, help="output folder (config.json, model.safetensors, log.jsonl)")
    p.add_argument("--steps", type=NONNEGATIVE_INT, default=2000)
    p.add_argument("--batch", type=POSITIVE_INT, default=16)
    p.add_argument("--lr", type=POSITIVE, default=1e-3)
    p.add_argument("--iterations", type=POSITIVE_INT, default=5, help="ReStyle refinement iterations")
    p.add_argument("--width", type=POSITIVE_INT, default=32)
    p.add_argument("--seed", type=NONNEGATIVE_INT, default=0)
    perceptual_args(p)
    p.set_defaults(func=cmd_train_encoder, writes="out")

    p = sub.add_parser("invert", help="invert images into W+ (encoder, then optimization)")
    p.add_argument("--generator", required=True, help="checkpoint path or shipped name (e.g. heads-64)")
    p.add_argument("--images", required=True, help="image folder or labeled dataset")
    p.add_argument("--out", required=True, help="latents file (.safetensors); .json and .png written beside it")
    p.add_argument("--encoder", help="encoder folder from train-encoder (default: start from the average latent)")
    p.add_argument("--steps", type=NONNEGATIVE_INT, default=500, help="optimization steps (0: encoder only)")
    p.add_argument("--lr", type=POSITIVE, default=0.1)
    p.add_argument("--lambda-perceptual", type=NONNEGATIVE, default=10.0)
    p.add_argument("--lambda-mse", type=NONNEGATIVE, default=1.0)
    p.add_argument("--lambda-reg", type=NONNEGATIVE, default=1.0, help="weight of ||w - w_encoder||^2")
    p.add_argument("--batch", type=POSITIVE_INT, default=None,
                   help="images optimized together (default: the most that fit --memory-gb)")
    p.add_argument("--memory-gb", type=_number(float, 0, low_open=True), default=None,
                   help="peak memory to plan the batch for (default: a third of this machine's memory, at most "
                   "half of what is free; on CUDA 80%% of the free device memory)")
    p.add_argument("--sheet-rows", type=POSITIVE_INT, default=16, help="images shown in the reconstruction sheet")
    perceptual_args(p)
    p.set_defaults(func=cmd_invert, writes="out")

    p = sub.add_parser("fit", help="fit the label generator on inverted labeled images (seg, kp, depth)")
    p.add_argument("--generator", required=True, help="checkpoint path or shipped name (e.g. heads-64)")
    p.add_argument("--latents", required=True, help="latents file from `handsoff invert`")
    p.add_argument("--labels", required=True, help="labeled dataset (standard layout) with the same image names")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help=f"comma-separated: {', '.join(TASK_NAMES)}")
    p.add_argument("--out", required=True, help="label generator folder (resumes if it holds state.pt)")
    p.add_argument("--label-size", type=POSITIVE_INT, default=None, help="label resolution (default: the masks' size)")
    p.add_argument("--members", type=POSITIVE_INT, default=10)
    p.add_argument("--hidden", type=POSITIVE_INT, default=256)
    p.add_argument("--hidden2", type=POSITIVE_INT, default=32)
    p.add_argument("--max-steps", type=POSITIVE_INT, default=3000)
    p.add_argument("--min-steps", type=NONNEGATIVE_INT, default=300)
    p.add_argument("--patience", type=POSITIVE_INT, default=200, help="early stop after this many steps without "
                   "improvement of the smoothed loss")
    p.add_argument("--images-per-step", type=POSITIVE_INT, default=4)
    p.add_argument("--pixels", type=POSITIVE_INT, default=1024, help="label pixels sampled per image per step")
    p.add_argument("--lr", type=POSITIVE, default=1e-3)
    p.add_argument("--keypoint-sigma", type=POSITIVE, default=KEYPOINT_SIGMA, help="heatmap sigma in label pixels")
    p.add_argument("--seed", type=NONNEGATIVE_INT, default=0)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_fit, writes="out")

    p = sub.add_parser("generate", help="generate a labeled dataset (resumable; parallel under torchrun)",
                       description="Generate a labeled dataset from a fitted label generator. Rerun the same "
                       "command after a kill to resume. For several workers run it under torchrun, e.g. "
                       "`torchrun --nproc-per-node 4 -m handsoff generate --num-samples N ...` (several machines: "
                       "--nnodes/--node-rank/--master-addr, with --out on a shared filesystem).")
    p.add_argument("--label-generator", required=True, help="folder from `handsoff fit`")
    p.add_argument("--n", "--num-samples", dest="n", type=POSITIVE_INT, default=10000,
                   help="samples before uncertainty filtering (under torchrun write --num-samples: torchrun "
                   "mistakes --n for an abbreviation of its own options)")
    p.add_argument("--out", required=True)
    p.add_argument("--truncation", type=POSITIVE, default=0.7)
    p.add_argument("--seed", type=NONNEGATIVE_INT, default=0)
    p.add_argument("--filter-top", type=FRACTION, default=0.1, help="fraction dropped as most uncertain")
    p.add_argument("--filter-by", default="combined", help="seg, kp, depth or combined")
    p.add_argument("--void-top", type=FRACTION, default=0.0, help="in every sample, leave this fraction of the "
                   "dense labels' pixels unlabeled where the ensemble disagrees most (mask id 255, depth NaN; "
                   "downstream losses skip them)")
    p.add_argument("--keep-filtered", action="store_true", help="move filtered samples to OUT/filtered/")
    p.add_argument("--format", choices=["folder", "webdataset"], default="folder")
    p.add_argument("--shards", type=POSITIVE_INT, default=None, help="number of WebDataset tar shards")
    p.add_argument("--batch", type=POSITIVE_INT, default=16, help="samples per batch (the unit of work and resumption)")
    p.add_argument("--min-class-fraction", action="append", metavar="CLASS=F",
                   help="generate until a share F of the samples contain CLASS (rejection sampling)")
    p.add_argument("--generator", help="use this generator instead of the one the label generator records")
    p.add_argument("--device", default="auto")
    p.add_argument("--label-precision", choices=LABEL_PRECISIONS, default="auto",
                   help="arithmetic of the label maps: auto takes bf16 on CUDA and on CPUs where bf16 matrix "
                   "products measure faster than fp32 (measured once per machine, cached); the choice is recorded "
                   "in dataset.json")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("train-downstream", help="train the downstream network (a U-Net or DeepLabV3, a head per "
                       "task) on labeled datasets")
    p.add_argument("--data", required=True, help="dataset folder(s), comma-separated (standard layout)")
    p.add_argument("--val", required=True, help="validation dataset for checkpoint selection (never the test set)")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help=f"comma-separated: {', '.join(TASK_NAMES)}")
    p.add_argument("--out", required=True, help="run folder (resumes if it holds state.pt)")
    p.add_argument("--backbone", default="resnet18", help="resnet18 (CPU), resnet50, resnet101, mobilenet_v3_large")
    p.add_argument("--backbone-weights", help="local torchvision ImageNet state dict (never downloaded)")
    p.add_argument("--epochs", type=POSITIVE_INT, default=20)
    p.add_argument("--batch", type=POSITIVE_INT, default=8)
    p.add_argument("--lr", type=POSITIVE, default=1e-3)
    p.add_argument("--patience", type=POSITIVE_INT, default=5, help="stop after this many epochs without improvement")
    p.add_argument("--size", type=POSITIVE_INT, default=None, help="train at this resolution (default: the data's)")
    p.add_argument("--images-per-epoch", type=POSITIVE_INT, default=None,
                   help="images drawn per epoch (default: the dataset size); a fixed number gives datasets of any "
                   "size the same schedule")
    p.add_argument("--shares", type=_float_list,
                   help="comma-separated fraction of the images drawn from each --data folder, e.g. "
                   "0.75,0.25 (default: every image equally likely)")
    p.add_argument("--arch", default="unet", choices=ARCHITECTURES,
                   help="unet: predicts at full resolution (small parts, low resolution, CPU); deeplabv3: the "
                   "paper's network (output stride 8)")
    p.add_argument("--schedule", default="onecycle", choices=SCHEDULES,
                   help="learning rate: one-cycle (warm-up, cosine decay) or constant (the paper's)")
    p.add_argument("--seed", type=NONNEGATIVE_INT, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (mixed precision on CUDA)")
    p.set_defaults(func=cmd_train_downstream, writes="out")

    p = sub.add_parser("evaluate", help="evaluate a downstream model on real labeled images")
    p.add_argument("--model", required=True, help="run folder from train-downstream")
    p.add_argument("--data", required=True, help="labeled test dataset")
    p.add_argument("--out", default=None, help="metrics JSON (default MODEL/metrics.json)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (any device, whatever it trained on)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("render-heads", help="render labeled heads (the embedded domain) into the standard layout")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=POSITIVE_INT, default=1000)
    p.add_argument("--seed", type=NONNEGATIVE_INT, default=0)
    p.add_argument("--start", type=NONNEGATIVE_INT, default=0, help="first image index (seed ranges never overlap)")
    p.add_argument("--size", type=POSITIVE_INT, default=64)
    p.add_argument("--batch", type=POSITIVE_INT, default=32)
    p.add_argument("--force", action="store_true", help="write into a non-empty folder")
    _add_framing_options(p, generator=False, default="bust")  # the renderer's own default
    p.set_defaults(func=cmd_render_heads, writes="out")

    p = sub.add_parser("import-data", help="convert labeled data (HandsOff faces, COCO, colour masks) to the "
                       "standard layout")
    p.add_argument("layout", choices=["handsoff-faces", "coco", "palette"])
    p.add_argument("source", help="faces: folder; coco: annotation JSON; palette: folder of colour masks")
    p.add_argument("--out", required=True)
    p.add_argument("--images", help="image folder (coco, palette)")
    p.add_argument("--palette", help="palette JSON (palette)")
    p.add_argument("--mapping", default=None, help="class mapping name or JSON (e.g. celebamask19_to_8, "
                   "carparts18_to_10)")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_import_data, writes="out")

    p = sub.add_parser("show", help="contact sheet of a labeled dataset: image | mask + keypoints | depth")
    p.add_argument("dataset")
    p.add_argument("--out", default="sheet.png")
    p.add_argument("--n", type=POSITIVE_INT, default=16)
    p.add_argument("--columns", type=POSITIVE_INT, default=2)
    p.add_argument("--scale", type=POSITIVE_INT, default=2)
    p.set_defaults(func=cmd_show)

    return parser


def _output_lock(args):
    """The lock on the command's output (the option its parser names in ``writes``): a second process writing the
    same output fails at once. ``generate`` and ``run`` lock inside (rank-aware; the output is in the config)."""
    from contextlib import nullcontext

    from handsoff.distributed import is_main_process
    from handsoff.fileio import output_lock

    target = getattr(args, args.writes) if getattr(args, "writes", None) else None
    # Under torchrun every worker runs this command; worker 0 holds the lock for the job.
    return output_lock(target) if target and is_main_process() else nullcontext()


def main(argv: list[str] | None = None) -> int:
    """Run one command. A user's mistake (a HandsoffError, or a file the OS cannot find, create or read) prints one
    line, ``error: ...``, and returns 1; ``--debug`` (or HANDSOFF_DEBUG=1) shows the traceback instead. Anything
    else is a bug and keeps its traceback."""
    args = build_parser().parse_args(argv)
    from handsoff.errors import HandsoffError, one_line
    from handsoff.runtime import tune_allocator

    tune_allocator()
    user_errors = (HandsoffError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
                   PermissionError)
    try:
        with _output_lock(args):
            return args.func(args)
    except user_errors as e:
        if args.debug or os.environ.get("HANDSOFF_DEBUG"):
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130

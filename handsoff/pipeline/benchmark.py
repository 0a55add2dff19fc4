"""The paper's comparison on the embedded heads domain: HandsOff vs Transfer vs Oracle, over labeled-set sizes
and seeds (``handsoff benchmark``), and its one-seed miniature (``handsoff demo``).

Real data are rendered heads (``handsoff.domains.heads``), each role from its own split seed, so no image is
shared between roles: labeled images for seed s are labeled-split indices [s * L_max, s * L_max + L) (the smaller
labeled sets nested in the larger), validation / test / oracle are fixed sets. Per seed and labeled size the
whole pipeline runs (inversion, label generator, generation, downstream); the Oracle network is trained once per
seed on the oracle set. The same network, schedule and augmentation serve every method; the backbone starts from
random weights unless ``backbone_weights`` names a local ImageNet file.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from handsoff.domains import heads
from handsoff.errors import UsageError
from handsoff.fileio import atomic_write_bytes, atomic_write_json
from handsoff.metrics.labels import HEADLINE, LOWER_IS_BETTER, results_table
from handsoff.pipeline.config import PipelineConfig
from handsoff.pipeline.run import run_pipeline
from handsoff.tasks import TASK_NAMES

TASKS = list(TASK_NAMES)  # every registered task

# Sizes for `handsoff demo`: every stage on the shipped generator in under half an hour on a 2-core CPU. 1,112 samples
# leave 1,001 after the 10% most uncertain are dropped. Downstream: the U-Net on ResNet-18 (full-resolution
# outputs: at 64 px DeepLabV3's 8 x 8 map scores 0 on every small part), 8 epochs of 768 images in batches of 8.
# Optimizer steps, not images, decide whether small parts are learned: on 5,000 real heads (validation mIoU),
# 6,144 images seen reach 0.63 (eye 0.62, nose 0.61, mouth 0.55) in batches of 8, 0.53 in batches of 16; 4,608
# in batches of 8 reach 0.53-0.55; 8,192 in batches of 32 reach 0.34 (eye 0.01). That schedule costs about 230 s
# per network on a slow machine of this kind (AVX2 only), so the demo trains three networks (no dataset-size
# curve: `handsoff run` with `curve: [250]` gives it), an Oracle on 2,000 real heads (each seen about three
# times), and inverts with 300 steps. The label generator fits 1,200 steps: at 300 its loss still fell fast (0.168 ->
# 0.145 over the last 60) and it labeled brows in 1% of generated portraits that show them in 74%; at 1,200, 77%,
# with PCK@0.05 0.53 -> 0.65 (heads-portrait-64 at 100k images). HandsOff's network draws a quarter of its batches
# from the labeled real heads beside the generated ones: on the 440k snapshot's demo dataset, mIoU 0.526 with none,
# 0.562 with a quarter, 0.542 with half (same label generator, Transfer 0.491, Oracle 0.703); the labeled heads
# bring what the generator rarely draws (glasses IoU 0.02 -> 0.23). Fitting on the labeled heads and their mirrors
# (600k generator) raised mIoU 0.573 -> 0.580 but lowered PCK@0.05 0.837 -> 0.792 at the same 1,200 steps: off.
DEMO = dict(labeled=16, validation=200, test=500, oracle=2000, generated=1112, curve=[],
            inversion=dict(steps=300),
            label_generator=dict(max_steps=1200, min_steps=1200, mirror=False), generation=dict(void_top=0.0),
            downstream=dict(architecture="unet", backbone="resnet18", epochs=8, images_per_epoch=768, batch=8,
                            lr=2e-3, patience=8, labeled_share=0.25))

# The benchmark's Oracle trains on more real heads than the demo's; every other size is the demo's by default.
BENCHMARK_ORACLE = 5000


def render_split(out: Path, split: str, n: int, start: int = 0, size: int = 64, progress: bool = True,
                 framing: str = "bust") -> Path:
    """Rendered heads ``start .. start + n - 1`` of one split in the standard layout at ``out``.

    A complete folder is reused only if it holds exactly those heads (the sample names carry seed and index) at
    this size and framing; one that holds others (another ``--labeled`` list or ``--oracle`` count in the same
    ``--out``) is refused by name rather than silently reused. An incomplete one (a killed render) is redone."""
    from handsoff.data.layout import LabeledFolder

    seed = heads.SPLIT_SEEDS[split]
    if not (out / "dataset.json").exists():
        heads.write_heads_dataset(out, n, seed=seed, size=size, start=start, overwrite=True, progress=progress,
                                  framing=framing)
        return out
    folder = LabeledFolder(out)
    source = folder.card.source
    have = {"seed": source.get("seed"), "size": source.get("size"), "framing": source.get("framing", "bust")}
    want = {"seed": seed, "size": size, "framing": framing}
    differ = [f"{k} {have[k]!r} (wanted {want[k]!r})" for k in want if have[k] != want[k]]
    names = [f"{seed:04d}_{i:07d}" for i in range(start, start + n)]
    if folder.names != names:
        found = f"{folder.names[0]}..{folder.names[-1]}" if folder.names else "none"
        differ.append(f"{len(folder)} heads {found} (wanted {n}: {names[0]}..{names[-1]})")
    if differ:
        raise UsageError(f"{out}: holds other rendered heads than this run needs: {'; '.join(differ)}. Use another "
                         "--out (or delete the folder to render it again)")
    return out


def _generator_for(framing: str, generator: str | None) -> str:
    """``generator``, or the framing's shipped one; checked to exist, so that a missing one fails before rendering."""
    from handsoff.generator.checkpoints import resolve_checkpoint

    generator = generator or heads.SHIPPED_NAMES[framing]
    resolve_checkpoint(generator)
    return generator


def heads_config(out: Path, data: dict[str, Path | None], seed: int, generated: int, curve: list[int],
                 settings: dict, device: str, generator: str) -> PipelineConfig:
    """The pipeline config of one benchmark cell; ``settings`` holds per-stage overrides; ``generator`` as
    resolved by ``_generator_for``."""
    return PipelineConfig.model_validate({
        "out": out, "generator": generator, "tasks": TASKS, "seed": seed, "device": device, "transfer": True,
        "curve": curve,
        **data, "generation": {"n": generated, **settings.get("generation", {})},
        **{k: settings[k] for k in ("inversion", "label_generator", "downstream") if k in settings}})


def run_demo(out: str | Path, *, seed: int = 0, device: str = "auto", progress: bool = True, log=print,
             framing: str = heads.DEFAULT_FRAMING, generator: str | None = None, **overrides) -> dict:
    """``handsoff demo``: render heads, run every stage with the demo sizes, write results.json and report.html.
    ``framing``: of the rendered heads (``heads.FRAMINGS``); ``generator``: by default the framing's shipped one."""
    from handsoff.pipeline.report import write_report

    sizes = {**DEMO, **overrides}
    generator = _generator_for(framing, generator)
    out = Path(out).resolve()  # results.json and the report then work from any folder
    data = out / "data"
    log(f"[rendering real heads ({framing} framing): labeled, validation, test, oracle]")
    paths = {role: render_split(data / (f"labeled-{sizes[role]}" if role == "labeled" else role), role, sizes[role],
                                progress=progress, framing=framing) if sizes[role] else None
             for role in ("labeled", "validation", "test", "oracle")}
    config = heads_config(out, paths, seed, sizes["generated"], sizes["curve"],
                          {k: sizes[k] for k in ("inversion", "label_generator", "generation", "downstream")
                           if k in sizes}, device, generator)
    results = run_pipeline(config, progress=progress, log=log)
    log("[report]")
    write_report(out)
    return results


def _aggregate(values: list[float]) -> dict:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return {"mean": float(np.mean(finite)) if finite else float("nan"),
            "std": float(np.std(finite)) if finite else float("nan"), "values": values}


def versus_transfer(per_cell: dict[str, list[dict]], labeled: list[int]) -> dict:
    """HandsOff against Transfer, paired by seed (both from the same labeled images), per labeled size and headline
    metric: the per-seed difference HandsOff - Transfer (for depth errors Transfer - HandsOff, so that positive
    always favours HandsOff), its mean and std over seeds (population std, as the tables' ±), whether the mean
    exceeds twice the std (with one seed: never, the spread is unknown), and for mIoU the share of the
    Transfer-to-Oracle gap HandsOff closes, (HandsOff - Transfer) / (Oracle - Transfer) per seed. ``per_cell``:
    method name -> per-seed metrics, as ``run_benchmark`` collects them ("handsoff-16", "transfer-16", "oracle")."""
    out = {}
    for n in sorted(labeled):
        handsoff, transfer = per_cell.get(f"handsoff-{n}"), per_cell.get(f"transfer-{n}")
        if not handsoff or not transfer:
            continue
        rows = {}
        for metric in HEADLINE:
            pairs = [(h.get(metric), t.get(metric)) for h, t in zip(handsoff, transfer)]
            differences = [(t - h if metric in LOWER_IS_BETTER else h - t) for h, t in pairs
                           if h is not None and t is not None and not (math.isnan(h) or math.isnan(t))]
            if not differences:
                continue
            row = _aggregate(differences)
            row["significant"] = len(differences) > 1 and row["mean"] > 2 * row["std"]
            rows[metric] = row
        oracle = per_cell.get("oracle", [])
        if "miou" in rows and len(oracle) == len(handsoff):
            rows["miou"]["gap_closed"] = _aggregate([(h["miou"] - t["miou"]) / (o["miou"] - t["miou"])
                                                     for h, t, o in zip(handsoff, transfer, oracle)
                                                     if o["miou"] != t["miou"]])
        out[n] = rows
    return out


def versus_table(versus: dict) -> str:
    """Plain text of ``versus_transfer``: per size, HandsOff's lead on each metric (mean ± std over seeds; '*' where
    it exceeds twice the std) and the share of the Transfer-to-Oracle mIoU gap it closes."""
    lines = ["HandsOff - Transfer, paired by seed (depth: Transfer - HandsOff; positive favours HandsOff; "
             "* mean > 2 std)"]
    for n, rows in versus.items():
        cells = [f"{m} {r['mean']:+.3f} ± {r['std']:.3f}{'*' if r['significant'] else ''}" for m, r in rows.items()]
        gap = rows.get("miou", {}).get("gap_closed")
        if gap:
            cells.append(f"mIoU gap closed {gap['mean']:.0%} ± {gap['std']:.0%}")
        lines.append(f"{n} labeled: " + ", ".join(cells))
    return "\n".join(lines)


def method_order(names) -> list[str]:
    """Table order of benchmark methods ("transfer-16", "handsoff-4", "oracle"): Transfer rows, then HandsOff,
    each by labeled-set size as a number (4 before 16), the Oracle last."""
    def key(name: str) -> tuple:
        method, _, size = name.partition("-")
        return name == "oracle", method != "transfer", method, int(size) if size else 0
    return sorted(names, key=key)


def run_benchmark(out: str | Path, *, labeled: list[int], seeds: int, validation: int = DEMO["validation"],
                  test: int = DEMO["test"], oracle: int = BENCHMARK_ORACLE, generated: int = DEMO["generated"],
                  settings: dict | None = None, device: str = "auto", generator: str | None = None,
                  size: int = 64, framing: str = heads.DEFAULT_FRAMING, progress: bool = True, log=print) -> dict:
    """Every (seed, labeled size) cell, then mean and std over seeds per method; writes results.json, table.txt.
    ``generator`` and ``size`` (of the rendered heads) default to the shipped generator of ``framing``'s."""
    out = Path(out).resolve()
    settings = settings or {}
    generator = _generator_for(framing, generator)
    data = out / "data"
    fixed = {split: render_split(data / split, split, n, size=size, progress=progress, framing=framing)
             for split, n in (("validation", validation), ("test", test), ("oracle", oracle))}
    largest = max(labeled)
    per_cell: dict[str, list[dict]] = {}
    for seed in range(seeds):
        for i, n in enumerate(sorted(labeled)):
            log(f"=== seed {seed}, {n} labeled images ===")
            labeled_dir = render_split(data / f"labeled-seed{seed}-{n}", "labeled", n, start=seed * largest,
                                       size=size, progress=progress, framing=framing)
            cell = {"labeled": labeled_dir, "validation": fixed["validation"], "test": fixed["test"],
                    "oracle": fixed["oracle"] if i == 0 else None}
            results = run_pipeline(heads_config(out / f"seed{seed}" / f"labeled-{n}", cell, seed, generated, [],
                                                settings, device, generator), progress=progress, log=log)
            for method, metrics in results["methods"].items():
                name = method if method == "oracle" else f"{method}-{n}"
                per_cell.setdefault(name, []).append(metrics)
    order = method_order(per_cell)
    summary = {name: {k: _aggregate([m.get(k) for m in per_cell[name]]) for k in HEADLINE if k in per_cell[name][0]}
               for name in order}
    for name in order:  # IoU per class, mean and spread over seeds (None: the class never occurred)
        if "iou" in per_cell[name][0]:
            summary[name]["iou"] = {c: _aggregate([m["iou"].get(c) for m in per_cell[name]])
                                    for c in per_cell[name][0]["iou"]}
    downstream = settings.get("downstream", {})
    init = ("ImageNet (local file)" if downstream.get("backbone_weights") else "random") + " init"
    network = f"{downstream.get('architecture', 'unet')} on {downstream.get('backbone', 'resnet18')}"
    versus = versus_transfer(per_cell, labeled)
    table = (f"{Path(generator).name} ({framing} heads), mean ± std over {seeds} seed(s); every method: {network}, "
             f"{init}, the same schedule\n{results_table(summary)}\n\n{versus_table(versus)}")
    results = {"methods": summary, "versus_transfer": versus, "seeds": seeds, "labeled": labeled,
               "downstream_init": init,
               "sizes": {"validation": validation, "test": test, "oracle": oracle, "generated": generated},
               "settings": settings, "generator": generator, "framing": framing, "tasks": TASKS}
    atomic_write_json(out / "results.json", results)
    atomic_write_bytes(out / "table.txt", (table + "\n").encode())
    return results

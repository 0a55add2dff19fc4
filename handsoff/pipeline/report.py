"""The HTML report of a pipeline run: one self-contained file (images embedded as PNG data, plots as inline SVG,
no scripts, no network), readable in any browser.

Sections: the metrics table (HandsOff vs Transfer vs Oracle), the metric against the number of generated images,
reconstructions of the labeled images, the label generator on them, generated samples with their labels and
per-pixel uncertainty (typical, least and most uncertain), and class frequencies generated vs real.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from handsoff.fileio import atomic_write_bytes
from handsoff.metrics.labels import HEADLINE, LOWER_IS_BETTER
from handsoff.pipeline.run import comparison

# Column headings for the headline metrics, in the order of the text tables.
METRIC_LABELS = dict(zip(HEADLINE, ("mIoU", "PCK@0.1", "PCK@0.05", "PCK@0.02", "depth MSE", "depth RMSE",
                                    "depth RMSE-log")))

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.6em 0; } td, th { padding: 0.25em 0.7em; text-align: right; }
th { background: #f0f0f0; } td:first-child, th:first-child { text-align: left; }
tr:nth-child(even) td { background: #fafafa; } .best { font-weight: bold; }
img { image-rendering: pixelated; max-width: 100%; } .muted { color: #666; font-size: 0.9em; }
.bar { display: inline-block; height: 0.8em; background: #3b7dd8; vertical-align: middle; }
.bar.real { background: #999; } figure { margin: 0.8em 0; } figcaption { color: #555; font-size: 0.9em; }
"""


def png_data_uri(image: Image.Image | np.ndarray) -> str:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _img(src: Image.Image | Path, alt: str, width: int | None = None) -> str:
    image = Image.open(src) if isinstance(src, (str, Path)) else src
    w = f' width="{width}"' if width else ""
    return f'<img src="{png_data_uri(image.convert("RGB"))}" alt="{html.escape(alt)}"{w}>'


def metrics_table(methods: dict[str, dict]) -> str:
    """HTML table, one row per method; the best value of each column in bold."""
    cols = [c for c in METRIC_LABELS if any(c in m for m in methods.values())]

    def value(v):
        return v["mean"] if isinstance(v, dict) else v

    best = {}
    for c in cols:
        vals = [value(m[c]) for m in methods.values() if m.get(c) is not None]
        if vals:
            best[c] = min(vals) if c in LOWER_IS_BETTER else max(vals)
    rows = ["<tr><th>method</th>" + "".join(f"<th>{METRIC_LABELS[c]}</th>" for c in cols) + "</tr>"]
    for name, m in methods.items():
        cells = []
        for c in cols:
            v = m.get(c)
            if v is None:
                cells.append("<td>-</td>")
                continue
            text = f"{v['mean']:.3f} ± {v['std']:.3f}" if isinstance(v, dict) else f"{v:.3f}"
            cls = ' class="best"' if value(v) == best.get(c) else ""
            cells.append(f"<td{cls}>{text}</td>")
        rows.append(f"<tr><td>{html.escape(name)}</td>{''.join(cells)}</tr>")
    return "<table>" + "".join(rows) + "</table>"


def per_class_table(methods: dict[str, dict]) -> str:
    """HTML table of IoU per class (columns) for each method (rows); the best of each column in bold, so that a
    reader sees which parts each dataset teaches (small parts hide in the mean)."""
    rows_in = {name: m["iou"] for name, m in methods.items() if "iou" in m}
    if not rows_in:
        return ""
    classes = list(next(iter(rows_in.values())))

    def value(v):
        return v["mean"] if isinstance(v, dict) else v

    best = {c: max((value(r[c]) for r in rows_in.values() if r.get(c) is not None), default=None) for c in classes}
    rows = ["<tr><th>method</th>" + "".join(f"<th>{html.escape(c)}</th>" for c in classes) + "</tr>"]
    for name, r in rows_in.items():
        cells = []
        for c in classes:
            v = r.get(c)
            if v is None or value(v) is None:
                cells.append("<td>-</td>")
                continue
            bold = ' class="best"' if value(v) == best[c] else ""
            cells.append(f"<td{bold}>{value(v):.2f}</td>")
        rows.append(f"<tr><td>{html.escape(name)}</td>{''.join(cells)}</tr>")
    return "<table>" + "".join(rows) + "</table>"


def line_plot(series: dict[str, list[tuple[float, float]]], lines: dict[str, float], xlabel: str, ylabel: str,
              width: int = 520, height: int = 300) -> str:
    """Inline SVG: one polyline with markers per series (log x axis), dashed horizontal reference lines."""
    points = [p for s in series.values() for p in s]
    xs = [x for x, _ in points]
    ys = [y for _, y in points] + list(lines.values())
    if not points:
        return "<p class='muted'>no data</p>"
    left, right, top, bottom = 60, 150, 15, 45
    x0, x1 = np.log10(min(xs)), np.log10(max(xs))
    x1 = x1 if x1 > x0 else x0 + 1
    y0, y1 = min(ys), max(ys)
    pad = (y1 - y0) * 0.1 or 0.05
    y0, y1 = y0 - pad, y1 + pad

    def px(x, y):
        return (left + (np.log10(x) - x0) / (x1 - x0) * (width - left - right),
                top + (1 - (y - y0) / (y1 - y0)) * (height - top - bottom))

    palette = ["#3b7dd8", "#d8553b", "#2a9d4b", "#8a4fd8", "#999999", "#444444"]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="11">',
           f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
           'fill="none" stroke="#ccc"/>']
    for t in np.linspace(y0, y1, 5):
        _, y = px(10 ** x0, t)
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{t:.3f}</text>')
    for x in sorted(set(xs)):
        xp, _ = px(x, y0)
        out.append(f'<text x="{xp:.1f}" y="{height - bottom + 15}" text-anchor="middle">{x:g}</text>')
    out.append(f'<text x="{(left + width - right) / 2}" y="{height - 8}" text-anchor="middle">{xlabel}</text>')
    out.append(f'<text x="14" y="{(top + height - bottom) / 2}" text-anchor="middle" '
               f'transform="rotate(-90 14 {(top + height - bottom) / 2})">{ylabel}</text>')
    legend_y = top + 10
    for i, (name, pts) in enumerate(series.items()):
        color = palette[i % len(palette)]
        coords = [px(x, y) for x, y in sorted(pts)]
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="'
                   + " ".join(f"{a:.1f},{b:.1f}" for a, b in coords) + '"/>')
        out += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3.5" fill="{color}"/>' for a, b in coords]
        out.append(f'<text x="{width - right + 8}" y="{legend_y}" fill="{color}">{html.escape(name)}</text>')
        legend_y += 16
    for j, (name, value) in enumerate(lines.items()):
        color = palette[(len(series) + j) % len(palette)]
        _, y = px(10 ** x0, value)
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="{color}" '
                   'stroke-dasharray="5,4"/>')
        out.append(f'<text x="{width - right + 8}" y="{legend_y}" fill="{color}">{html.escape(name)} '
                   f'({value:.3f})</text>')
        legend_y += 16
    out.append("</svg>")
    return "".join(out)


def _class_shares(folder, limit: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """(pixel share, image share) per class over the first ``limit`` masks of a labeled folder."""
    from handsoff.metrics.labels import presence_pixels
    from handsoff.tasks import card_tasks, pixel_class_task

    task = pixel_class_task(card_tasks(folder.card))
    k = len(folder.card.classes)
    masks = [folder.load(n)[task.sample_key] for n in folder.names[:limit]]
    counts = np.array([task.class_pixels(m, k) for m in masks], np.float64)
    present = np.array([presence_pixels(m.size) for m in masks])[:, None]
    return counts.sum(0) / max(counts.sum(), 1), (counts >= present).mean(0)


def class_frequency_table(generated: dict, real_folder) -> str:
    classes = list(generated["class_pixel_share"])
    real_pix, real_img = _class_shares(real_folder)
    top = max(max(generated["class_pixel_share"].values()), float(real_pix.max()), 1e-9)
    rows = ["<tr><th>class</th><th>pixel share: generated / real</th><th></th>"
            "<th>images containing it: generated / real</th></tr>"]
    for i, c in enumerate(classes):
        g, r = generated["class_pixel_share"][c], real_pix[i]
        bars = (f'<span class="bar" style="width:{120 * g / top:.1f}px"></span><br>'
                f'<span class="bar real" style="width:{120 * r / top:.1f}px"></span>')
        rows.append(f"<tr><td>{html.escape(c)}</td><td>{g:.4f} / {r:.4f}</td><td style='text-align:left'>{bars}</td>"
                    f"<td>{generated['class_image_share'][c]:.2f} / {real_img[i]:.2f}</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


def _sample_strips(model, entries: list[dict], colors) -> list[tuple[dict, Image.Image]]:
    """Regenerate manifest entries (seed, index) with a run's label generator: image | labels | uncertainty."""
    from handsoff.generator import latents_for_seeds
    from handsoff.label_generator.model import prediction_sample
    from handsoff.visualize import heat_to_rgb, label_panels

    strips = []
    for e in entries:
        z = latents_for_seeds(e["seed"], [e["index"]], model.G.z_dim)
        result = model.predict_z(z, truncation_psi=e.get("truncation", 0.7))
        strip = label_panels(prediction_sample(result, 0), colors)
        size = result["label_size"]
        heat = [heat_to_rgb(result[t.name][0]["uncertainty"].cpu().numpy(), vmax=None) for t in result["tasks"]]
        if heat:
            h = Image.fromarray(np.concatenate(heat, 1)).resize((size * len(heat) * 2, size * 2), Image.NEAREST)
            both = Image.new("RGB", (strip.width + h.width + 4, strip.height), (255, 255, 255))
            both.paste(strip, (0, 0))
            both.paste(h, (strip.width + 4, 0))
            strip = both
        strips.append((e, strip))
    return strips


def write_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, samples: int = 6) -> Path:
    """Write ``run_dir/report.html`` (or ``out``) for a finished ``run_pipeline`` folder."""
    from handsoff.data.layout import LabeledFolder, default_color

    run_dir = Path(run_dir)
    results = json.loads((run_dir / "results.json").read_text())
    config = results["settings"]
    methods = results.get("methods", {})
    mirrors = " (fitted with their mirrors)" if config["label_generator"].get("mirror") else ""
    parts = [f"<h1>handsoff report</h1><p class='muted'>{html.escape(str(run_dir.resolve().name))}: generator "
             f"<code>{html.escape(config['generator'])}</code>, {len(LabeledFolder(config['labeled']))} labeled "
             f"images{mirrors}, tasks {', '.join(config['tasks'])}; downstream "
             f"{config['downstream'].get('architecture', 'deeplabv3')} on {config['downstream']['backbone']} "
             f"({html.escape(results.get('downstream_init', ''))}).</p>"]

    main = comparison(methods)
    parts.append("<h2>Downstream network on real test images</h2>")
    if main:
        parts.append(metrics_table(main))
        parts.append("<p class='muted'>HandsOff: trained on the generated dataset. Transfer: the same network and "
                     "schedule on the labeled real images alone. Oracle: the same on a large labeled real set. "
                     "Lower is better for depth errors; the best value per column is bold.</p>")
        if any("iou" in m for m in main.values()):
            parts.append("<h3>IoU per class</h3>" + per_class_table(main))
    else:
        parts.append("<p class='muted'>No test set was given: no metrics.</p>")

    curve = {int(k.split("-")[1]): v for k, v in methods.items() if k.startswith("handsoff-")}
    if curve and "handsoff" in methods:
        n_full = results["generation"]["counts"]["kept"]
        curve[n_full] = methods["handsoff"]
        metric = next(c for c in METRIC_LABELS if c in methods["handsoff"])
        lines = {name: methods[name][metric] for name in ("transfer", "oracle")
                 if name in methods and metric in methods[name]}
        parts.append(f"<h2>{METRIC_LABELS[metric]} vs number of generated images</h2>")
        parts.append(line_plot({"HandsOff": [(n, m[metric]) for n, m in curve.items() if metric in m]}, lines,
                               "generated images (log scale)", METRIC_LABELS[metric]))

    inv_png = run_dir / "inversion" / "latents.png"
    inv = dict(results.get("inversion", {}))
    encoder = config["inversion"].get("encoder")
    if not encoder:
        inv.pop("encoder", None)  # without an encoder, optimization starts from the average latent
    parts.append("<h2>Inversion of the labeled images</h2>")
    if inv:
        names = {"average": "average latent", "encoder": "encoder", "refined": "after optimization"}
        parts.append("<table><tr><th>latent</th><th>MSE</th><th>PSNR (dB)</th><th>perceptual</th></tr>"
                     + "".join(f"<tr><td>{names.get(s, s)}</td><td>{f['mse']:.4f}</td><td>{f['psnr']:.2f}</td>"
                               f"<td>{f['perceptual']:.4f}</td></tr>" for s, f in inv.items()) + "</table>")
    if inv_png.exists():
        sheet = Image.open(inv_png)
        parts.append(f"<figure>{_img(sheet, 'reconstructions', min(sheet.width * 2, 420))}<figcaption>real | "
                     f"{'encoder' if encoder else 'average latent'} | after optimization</figcaption></figure>")

    preview = run_dir / "label_generator" / "preview.png"
    if preview.exists():
        fit = results.get("label_generator", {})
        parts.append("<h2>Label generator on the reconstructions</h2>")
        parts.append(f"<p class='muted'>{fit.get('steps', '?')} steps ({fit.get('stop_reason', '')}), "
                     f"{fit.get('seconds', 0):.0f} s. Left: true labels of the real image; right: the label "
                     "generator's labels of its reconstruction.</p>")
        parts.append(f"<figure>{_img(preview, 'label generator preview')}</figure>")

    manifest_path = run_dir / "dataset" / "manifest.jsonl"
    card_path = run_dir / "dataset" / "dataset.json"
    if manifest_path.exists():
        card = json.loads(card_path.read_text())
        classes = card.get("classes") or []
        colors = [c["color"] for c in classes] if classes and isinstance(classes[0], dict) else \
            [default_color(i) for i in range(len(classes))]
        entries = [json.loads(line) for line in manifest_path.read_text().splitlines() if line.strip()]
        scored = [e for e in entries if e["status"] in ("kept", "filtered")]

        # Ranked by the score the run filtered with, so "most uncertain" are the ones filtering dropped.
        ranked = sorted(scored, key=lambda e: e["filter_score"])
        kept = [e for e in entries if e["status"] == "kept"][:samples]
        groups = [("Generated samples", kept), ("Least uncertain", ranked[:max(samples // 2, 1)]),
                  ("Most uncertain (dropped by filtering when marked filtered)", ranked[-max(samples // 2, 1):][::-1])]
        parts.append("<h2>Generated samples</h2><p class='muted'>image | labels (mask, keypoints) | depth | "
                     "per-pixel uncertainty (segmentation JS divergence, depth variance; bright = uncertain)</p>")
        from handsoff.generator import load_generator
        from handsoff.label_generator import load_label_generator

        model = load_label_generator(run_dir / "label_generator", generator=load_generator(config["generator"]))
        with torch.no_grad():
            for title, chosen in groups:
                parts.append(f"<h3>{title}</h3>")
                for e, strip in _sample_strips(model, chosen, colors):
                    u = ", ".join(f"{t} {v:.4f}" for t, v in e["uncertainty"].items())
                    parts.append(f"<figure>{_img(strip, 'sample ' + str(e['index']))}<figcaption>sample "
                                 f"{e['index']} ({e['status']}); image uncertainty {u}</figcaption></figure>")
        stats = results.get("generation") or card.get("source", {}).get("statistics", {})
        if "class_pixel_share" in stats:
            real = config.get("test") or config["labeled"]
            parts.append(f"<h2>Class frequencies</h2><p class='muted'>generated ({stats['counts']['kept']} kept) "
                         f"vs real ({html.escape(Path(real).name)}); blue generated, grey real.</p>")
            parts.append(class_frequency_table(stats, LabeledFolder(real)))

    timings = results.get("timings", {})
    if timings:
        parts.append("<h2>Timings</h2><table><tr><th>stage</th><th>seconds</th></tr>"
                     + "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.0f}</td></tr>" for k, v in timings.items())
                     + "</table>")
    doc = ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>handsoff report</title>"
           f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>")
    path = Path(out) if out else run_dir / "report.html"
    return atomic_write_bytes(path, doc.encode())

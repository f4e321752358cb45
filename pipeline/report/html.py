"""report.html: one self-contained page per run (images inlined, no scripts, opens offline).

Sections: summary per explainer (each metric with its direction); overlay thumbnails (best,
worst and random images by a chosen metric, in its direction); deletion/insertion curves (when
the metrics stored them); metric distributions per class; sanity verdicts (when present);
errors; and for audits the drift between two models.
Everything comes from the run's summary and digest (summary.json, digest.json: merged from the
blocks' markers, a size that does not grow with the run) and, for each thumbnail, its one
heatmap row from its block's file: a report of ten million images reads a few dozen rows.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ..metrics import METRICS
from ..models.preprocess import Preprocess
from ..runstore import Digest, decode_heatmaps, read_heatmap, read_table
from ..runstore.digest import HIST_BINS, SCORE, histogram_stats
from ..sources.decode import decode_image
from ..sources.inputs import InputItem
from ..sources.reader import read_input_bytes
from ..storage import Storage
from .overlay import heatmap_png, overlay

CSS = """
body{font-family:system-ui,sans-serif;margin:2rem;color:#222;max-width:1200px}
h1{font-size:1.5rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ddd;padding:.25rem .5rem;
text-align:right;font-size:.85rem}th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
.thumbs{display:flex;flex-wrap:wrap;gap:.5rem}.thumb{font-size:.75rem;width:150px}
.thumb img{width:150px;height:150px;display:block}.pass{color:#070}.fail{color:#b00}
.muted{color:#777}svg{background:#fafafa;border:1px solid #eee}
"""


@dataclass
class ReportInputs:
    root: str
    summary: dict
    digest: Digest
    title: str = "Salient run"
    preprocess: Preprocess | None = None
    storage: Storage = Storage()
    # thumbnails ranked by this metric key (default: the spec's first metric)
    rank_metric: str | None = None
    drift: dict | None = None  # audit: {"rows": [...], "per_class": [...], "most_changed": [...]}
    sanity: dict | None = None  # {explainer: {"verdict": ..., "similarity": [...]}}
    # {explainer: {"deletion": (mean curve, {"low": [...], "high": [...]} or None), ...}}
    curves: dict = field(default_factory=dict)
    n_thumbs: int = 4
    gate: dict | None = None  # the regression gate's verdict (tracking/compare.py), if run


def render_report(inp: ReportInputs) -> str:
    s = inp.summary
    rank = _rank_metric(s, inp.rank_metric)  # a bad rank metric fails before any work
    for key, e in s["explainers"].items():  # curves and verdicts the metrics carried
        for metric, d in e.get("metric_details", {}).items():
            if "curve" in d and metric in ("deletion", "insertion"):
                inp.curves.setdefault(key, {})[metric] = (d["curve"], d.get("curve_band"))
            if d.get("verdict") and inp.sanity is None:
                inp.sanity = {}
            if d.get("verdict"):
                inp.sanity[f"{key} ({metric})"] = {
                    "verdict": d["verdict"],
                    "detail": f"|Spearman| by step {[round(v, 3) for v in d['spearman_by_step']]}",
                }
    parts = [
        f"<h1>{_e(inp.title)}</h1>",
        f"<p>run <b>{_e(s['run_id'])}</b> &middot; inputs {s['inputs']} = images "
        f"{s['images_ok']} + errors {s['errors']} (lost {s['lost']})</p>",
        _summary_section(s),
        _gate_section(inp.gate),
        _thumbs_section(inp, rank),
        _curves_section(inp.curves),
        _distribution_section(inp),
        _sanity_section(inp.sanity),
        _drift_section(inp.drift),
        _errors_section(inp),
    ]
    body = "\n".join(p for p in parts if p)
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{_e(inp.title)}</title><style>{CSS}</style></head><body>{body}</body></html>"
    )


def _e(x) -> str:
    return html.escape(str(x))


def _f(v) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "&ndash;"
    return f"{v:.3f}" if isinstance(v, float) else _e(v)


def higher_is_better(summary: dict, key: str) -> bool | None:
    """Direction of the metric stored under `key`: True (higher is better), False (lower is
    better) or None (unknown). The run's summary says (spec order, labels resolved); summaries
    of older runs do not, so a key that is a registered metric name falls back to its class."""
    for m in summary.get("metrics") or []:
        if m.get("key") == key:
            hib = m.get("higher_is_better")
            return None if hib is None else bool(hib)
    cls = METRICS.get(key)
    return None if cls is None else bool(cls.higher_is_better)


def _metric_keys(summary: dict) -> list[str]:
    """The run's metric keys: the spec's order when the summary lists them, else sorted."""
    keys = [m["key"] for m in summary.get("metrics") or []]
    extra = {k for e in summary["explainers"].values() for k in e.get("metrics", {})}
    return keys + sorted(extra - set(keys))


def _direction_words(hib: bool) -> str:
    return "higher is better" if hib else "lower is better"


def _metric_label(summary: dict, key: str) -> str:
    """`key` with its arrow, and the direction in words on hover."""
    hib = higher_is_better(summary, key)
    if hib is None:  # no arrow rather than a guessed one
        return f"<span title='direction unknown'>{_e(key)}</span>"
    return f"<span title='{_direction_words(hib)}'>{_e(key)} {'↑' if hib else '↓'}</span>"


def _rank_metric(summary: dict, requested: str | None) -> tuple[str | None, bool]:
    """(metric key, higher is better) the thumbnails are ranked by; (None, True) ranks by
    target score. Without a request: the first metric whose direction is known."""
    keys = _metric_keys(summary)
    if requested is None:
        known = [k for k in keys if higher_is_better(summary, k) is not None]
        if not known:
            return None, True
        return known[0], bool(higher_is_better(summary, known[0]))
    if requested not in keys:
        raise ValueError(
            f"rank metric {requested!r} is not a metric of this run; it has: "
            f"{', '.join(keys) or 'none'}"
        )
    hib = higher_is_better(summary, requested)
    if hib is None:
        # ranking in an unknown direction could call the worst images "best"
        known = [k for k in keys if higher_is_better(summary, k) is not None]
        raise ValueError(
            f"rank metric {requested!r}: its direction (higher or lower is better) is unknown "
            "(the run summary predates metric directions and it is not a registered metric "
            f"name); choose one of: {', '.join(known) or 'none'}"
        )
    return requested, hib


def _summary_section(s: dict) -> str:
    metrics = _metric_keys(s)
    head = "".join(
        f"<th>{_e(h)}</th>" for h in ["explainer", "method", "images", "images/s", "passes/image"]
    ) + "".join(f"<th>{_metric_label(s, m)}</th>" for m in metrics)
    rows = []
    for key, e in s["explainers"].items():
        cells = [key, e["method"], e["images"], e["images_per_s"], e["forward_passes_per_image"]]
        row = "".join(f"<td>{_f(c)}</td>" for c in cells)
        row += "".join(f"<td>{_with_interval(e, m)}</td>" for m in metrics)
        rows.append(f"<tr>{row}</tr>")
    legend = (
        "<p class=muted>↑ higher is better, ↓ lower is better; under each mean its 95% "
        "interval (Wilson for 0/1 metrics) and the number of images it is over</p>"
    )
    return (
        f"<h2 id=summary>Summary per explainer</h2>{legend if metrics else ''}"
        f"<table><tr>{head}</tr>{''.join(rows)}</table>"
    )


def _gate_section(verdict: dict | None) -> str:
    """The gate's verdict and, per gated metric, its evidence: the test, the difference with
    its 95% interval, the p-value and the effect size."""
    if verdict is None:
        return ""
    rows = []
    for c in verdict.get("changes", []):
        if c["tolerance"] is None:
            continue
        ci = c.get("interval")
        cells = [
            c["metric"], c["baseline"], c["current"], c["delta"],
            f"[{_f(ci[0])}, {_f(ci[1])}]" if ci else None, c["tolerance"],
            c.get("test"), None if c.get("p_value") is None else f"{c['p_value']:.3g}",
            c.get("effect"), c["status"],
        ]  # fmt: skip
        rows.append("<tr>" + "".join(f"<td>{_f(x)}</td>" for x in cells) + "</tr>")
    head = "".join(
        f"<th>{h}</th>"
        for h in ("metric", "baseline", "current", "difference", "95% interval", "tolerance",
                  "test", "p", "effect", "status")
    )  # fmt: skip
    notes = " ".join(_e(str(verdict[k])) for k in ("pairing", "note") if verdict.get(k))
    return (
        f"<h2 id=gate>Regression gate: {_e(verdict['gate'].upper())}</h2>"
        f"<p class=muted>baseline {_e(verdict.get('baseline') or 'none')}; a change beyond "
        f"tolerance fails only at p &lt; {_f(verdict.get('alpha'))}. {notes}</p>"
        f"<table><tr>{head}</tr>{''.join(rows)}</table>"
    )


def _with_interval(e: dict, metric: str) -> str:
    value = _f(e["metrics"].get(metric))
    n = e.get("metric_counts", {}).get(metric)
    ci = e.get("metric_intervals", {}).get(metric)
    if n is None:
        return value
    spread = f"[{_f(ci[0])}, {_f(ci[1])}] " if ci else ""
    return f"{value}<br><small class=muted>{spread}n={n}</small>"


def _jpeg_data_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _thumbs_section(inp: ReportInputs, rank: tuple[str | None, bool]) -> str:
    d = inp.digest
    if not d.sample:
        return "<h2 id=thumbnails>Overlays</h2><p class=muted>no heatmaps</p>"
    metric, hib = rank
    out = ["<h2 id=thumbnails>Overlays: best, worst and random images</h2>"]
    why = ""
    if metric is None:
        why = (
            " (no metric of this run has a known direction)"
            if _metric_keys(inp.summary)
            else " (the run has no metrics)"
        )
    out.append(
        f"<p class=muted>ranked by {_e(metric or 'target score')} ({_direction_words(hib)})"
        f"{why}; random images show their target score</p>"
    )
    n = inp.n_thumbs
    for explainer in sorted(d.sample):
        ends = d.extremes.get(explainer, {}).get(metric or SCORE, {"top": [], "bottom": []})
        high, low = ends["top"][:n], ends["bottom"][:n]
        groups = {
            "best": high if hib else low,
            "worst": low if hib else high,
            "random": d.sample[explainer][:n],
        }
        out.append(f"<h3>{_e(explainer)}</h3>")
        for label, group in groups.items():
            cells = [_thumb(inp, explainer, r) for r in group]
            out.append(f"<p>{label}</p><div class=thumbs>{''.join(cells)}</div>")
    return "\n".join(out)


def _thumb(inp: ReportInputs, explainer: str, row: dict) -> str:
    """One thumbnail: its heatmap row read from its block's file, over its source image."""
    heat = read_heatmap(
        inp.root, row["block_id"], row["image_id"], explainer, row["target"], inp.storage
    )
    item = InputItem(row["image_id"], row["source_uri"], row["source_member"])
    thumb = source_overlay(item, heat, inp.preprocess, inp.storage, 150)
    return (
        f"<div class=thumb><img alt='{_e(row['image_id'])}' src='{_jpeg_data_uri(thumb)}'>"
        f"{_e(row['image_id'])}<br>{_e(row['target_name'])} &middot; {_f(row['value'])}</div>"
    )


def source_overlay(
    item: InputItem, heat: np.ndarray, preprocess: Preprocess | None, storage: Storage, size: int
) -> Image.Image:
    """A stored map over its source image as the model saw it (the run's preprocessing), at
    size x size; on grey when the source cannot be read any more."""
    pre = preprocess or Preprocess()
    try:
        image = pre.resize(decode_image(read_input_bytes(item, storage), item.image_id))
    except (OSError, ValueError):
        image = Image.new("RGB", (pre.size, pre.size), (128, 128, 128))
    up = Image.fromarray(heat.astype(np.float32), mode="F").resize(image.size, Image.BILINEAR)
    return overlay(image, np.asarray(up)).resize((size, size))


def _points(ys: list[float], w: int, h: int) -> list[str]:
    return [f"{i / (len(ys) - 1) * w:.1f},{h - float(y) * h:.1f}" for i, y in enumerate(ys)]


def _polyline(ys: list[float], w=260, h=120, colour="#36c") -> str:
    if len(ys) < 2:
        return ""
    pts = " ".join(_points(ys, w, h))
    return f"<polyline fill=none stroke='{colour}' stroke-width=2 points='{pts}'/>"


def _band(band: dict | None, w=260, h=120, colour="#36c") -> str:
    """The 95% band around a mean curve, as a shaded polygon (low forwards, high back)."""
    if not band or len(band["low"]) < 2:
        return ""
    pts = " ".join(_points(band["low"], w, h) + _points(band["high"], w, h)[::-1])
    return f"<polygon class=band fill='{colour}' fill-opacity=0.2 stroke=none points='{pts}'/>"


def _curves_section(curves: dict) -> str:
    if not curves:
        return ""
    out = ["<h2 id=curves>Deletion and insertion curves</h2><div class=thumbs>"]
    for explainer, per_metric in curves.items():
        lines = "".join(
            _band(band, colour=c) + _polyline(ys, colour=c)
            for (_, (ys, band)), c in zip(
                sorted(per_metric.items()), ("#c33", "#36c", "#393"), strict=False
            )
        )
        legend = ", ".join(_e(m) for m in sorted(per_metric))
        out.append(
            f"<div><svg width=260 height=120 role=img>{lines}</svg><br>"
            f"{_e(explainer)}: {legend} (red, blue; shaded: 95% band of the mean)</div>"
        )
    out.append("</div>")
    return "\n".join(out)


def _distribution_section(inp: ReportInputs) -> str:
    head = "<h2 id=distributions>Metric distributions per class</h2>"
    groups = [
        (explainer, metric, per_class)
        for explainer, per_metric in sorted(inp.digest.classes.items())
        for metric, per_class in sorted(per_metric.items())
    ]
    if not groups:
        return f"{head}<p class=muted>no metrics</p>"
    out = [
        head,
        f"<p class=muted>the 12 classes with most values; histograms over [0, 1] in "
        f"{HIST_BINS} bins, values outside it in the end bars</p>",
    ]
    for explainer, metric, per_class in groups:
        stats = {c: histogram_stats(h) for c, h in per_class.items()}
        top = sorted(stats.items(), key=lambda kv: (-kv[1]["n"], kv[0]))[:12]
        rows = "".join(
            f"<tr><td>{_e(c)}</td><td>{h['n']}</td><td>{_f(h['mean'])}</td>"
            f"<td>{_f(h['std'])}</td><td>{_histogram(h)}</td></tr>"
            for c, h in top
        )
        out.append(
            f"<h3>{_e(explainer)} &middot; {_metric_label(inp.summary, metric)}</h3>"
            "<table><tr><th>class</th>"
            f"<th>n</th><th>mean</th><th>std</th><th>histogram</th></tr>{rows}</table>"
        )
    return "\n".join(out)


def _histogram(h: dict, w: int = 120, height: int = 24) -> str:
    counts = [h["below"], *h["bins"], h["above"]]
    top = max(max(counts), 1)
    bw = w / len(counts)
    bars = "".join(
        f"<rect x={i * bw:.1f} y={height - c / top * height:.1f} width={bw - 1:.1f} "
        f"height={c / top * height:.1f} fill='{'#999' if i in (0, len(counts) - 1) else '#36c'}'/>"
        for i, c in enumerate(counts)
    )
    return f"<svg width={w} height={height} role=img>{bars}</svg>"


def _sanity_section(sanity: dict | None) -> str:
    if not sanity:
        return ""
    rows = "".join(
        f"<tr><td>{_e(k)}</td><td class={'pass' if v.get('verdict') == 'pass' else 'fail'}>"
        f"{_e(v.get('verdict'))}</td><td>{_e(v.get('detail', ''))}</td></tr>"
        for k, v in sanity.items()
    )
    return (
        "<h2 id=sanity>Sanity checks (parameter randomisation)</h2>"
        f"<table><tr><th>explainer</th><th>verdict</th><th>detail</th></tr>{rows}</table>"
    )


def _drift_section(drift: dict | None) -> str:
    if not drift:
        return ""
    head = f"<h2 id=drift>Explanation drift: {_e(drift.get('against', ''))}</h2>"
    per_class = "".join(
        f"<tr><td>{_e(r['class'])}</td><td>{r['n']}</td><td>{_f(r['mean_rank_correlation'])}"
        f"</td></tr>"
        for r in drift.get("per_class", [])
    )
    most = "".join(
        f"<tr><td>{_e(r['image_id'])}</td><td>{_e(r['explainer'])}</td>"
        f"<td>{_f(r['rank_correlation'])}</td><td>{_e(r.get('prediction_changed', ''))}</td></tr>"
        for r in drift.get("most_changed", [])
    )
    summary = "".join(
        f"<tr><td>{_e(k)}</td><td>{_f(v)}</td></tr>" for k, v in drift.get("summary", {}).items()
    )
    return (
        f"{head}<table>{summary}</table><h3>per class</h3><table><tr><th>class</th><th>n</th>"
        f"<th>mean rank correlation</th></tr>{per_class}</table><h3>images that changed "
        f"most</h3><table><tr><th>image</th><th>explainer</th><th>rank correlation</th>"
        f"<th>prediction changed</th></tr>{most}</table>"
    )


def _errors_section(inp: ReportInputs) -> str:
    d = inp.digest
    total = sum(d.error_counts.values())
    if total == 0:
        return "<h2 id=errors>Errors</h2><p>none</p>"
    kinds = "".join(
        f"<tr><td>{_e(key.split(chr(9))[0])}</td><td>{_e(key.split(chr(9))[1])}</td>"
        f"<td>{n}</td></tr>"
        for key, n in sorted(d.error_counts.items(), key=lambda kv: -kv[1])
    )
    rows = "".join(
        f"<tr><td>{_e(r['image_id'])}</td><td>{_e(r['stage'])}</td><td>{_e(r['error_type'])}</td>"
        f"<td>{_e(r['message'][:200])}</td></tr>"
        for r in d.first_errors
    )
    return (
        f"<h2 id=errors>Errors ({total})</h2><table><tr><th>stage</th><th>type</th><th>rows</th>"
        f"</tr>{kinds}</table><p class=muted>the first {len(d.first_errors)}, fatal first</p>"
        f"<table><tr><th>image</th><th>stage</th><th>type</th><th>message</th></tr>{rows}</table>"
    )


# -- SpRAy, added to a finished run's report by `salient spray` ----------------------------------
SPRAY_BEGIN, SPRAY_END = "<!-- spray:{} -->", "<!-- /spray:{} -->"


def spray_section(
    root: str, explainer: str, clusters: list[dict], preprocess: Preprocess | None,
    storage: Storage = Storage(), examples: int = 4,
) -> str:  # fmt: skip
    """Per class, the SpRAy clusters of one explainer in rank order (most outlying first), each
    with its mean map and example overlays. `clusters`: spray_clusters rows (analysis/spray.py).
    The examples' maps are read by key, all of the explainer's at once."""
    wanted = sorted({i for c in clusters for i in c["examples"][:examples]})
    rows = read_table(
        root, "heatmaps", storage,
        columns=["image_id", "target", "source_uri", "source_member", "heatmap", "map_min",
                 "map_max"],
        filters=[("image_id", "in", wanted), ("explainer", "=", explainer)],
    ) if wanted else None  # fmt: skip
    maps = decode_heatmaps(rows) if rows is not None and rows.num_rows else []
    by_key = {}
    for r, m in zip(rows.to_pylist() if rows is not None else [], maps, strict=False):
        by_key[(r["image_id"], r["target"])] = (r, m)
    out = [
        f"<h2 id=spray-{_e(explainer)}>SpRAy: {_e(explainer)}</h2><p class=muted>per class, "
        "clusters of similar maps, the most outlying first (farthest from the class's mean map, "
        "or most relevance outside the boxes): candidate spurious strategies</p>"
    ]
    for target in sorted({c["target"] for c in clusters}):
        ranked = sorted(
            (c for c in clusters if c["target"] == target), key=lambda c: c["cluster_rank"]
        )
        out.append(f"<h3>{_e(ranked[0]['target_name'] or target)}</h3><table><tr><th>rank</th>"
                   "<th>mean map</th><th>images</th><th>share</th><th>score</th><th>examples</th>"
                   "</tr>")  # fmt: skip
        for c in ranked:
            size = c["map_size"]
            mean = heatmap_png(np.asarray(c["mean_map"], np.float32).reshape(size, size), 80)
            thumbs = []
            for i in c["examples"][:examples]:
                found = by_key.get((i, target))
                if found is None:
                    continue
                r, m = found
                item = InputItem(i, r["source_uri"], r["source_member"])
                thumb = source_overlay(item, m, preprocess, storage, 80)
                thumbs.append(f"<img alt='{_e(i)}' title='{_e(i)}' src='{_jpeg_data_uri(thumb)}'>")
            mean_uri = "data:image/png;base64," + base64.b64encode(mean).decode()
            out.append(
                f"<tr><td>{c['cluster_rank']}</td><td><img alt='mean map' src='{mean_uri}'></td>"
                f"<td>{c['n_images']}</td><td>{_f(c['share'])}</td><td>{_f(c['score'])}</td>"
                f"<td>{''.join(thumbs)}</td></tr>"
            )
        out.append("</table>")
    return "\n".join(out)


def with_section(report: str, key: str, section: str) -> str:
    """The report with `section` under `key` (replacing an earlier one), before </body>: a
    finished run's report gains an analysis without being rendered again from its inputs."""
    begin, end = SPRAY_BEGIN.format(key), SPRAY_END.format(key)
    block = f"{begin}{section}{end}"
    if begin in report and end in report:
        head, rest = report.split(begin, 1)
        return head + block + rest.split(end, 1)[1]
    return report.replace("</body>", block + "</body>", 1)

"""The decision report of an experiment: ``report.html`` (one self-contained file: inline CSS
and inline SVG drawn here, nothing fetched, no script) and ``results.json`` (the analysis).

Sections: the SRM check; the verdict per arm, metric and scenario (with the truth beside it when
a simulation knows it); lift and interval plots; the sequential boundary over time; CUPED;
power; the off-policy estimates beside the online result.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shopmtl.jsonsafe import json_safe

COLORS = {"better": "#1a7f37", "worse": "#cf222e", "no difference": "#57606a",
          "blocked (SRM)": "#9a6700"}
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px;color:#24292f;
max-width:1100px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #d0d7de}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
td,th{border:1px solid #d0d7de;padding:3px 8px;text-align:right}
th{background:#f6f8fa}td.l,th.l{text-align:left}
.ok{color:#1a7f37;font-weight:600}.bad{color:#cf222e;font-weight:600}
figure{margin:10px 0}figcaption{font-size:12px;color:#57606a}
svg{background:#fff;border:1px solid #eaeef2}
.grid{display:flex;flex-wrap:wrap;gap:12px}
"""


def _f(x: Any, fmt: str = ".4g") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x, fmt)


def _pct(x: Any) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{100 * x:+.2f}%"


def _e(s: Any) -> str:
    return html.escape(str(s))


class _Scale:
    """Linear map of [lo, hi] onto pixel range [a, b]."""

    def __init__(self, lo: float, hi: float, a: float, b: float) -> None:
        if not hi > lo:
            lo, hi = lo - 1, hi + 1
        self.lo, self.hi, self.a, self.b = lo, hi, a, b

    def __call__(self, x: float) -> float:
        return self.a + (x - self.lo) / (self.hi - self.lo) * (self.b - self.a)


def _finite(xs: Sequence[Any]) -> list[float]:
    return [float(x) for x in xs if x is not None and math.isfinite(x)]


def forest_svg(rows: list[dict[str, Any]], title: str) -> str:
    """Relative lift and its interval per row (label, rel_lift, rel_ci, decision, truth)."""
    width, row_h, left, right, top = 760, 20, 230, 40, 30
    height = top + row_h * len(rows) + 30
    vals = _finite([v for r in rows for v in (r["rel_lift"], *r["rel_ci"], r.get("truth"))])
    lo, hi = (min([*vals, 0.0]), max([*vals, 0.0])) if vals else (-0.1, 0.1)
    pad = 0.05 * (hi - lo or 1)
    x = _Scale(lo - pad, hi + pad, left, width - right)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'role="img" aria-label="{_e(title)}">',
           f'<text x="{left}" y="18" font-size="13" font-weight="600">{_e(title)}</text>',
           f'<line x1="{x(0):.1f}" y1="{top - 6}" x2="{x(0):.1f}" y2="{height - 24}" '
           'stroke="#8c959f" stroke-dasharray="3,3"/>']
    for i, r in enumerate(rows):
        y = top + row_h * i + row_h / 2
        color = COLORS.get(r["decision"], "#57606a")
        out.append(f'<text x="{left - 8}" y="{y + 4:.1f}" font-size="12" '
                   f'text-anchor="end">{_e(r["label"])}</text>')
        lo_ci, hi_ci = r["rel_ci"]
        if lo_ci is not None and hi_ci is not None and math.isfinite(lo_ci) \
                and math.isfinite(hi_ci):
            out.append(f'<line x1="{x(lo_ci):.1f}" y1="{y:.1f}" x2="{x(hi_ci):.1f}" '
                       f'y2="{y:.1f}" stroke="{color}" stroke-width="2"/>')
        if r["rel_lift"] is not None and math.isfinite(r["rel_lift"]):
            out.append(f'<circle cx="{x(r["rel_lift"]):.1f}" cy="{y:.1f}" r="4" '
                       f'fill="{color}"><title>{_e(r["label"])}: {_pct(r["rel_lift"])} '
                       f'({_e(r["decision"])})</title></circle>')
        t = r.get("truth")
        if t is not None and math.isfinite(t):
            out.append(f'<path d="M{x(t):.1f},{y - 6:.1f} l5,6 l-5,6 l-5,-6 z" fill="none" '
                       'stroke="#0969da" stroke-width="1.5"/>')
    for v in (lo, 0.0, hi):
        out.append(f'<text x="{x(v):.1f}" y="{height - 8}" font-size="11" '
                   f'text-anchor="middle">{_pct(v)}</text>')
    out.append("</svg>")
    return "".join(out)


def sequential_svg(path: dict[str, Any], title: str, alpha: float) -> str:
    """z over the looks with the group-sequential and mSPRT boundaries and the naive +-z."""
    from statistics import NormalDist

    width, height, left, bottom, top = 360, 220, 40, 28, 26
    z = path["z"]
    n = len(z)
    naive = NormalDist().inv_cdf(1 - alpha / 2)
    ys = _finite([*z, *path["gst_bound"], *path["msprt_bound"], naive])
    ymax = min(max([*ys, 3.0]), 12.0)
    x = _Scale(1, max(n, 2), left + 8, width - 10)
    y = _Scale(-ymax, ymax, height - bottom, top)

    def poly(vals: Sequence[Any], sign: float, color: str, dash: str = "") -> str:
        pts = [f"{x(i + 1):.1f},{y(max(-ymax, min(ymax, sign * v))):.1f}"
               for i, v in enumerate(vals) if v is not None and math.isfinite(v)]
        if not pts:
            return ""
        d = f' stroke-dasharray="{dash}"' if dash else ""
        return (f'<polyline points="{" ".join(pts)}" fill="none" stroke="{color}" '
                f'stroke-width="1.5"{d}/>')

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'role="img" aria-label="{_e(title)}">',
           f'<text x="{left}" y="16" font-size="12" font-weight="600">{_e(title)}</text>',
           f'<line x1="{left}" y1="{y(0):.1f}" x2="{width - 10}" y2="{y(0):.1f}" '
           'stroke="#d0d7de"/>']
    for s in (1, -1):
        out.append(poly(path["gst_bound"], s, "#cf222e"))
        out.append(poly(path["msprt_bound"], s, "#8250df", "6,3"))
        out.append(poly([naive] * n, s, "#8c959f", "2,3"))
    out.append(poly(z, 1, "#0969da"))
    for i, v in enumerate(z):
        if v is not None and math.isfinite(v):
            out.append(f'<circle cx="{x(i + 1):.1f}" cy="{y(max(-ymax, min(ymax, v))):.1f}" '
                       'r="2.5" fill="#0969da"/>')
    for v in (-ymax, 0, ymax):
        out.append(f'<text x="{left - 4}" y="{y(v) + 4:.1f}" font-size="10" '
                   f'text-anchor="end">{v:.1f}</text>')
    out.append(f'<text x="{width / 2:.0f}" y="{height - 6}" font-size="10" '
               'text-anchor="middle">look (time slice)</text></svg>')
    return "".join(out)


def ope_svg(ope: dict[str, Any]) -> str:
    """Each policy x metric: the IPS / SNIPS / DR estimates with intervals and the online
    value (diamond)."""
    rows = []
    for policy, metrics in ope.items():
        for metric, est in metrics.items():
            for k in ("ips", "snips", "dr"):
                if k in est:
                    rows.append({"label": f"{policy} {metric} {k}",
                                 "v": est[k].get("estimate"), "ci": est[k].get("ci", [None] * 2),
                                 "online": est.get("online")})
    width, row_h, left, right, top = 760, 18, 230, 40, 30
    height = top + row_h * len(rows) + 30
    vals = _finite([v for r in rows for v in (r["v"], *(r["ci"] or []), r["online"])])
    lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
    pad = 0.05 * (hi - lo or 1)
    x = _Scale(lo - pad, hi + pad, left, width - right)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           'role="img" aria-label="off-policy estimates">',
           f'<text x="{left}" y="18" font-size="13" font-weight="600">Off-policy estimates '
           '(dots, intervals) and the online value (diamonds)</text>']
    for i, r in enumerate(rows):
        y = top + row_h * i + row_h / 2
        out.append(f'<text x="{left - 8}" y="{y + 4:.1f}" font-size="12" '
                   f'text-anchor="end">{_e(r["label"])}</text>')
        ci = _finite(r["ci"] or [])
        if len(ci) == 2:
            out.append(f'<line x1="{x(ci[0]):.1f}" y1="{y:.1f}" x2="{x(ci[1]):.1f}" '
                       f'y2="{y:.1f}" stroke="#57606a" stroke-width="2"/>')
        if r["v"] is not None and math.isfinite(r["v"]):
            out.append(f'<circle cx="{x(r["v"]):.1f}" cy="{y:.1f}" r="4" fill="#57606a"/>')
        if r["online"] is not None and math.isfinite(r["online"]):
            o = x(r["online"])
            out.append(f'<path d="M{o:.1f},{y - 6:.1f} l5,6 l-5,6 l-5,-6 z" fill="none" '
                       'stroke="#0969da" stroke-width="1.5"/>')
    for v in (lo, hi):
        out.append(f'<text x="{x(v):.1f}" y="{height - 8}" font-size="11" '
                   f'text-anchor="middle">{_f(v)}</text>')
    out.append("</svg>")
    return "".join(out)


def _table(head: Sequence[str], rows: list[Sequence[Any]], left: int = 1) -> str:
    th = "".join(f'<th class="{"l" if i < left else ""}">{_e(h)}</th>'
                 for i, h in enumerate(head))
    body = "".join("<tr>" + "".join(f'<td class="{"l" if i < left else ""}">{c}</td>'
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def render(results: dict[str, Any], truth: dict | None = None, ope: dict | None = None) -> str:
    """The report's HTML text."""
    r = results
    alpha = r["alpha"]
    srm = r["srm"]
    parts = [f"<h1>A/B test: {_e(r.get('experiment') or 'experiment')}</h1>",
             f"<p>Control <b>{_e(r['control'])}</b>; alpha {alpha}; {_e(r['correction'])} "
             "correction across metrics x scenarios per arm (guardrails their own family).</p>",
             "<h2>Sample-ratio mismatch</h2>",
             f'<p class="{"ok" if srm["ok"] else "bad"}">'
             f'{"OK" if srm["ok"] else "FAILED: every decision is blocked"}: chi-square '
             f'p = {_f(srm["p"])} (blocks below {r["srm_threshold"]})</p>',
             _table(["arm", "units", "share", "expected"],
                    [[_e(a), n, f"{n / max(1, sum(srm['counts'].values())):.4f}",
                      f"{srm['expected'].get(a, 0):.4f}"] for a, n in srm["counts"].items()])]
    for note in r.get("notes", []):
        parts.append(f"<p><i>{_e(note)}</i></p>")
    for arm, body in r["arms"].items():
        parts.append(f"<h2>{_e(arm)} vs {_e(r['control'])}: verdicts</h2>")
        rows, forest = [], []
        for metric, by_scen in body["metrics"].items():
            for scen, e in by_scen.items():
                tv = (((truth or {}).get(arm) or {}).get(metric) or {}).get(scen)
                color = COLORS.get(e["decision"], "#57606a")
                rows.append([_e(metric), _e(scen), _f(e["control"]), _f(e["value"]),
                             _pct(e["rel_lift"]),
                             f"[{_pct(e['rel_ci'][0])}, {_pct(e['rel_ci'][1])}]",
                             f"[{_f(e['abs_ci'][0])}, {_f(e['abs_ci'][1])}]",
                             f"[{_f(e['boot_abs_ci'][0])}, {_f(e['boot_abs_ci'][1])}]",
                             _f(e["p"], ".3g"), _f(e["p_adj"], ".3g"),
                             f'<b style="color:{color}">{_e(e["decision"])}</b>',
                             _pct(tv["rel_lift"]) if tv else "-"])
                forest.append({"label": f"{metric} / {scen}", "rel_lift": e["rel_lift"],
                               "rel_ci": e["rel_ci"], "decision": e["decision"],
                               "truth": tv["rel_lift"] if tv else None})
        parts.append(_table(["metric", "scenario", "control", "arm", "rel. lift", "rel. CI",
                             "abs. CI (delta/Welch)", "abs. CI (bootstrap)", "p", "p adj.",
                             "decision", "true rel. lift"], rows, left=2))
        parts.append('<figure class="plot">' + forest_svg(
            forest, f"{arm}: relative lift and {100 * (1 - alpha):.0f}% interval") +
            "<figcaption>dot: estimate; bar: interval; colour: decision; blue diamond: the "
            "true lift (simulation)</figcaption></figure>")
        seq = r["sequential"]["arms"].get(arm, {})
        parts.append(f"<h2>{_e(arm)}: sequential monitoring</h2><p>{_e(r['sequential']['rule'])}"
                     ". Red: group-sequential boundary; purple dashed: mSPRT boundary; grey "
                     "dotted: the naive fixed-horizon +-z (crossing it is what peeking does)."
                     "</p><div class='grid'>")
        for metric, path in seq.items():
            stops = (f"GST stop at look {path['gst_stop'] + 1}" if path["gst_stop"] is not None
                     else "GST: no stop")
            parts.append('<figure class="plot">' + sequential_svg(path, f"{metric}: z by look",
                                                                  alpha)
                         + f"<figcaption>{_e(stops)}; mSPRT always-valid p at the end "
                         f"{_f(path['msprt_p'][-1], '.3g')}</figcaption></figure>")
        parts.append("</div>")
        cu = r["cuped"].get(arm, {})
        parts.append(f"<h2>{_e(arm)}: CUPED (pre-period covariate)</h2>")
        parts.append(_table(["metric", "scenario", "theta", "variance reduction",
                             "rel. lift", "rel. CI", "p"],
                            [[_e(m), _e(s), _f(c.get("theta")), _pct(c.get("var_reduction")),
                              _pct(c.get("rel_lift")),
                              f"[{_pct((c.get('rel_ci') or [None])[0])}, "
                              f"{_pct((c.get('rel_ci') or [None, None])[1])}]",
                              _f(c.get("p"), ".3g")]
                             for m, by in cu.items() for s, c in by.items()], left=2))
        pw = r["power"].get(arm, {})
        parts.append(f"<h2>{_e(arm)}: power</h2><p>The lift each metric had 80 % power to "
                     "detect with this sample (scenario all).</p>")
        parts.append(_table(["metric", "SE", "MDE (abs.)", "MDE (rel.)"],
                            [[_e(m), _f(p["se"]), _f(p["mde_abs_80"]),
                              _pct(p["mde_rel_80"]).lstrip("+")] for m, p in pw.items()]))
    cl = r.get("clustering") or {}
    if cl:
        parts.append(f"<h2>Clustering</h2><p>{_e(cl['note'])}: design effect "
                     f"{_f(cl['ctr_design_effect'], '.3f')} at "
                     f"{_f(cl['impressions_per_unit'], '.1f')} impressions per unit.</p>")
    if ope:
        parts.append("<h2>Off-policy estimates beside the online result</h2>")
        rows = [[_e(p), _e(m), *(_f((est.get(k) or {}).get("estimate")) for k in
                                 ("ips", "snips", "dr")), _f(est.get("online"))]
                for p, ms in ope.items() for m, est in ms.items()]
        parts.append(_table(["policy", "metric", "IPS", "SNIPS", "DR", "online"], rows, 2))
        parts.append('<figure class="plot">' + ope_svg(ope) + "</figure>")
    body = "\n".join(parts)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f"<title>A/B report: {_e(r.get('experiment') or '')}</title>"
            f"<style>{CSS}</style></head><body>{body}</body></html>")


def write_report(results: dict[str, Any], out_dir: str | Path, truth: dict | None = None,
                 ope: dict | None = None) -> tuple[Path, Path]:
    """out_dir/report.html and out_dir/results.json (the results, truth and OPE as given)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    page = out / "report.html"
    page.write_text(render(results, truth, ope), encoding="utf-8")
    doc = out / "results.json"
    doc.write_text(json.dumps(json_safe({**results, "truth": truth, "ope": ope}), indent=1,
                              allow_nan=False), encoding="utf-8")
    return page, doc

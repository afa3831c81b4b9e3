#!/usr/bin/env python3
"""Draws each Grafana dashboard of deploy/grafana/dashboards/ from live data, without Grafana.

For every panel of a dashboard's JSON it takes the title, the grid position (gridPos) and the
PromQL of its targets, runs the queries against a real Prometheus (instant queries for stat,
bar gauge and table panels, range queries for time series and state timelines), and draws the
result in the panel's place on a 24-column grid, with the panel's first query printed under it.
The pictures in docs/img/ were made this way from `siteflow demo --scenario
pipelines/hagiang/scenarios/district-congestion.yaml` scraped by Prometheus with
deploy/prometheus/rules/ (see docs/quickstart.md). They are renders of the panel queries, not
Grafana screenshots: colours, fonts and panel options differ from Grafana's.

Usage:
  PYTHONPATH=DIR_WITH_MATPLOTLIB python3 scripts/render-dashboards.py \
      --prometheus http://127.0.0.1:9090 --out docs/img [--minutes 15] [--site meo-vac.pai-lung]

Needs matplotlib (pip install matplotlib); only the standard library otherwise.
"""

import argparse
import datetime
import glob
import json
import os
import re
import textwrap
import urllib.parse
import urllib.request

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COL_IN = 16 / 24  # inches per grid column
ROW_IN = 0.30  # inches per grid row
MAX_PANEL_H = 16  # taller panels (the 242-site state timeline) are drawn this tall
STATE_COLOURS = {0: "#56a64b", 1: "#f2cc0c", 2: "#e02f44", 3: "#8e8e8e"}


def query(prom, path, params):
    url = f"{prom}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=30) as r:
        body = json.load(r)
    if body.get("status") != "success":
        raise RuntimeError(f"{url}: {body}")
    return body["data"]["result"]


def substitute(expr, variables):
    for name, value in variables.items():
        expr = expr.replace("${" + name + "}", value).replace("$" + name, value)
    return expr


def legend(fmt, metric):
    if not fmt or fmt == "__auto":
        return ", ".join(f"{k}={v}" for k, v in sorted(metric.items()) if k != "__name__") or "value"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: metric.get(m.group(1), ""), fmt)


def fmt_value(v, unit):
    if v != v:  # NaN
        return "–"
    if unit == "percentunit":
        return f"{v * 100:.1f} %"
    suffix = {"bps": "bit/s", "Bps": "B/s", "bytes": "B", "reqps": "/s", "pps": "p/s", "s": "s"}.get(unit, "")
    a = abs(v)
    for div, p in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if a >= div and unit not in ("s", "percentunit"):
            return f"{v / div:.3g} {p}{suffix}"
    if unit == "s" and a >= 60:
        return f"{v / 60:.3g} min"
    return f"{v:.3g} {suffix}".strip()


def panel_unit(p):
    return p.get("fieldConfig", {}).get("defaults", {}).get("unit", "none")


def value_mappings(p):
    """Value → (text, colour) from the panel's value mappings."""
    out = {}
    for m in p.get("fieldConfig", {}).get("defaults", {}).get("mappings", []):
        if m.get("type") == "value":
            for k, o in m.get("options", {}).items():
                try:
                    out[float(k)] = (o.get("text", k), o.get("color"))
                except ValueError:
                    pass
    return out


GRAFANA_COLOURS = {"green": "#56a64b", "yellow": "#f2cc0c", "red": "#e02f44", "orange": "#ff9830", "blue": "#3274d9", "gray": "#8e8e8e", "grey": "#8e8e8e", "dark-red": "#ad0317", "purple": "#a352cc"}


def colour(c, fallback):
    return GRAFANA_COLOURS.get(c, c) if c else fallback


def threshold_colour(p, v):
    """The colour of the panel's threshold step that `v` reaches (Grafana's absolute thresholds)."""
    steps = p.get("fieldConfig", {}).get("defaults", {}).get("thresholds", {}).get("steps", [])
    c = "#5794f2"
    for s in steps:
        if s.get("value") is None or v >= s["value"]:
            c = colour(s.get("color"), c)
    return c


def draw_panel(fig, p, box, prom, variables, now, minutes, note_y):
    x0, y0, w, h = box
    if p["type"] in ("timeseries", "state-timeline"):
        left = 0.055 if p["type"] == "timeseries" else 0.2
        x0, w = x0 + left * w * 24 / p["gridPos"]["w"] / 2, w - left * w * 24 / p["gridPos"]["w"] / 2
    ax = fig.add_axes([x0, y0, w, h])
    ax.set_facecolor("#fbfbfb")
    for s in ax.spines.values():
        s.set_color("#c8c8c8")
    title = p.get("title", "")
    kind = p["type"]
    unit = panel_unit(p)
    targets = [t for t in p.get("targets", []) if t.get("expr")]
    exprs = [substitute(t["expr"], variables) for t in targets]
    note = " ".join(exprs[0].split()) if exprs else ""
    ax.set_title(f"{title}  [{kind}]", loc="left", fontsize=9, fontweight="bold", pad=3)
    fig.text(box[0] + 0.003, note_y, textwrap.shorten(note, int(box[2] * 230), placeholder=" …"), fontsize=5.5, family="monospace", color="#707070", va="top")
    if kind in ("stat", "bargauge", "table"):
        rows = []
        for t, e in zip(targets, exprs):
            for r in query(prom, "query", {"query": e, "time": now}):
                rows.append((legend(t.get("legendFormat"), r["metric"]), float(r["value"][1]), r["metric"]))
        ax.set_xticks([])
        ax.set_yticks([])
        if not rows:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", color="#999", fontsize=10, transform=ax.transAxes)
        elif kind == "stat":
            rows = rows[:6]
            n = len(rows)
            for i, (name, v, _) in enumerate(rows):
                cx = (i + 0.5) / n
                ax.text(cx, 0.55, fmt_value(v, unit), ha="center", va="center", fontsize=13 if n < 4 else 10, fontweight="bold", color="#1f60c4", transform=ax.transAxes)
                ax.text(cx, 0.2, name, ha="center", va="center", fontsize=7, color="#444", transform=ax.transAxes)
        elif kind == "bargauge":
            rows = sorted(rows, key=lambda r: -r[1])[:15]
            ax.remove()
            ax = fig.add_axes([x0 + w * 0.42, y0 + h * 0.03, w * 0.5, h * 0.9])
            names = [r[0] for r in rows][::-1]
            vals = [r[1] for r in rows][::-1]
            ax.barh(range(len(vals)), vals, color=[threshold_colour(p, v) for v in vals])
            ax.set_yticks(range(len(vals)))
            ax.set_yticklabels([textwrap.shorten(n, 48) for n in names], fontsize=6)
            ax.tick_params(axis="x", labelsize=6)
            for i, v in enumerate(vals):
                ax.text(v, i, " " + fmt_value(v, unit), va="center", fontsize=5.5)
            ax.set_title(f"{title}  [{kind}]", loc="left", fontsize=9, fontweight="bold", pad=3, x=-0.8)
        else:  # table: one line per row, label values then the value
            keys = sorted({k for _, _, m in rows for k in m if k != "__name__"})
            width = {k: min(26, max(len(k), *(len(m.get(k, "")) for _, _, m in rows))) for k in keys}
            cell = lambda text, k: (text if len(text) <= width[k] else text[: width[k] - 1] + "…").ljust(width[k])  # noqa: E731
            lines = ["  ".join(cell(k, k) for k in keys) + "  value"]
            for _, v, m in sorted(rows, key=lambda r: [r[2].get(k, "") for k in keys])[:18]:
                lines.append("  ".join(cell(m.get(k, ""), k) for k in keys) + f"  {fmt_value(v, unit)}")
            if len(rows) > 18:
                lines.append(f"… {len(rows) - 18} more rows")
            ax.text(0.01, 0.97, "\n".join(lines), va="top", ha="left", fontsize=5.5, family="monospace", transform=ax.transAxes)
        return
    if kind in ("timeseries", "state-timeline"):
        start = now - minutes * 60
        series = []
        for t, e in zip(targets, exprs):
            for r in query(prom, "query_range", {"query": e, "start": start, "end": now, "step": 15}):
                ts = [(float(a) - now) / 60 for a, _ in r["values"]]
                vs = [float(b) for _, b in r["values"]]
                series.append((legend(t.get("legendFormat"), r["metric"]), ts, vs))
        if not series:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.text(0.5, 0.5, "no data", ha="center", va="center", color="#999", fontsize=10, transform=ax.transAxes)
            return
        ax.tick_params(labelsize=6)
        ax.set_xlim(-minutes, 0)
        if kind == "timeseries":
            shown = sorted(series, key=lambda s: -max(s[2]))[:8]
            for name, ts, vs in shown:
                ax.plot(ts, vs, linewidth=1, label=textwrap.shorten(name, 40))
            ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: fmt_value(v, unit)))
            extra = f" (+{len(series) - 8} more)" if len(series) > 8 else ""
            ax.legend(fontsize=5.5, loc="upper left", frameon=False, ncol=2 if len(shown) > 4 else 1, title=extra or None, title_fontsize=5.5)
            ax.grid(alpha=0.3)
        else:
            mapping = value_mappings(p)
            rows_fit = max(3, int(min(p["gridPos"]["h"], MAX_PANEL_H) * 1.3))
            worst = sorted(series, key=lambda s: (-max(s[2]), s[0]))[:rows_fit]
            for i, (name, ts, vs) in enumerate(worst):
                for t, v in zip(ts, vs):
                    text, c = mapping.get(v, (None, None))
                    ax.barh(i, 0.25, left=t, height=0.8, color=colour(c, STATE_COLOURS.get(int(v), "#5794f2")), linewidth=0)
            ax.set_yticks(range(len(worst)))
            ax.set_yticklabels([textwrap.shorten(s[0], 44) for s in worst], fontsize=5.5)
            ax.invert_yaxis()
            if len(series) > len(worst):
                ax.text(1.0, 1.01, f"{len(worst)} of {len(series)} rows drawn (worst first)", ha="right", va="bottom", fontsize=6, color="#707070", transform=ax.transAxes)
            legend_items = {text: colour(c, "#5794f2") for v, (text, c) in sorted(mapping.items())}
            if legend_items:
                handles = [matplotlib.patches.Patch(color=c, label=t) for t, c in legend_items.items()]
                ax.legend(handles=handles, fontsize=5.5, loc="lower right", ncol=len(handles), frameon=True)
        ax.set_xlabel("minutes before the render", fontsize=6, labelpad=1)
        return
    ax.set_xticks([])
    ax.set_yticks([])
    ax.text(0.5, 0.5, f"({kind} panel)", ha="center", va="center", color="#999", transform=ax.transAxes)


def render(path, prom, out_dir, now, minutes, variables):
    d = json.load(open(path))
    panels = sorted(d["panels"], key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"]))
    # Cap very tall panels; shift what is below them up by what was cut.
    cuts = [(p["gridPos"]["y"] + p["gridPos"]["h"], p["gridPos"]["h"] - MAX_PANEL_H) for p in panels if p["gridPos"]["h"] > MAX_PANEL_H]

    def y_of(p):
        return p["gridPos"]["y"] - sum(c for end, c in cuts if end <= p["gridPos"]["y"])

    total_h = max(y_of(p) + min(p["gridPos"]["h"], MAX_PANEL_H) for p in panels) + 4.6
    fig_w, fig_h = 24 * COL_IN, total_h * ROW_IN
    fig = plt.figure(figsize=(fig_w, fig_h))
    when = datetime.datetime.fromtimestamp(now, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    fig.text(0.01, 1 - 0.35 / fig_h, d["title"], fontsize=14, fontweight="bold", va="top")
    fig.text(
        0.01,
        1 - 0.62 / fig_h,
        f"Drawn by scripts/render-dashboards.py from the panel queries of deploy/grafana/dashboards/{os.path.basename(path)} "
        f"against Prometheus scraping `siteflow demo` (district-congestion scenario), {when}; last {minutes} min.\n"
        f"Variables: {', '.join(f'{k}={v}' for k, v in variables.items() if not k.startswith('__'))}. "
        "Not a Grafana screenshot: the query under each panel is its first PromQL target.",
        fontsize=7,
        color="#505050",
        va="top",
    )
    top = 3.6  # rows used by the header
    for p in panels:
        g = p["gridPos"]
        h = min(g["h"], MAX_PANEL_H)
        y = y_of(p) + top
        if p["type"] == "row":
            fig.text(g["x"] / 24 + 0.005, 1 - (y + 0.7) * ROW_IN / fig_h, "▾ " + p.get("title", ""), fontsize=10, fontweight="bold", color="#303030")
            continue
        pad_x, pad_top = 0.012, 1.3
        pad_bottom = 2.0 if p["type"] in ("timeseries", "state-timeline") else 0.9  # room for the title above and the query below, in rows
        box = (
            g["x"] / 24 + pad_x / 2,
            1 - (y + h - pad_bottom) * ROW_IN / fig_h,
            g["w"] / 24 - pad_x,
            (h - pad_top - pad_bottom) * ROW_IN / fig_h,
        )
        try:
            draw_panel(fig, p, box, prom, variables, now, minutes, 1 - (y + h - 0.55) * ROW_IN / fig_h)
        except Exception as e:  # a panel's failure is drawn, not fatal
            fig.text(box[0], box[1] + box[3] / 2, f"{p.get('title')}: {e}", fontsize=6, color="red")
    name = os.path.splitext(os.path.basename(path))[0]
    out = os.path.join(out_dir, f"dashboard-{name}.png")
    fig.savefig(out, dpi=72)
    plt.close(fig)
    # A 64-colour palette keeps each picture well under 200 KB (matplotlib brings Pillow).
    from PIL import Image

    Image.open(out).convert("RGB").quantize(colors=64).save(out, optimize=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prometheus", default="http://127.0.0.1:9090")
    ap.add_argument("--dashboards", default=os.path.join(os.path.dirname(__file__), "..", "deploy", "grafana", "dashboards"))
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "docs", "img"))
    ap.add_argument("--minutes", type=int, default=15, help="time range of the time series panels")
    ap.add_argument("--site", default="meo-vac.pai-lung", help="the site of the Site detail dashboard")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc).timestamp()
    base = {"district": ".*", "site": ".*", "meeting": ".*", "__rate_interval": "1m", "__interval": "15s", "__range": f"{args.minutes}m"}
    for path in sorted(glob.glob(os.path.join(args.dashboards, "*.json"))):
        variables = dict(base)
        if os.path.basename(path) == "site-detail.json":
            variables["site"] = args.site
        print(render(path, args.prometheus, args.out, now, args.minutes, variables))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Validates siteflow's Grafana provisioning and dashboards (Python 3 standard library only).

Usage:
    python3 deploy/grafana/check_dashboards.py                 # check, print a summary
    python3 deploy/grafana/check_dashboards.py --list-queries  # check, print every query as JSON

For every dashboards/*.json it checks: valid JSON object; `schemaVersion` an int >= 30; `uid` and
`title` non-empty strings (uids unique across files); `tags` contains "siteflow"; `time` is the
last hour and `refresh` "10s"; panel ids are unique integers (rows' nested `panels` included);
panels fit the 24-column grid without overlapping; every panel with targets has a prometheus
datasource reference whose uid is `siteflow-prometheus` or `${datasource}` (one of the two,
consistently, per dashboard); every target has a non-empty `expr` and `refId` (unique within the
panel); exprs have balanced brackets and quotes, use none of Grafana's `$__` built-ins (a query
runner substitutes only the dashboard's own variables) and reference only variables defined in
`templating.list`. It also checks that the provisioning YAML files exist and name the datasource
uid and the dashboards path.

With --list-queries, one JSON object per line is printed on stdout for every query:
    {"dashboard": "<file name>", "panel": "<panel title>", "expr": "<PromQL, variables unexpanded>"}
Problems go to stderr, one per line naming file and panel; the exit status is 1 if there is any.
"""

import argparse
import json
import re
import sys
from pathlib import Path

DATASOURCE_UID = "siteflow-prometheus"
DATASOURCE_VAR = "${datasource}"
ALLOWED_UIDS = {DATASOURCE_UID, DATASOURCE_VAR}
DASHBOARDS_PATH = "/var/lib/grafana/dashboards/siteflow"
EXPECTED_DASHBOARDS = [
    "province-overview.json",
    "site-detail.json",
    "meeting-readiness.json",
    "pipeline-health.json",
]
PROVISIONING = {
    "provisioning/datasources/siteflow.yml": [
        ("type: prometheus", "a datasource of type prometheus"),
        (f"uid: {DATASOURCE_UID}", f"the datasource uid {DATASOURCE_UID}"),
        ("url: http://127.0.0.1:9090", "the Prometheus url http://127.0.0.1:9090"),
    ],
    "provisioning/dashboards/siteflow.yml": [
        ("type: file", "a file provider"),
        (f"path: {DASHBOARDS_PATH}", f"the dashboards path {DASHBOARDS_PATH}"),
        ("folder: siteflow", 'the folder "siteflow"'),
    ],
}

# $name, ${name}, ${name:format}, [[name]]
VAR_REF = re.compile(r"\$\{([A-Za-z0-9_]+)(?::[^}]*)?\}|\$([A-Za-z0-9_]+)|\[\[([A-Za-z0-9_]+)(?::[^\]]*)?\]\]")


class Checker:
    def __init__(self, root: Path):
        self.root = root
        self.problems: list[str] = []
        self.queries: list[dict] = []
        self.summary: list[str] = []

    def problem(self, where: str, message: str) -> None:
        self.problems.append(f"{where}: {message}")

    # -- provisioning -------------------------------------------------------------------------
    def check_provisioning(self) -> None:
        for rel, needles in PROVISIONING.items():
            path = self.root / rel
            where = str(Path("deploy/grafana") / rel)
            if not path.is_file():
                self.problem(where, "missing provisioning file")
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                self.problem(where, f"unreadable: {e}")
                continue
            lines = [ln.split("#", 1)[0].strip() for ln in text.splitlines()]
            lines = [ln[2:].strip() if ln.startswith("- ") else ln for ln in lines]
            if "apiVersion: 1" not in lines:
                self.problem(where, "no top-level 'apiVersion: 1'")
            for needle, what in needles:
                if needle not in lines:
                    self.problem(where, f"does not declare {what} (expected a line '{needle}')")
            if "\t" in text:
                self.problem(where, "contains a tab character (YAML indentation must use spaces)")

    # -- dashboards ---------------------------------------------------------------------------
    def check_dashboards(self) -> None:
        folder = self.root / "dashboards"
        files = sorted(folder.glob("*.json")) if folder.is_dir() else []
        if not files:
            self.problem("deploy/grafana/dashboards", "no dashboard JSON files")
        names = {f.name for f in files}
        for expected in EXPECTED_DASHBOARDS:
            if expected not in names:
                self.problem(f"deploy/grafana/dashboards/{expected}", "missing dashboard")
        uids: dict[str, str] = {}
        for f in files:
            uid = self.check_dashboard(f)
            if uid is not None:
                if uid in uids:
                    self.problem(f.name, f"uid {uid!r} is also used by {uids[uid]}")
                else:
                    uids[uid] = f.name

    def check_dashboard(self, path: Path):
        fname = path.name
        try:
            dash = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            self.problem(fname, f"unreadable: {e}")
            return None
        except json.JSONDecodeError as e:
            self.problem(fname, f"invalid JSON: {e}")
            return None
        if not isinstance(dash, dict):
            self.problem(fname, "top level is not a JSON object")
            return None

        sv = dash.get("schemaVersion")
        if not isinstance(sv, int) or isinstance(sv, bool) or sv < 30:
            self.problem(fname, f"schemaVersion must be an integer >= 30, got {sv!r}")
        uid = dash.get("uid")
        if not isinstance(uid, str) or not uid.strip():
            self.problem(fname, "missing or empty 'uid'")
            uid = None
        elif len(uid) > 40:
            self.problem(fname, f"uid {uid!r} is longer than Grafana's 40 characters")
        title = dash.get("title")
        if not isinstance(title, str) or not title.strip():
            self.problem(fname, "missing or empty 'title'")
        tags = dash.get("tags")
        if not isinstance(tags, list) or "siteflow" not in tags:
            self.problem(fname, f"'tags' must contain \"siteflow\", got {tags!r}")
        t = dash.get("time")
        if not isinstance(t, dict) or t.get("from") != "now-1h" or t.get("to") != "now":
            self.problem(fname, f"'time' must be {{\"from\": \"now-1h\", \"to\": \"now\"}}, got {t!r}")
        if dash.get("refresh") != "10s":
            self.problem(fname, f"'refresh' must be \"10s\", got {dash.get('refresh')!r}")

        variables = self.check_templating(fname, dash)

        panels = dash.get("panels")
        if not isinstance(panels, list):
            self.problem(fname, "'panels' must be a list")
            return uid
        flat: list[tuple[dict, str]] = []  # (panel, where)
        for i, p in enumerate(panels):
            if not isinstance(p, dict):
                self.problem(fname, f"panels[{i}] is not an object")
                continue
            flat.append((p, f"panels[{i}]"))
            nested = p.get("panels")
            if nested is not None:
                if not isinstance(nested, list):
                    self.problem(fname, f"panels[{i}].panels is not a list")
                    continue
                if p.get("type") != "row":
                    self.problem(fname, f"panels[{i}] has nested 'panels' but is not a row")
                for j, q in enumerate(nested):
                    if isinstance(q, dict):
                        flat.append((q, f"panels[{i}].panels[{j}]"))
                    else:
                        self.problem(fname, f"panels[{i}].panels[{j}] is not an object")

        ids: dict[int, str] = {}
        uids_used: set[str] = set()
        n_panels = n_queries = 0
        for p, pos in flat:
            label = self.panel_label(p, pos)
            where = f"{fname}: panel {label}"
            pid = p.get("id")
            if not isinstance(pid, int) or isinstance(pid, bool):
                self.problem(where, f"'id' must be an integer, got {pid!r}")
            elif pid in ids:
                self.problem(where, f"duplicate panel id {pid} (also {ids[pid]})")
            else:
                ids[pid] = label
            if not isinstance(p.get("type"), str) or not p.get("type"):
                self.problem(where, "missing panel 'type'")
            if p.get("type") != "row":
                n_panels += 1
            n_queries += self.check_targets(fname, where, p, variables, uids_used)
        self.check_grid(fname, panels)

        if len(uids_used) > 1:
            self.problem(fname, f"mixes datasource uids {sorted(uids_used)}; use one of them consistently")
        if DATASOURCE_VAR in uids_used and "datasource" not in variables:
            self.problem(fname, "uses ${datasource} but defines no 'datasource' template variable")
        self.summary.append(f"{fname}: {n_panels} panels, {n_queries} queries, uid {uid!r}")
        return uid

    @staticmethod
    def panel_label(p: dict, pos: str) -> str:
        pid = p.get("id")
        title = p.get("title")
        return f"{title!r} (id {pid}, {pos})" if title else f"(untitled, id {pid}, {pos})"

    def check_templating(self, fname: str, dash: dict) -> dict:
        variables: dict[str, dict] = {}
        templating = dash.get("templating", {})
        tlist = templating.get("list", []) if isinstance(templating, dict) else None
        if not isinstance(tlist, list):
            self.problem(fname, "'templating.list' must be a list")
            return variables
        for i, v in enumerate(tlist):
            if not isinstance(v, dict) or not isinstance(v.get("name"), str) or not v.get("name"):
                self.problem(fname, f"templating.list[{i}] has no name")
                continue
            name = v["name"]
            if name in variables:
                self.problem(fname, f"template variable {name!r} defined twice")
            variables[name] = v
        for name, v in variables.items():
            where = f"{fname}: template variable {name!r}"
            vtype = v.get("type")
            if vtype == "datasource":
                if v.get("query") != "prometheus":
                    self.problem(where, f"datasource variable must have query \"prometheus\", got {v.get('query')!r}")
            elif vtype == "query":
                ds = v.get("datasource")
                self.check_ds_ref(where, ds, set())
                query = v.get("query")
                qtext = query.get("query") if isinstance(query, dict) else query
                if not isinstance(qtext, str) or not qtext.strip():
                    self.problem(where, "query variable has an empty query")
                    continue
                for ref in self.var_refs(qtext):
                    if ref == name:
                        self.problem(where, "query references the variable itself")
                    elif ref not in variables:
                        self.problem(where, f"query references undefined variable ${ref}")
                if v.get("includeAll") and v.get("allValue") not in (None, ".*", ".+"):
                    self.problem(where, f"allValue {v.get('allValue')!r} is not a regex matching every value")
        return variables

    @staticmethod
    def var_refs(text: str) -> list[str]:
        refs = []
        for m in VAR_REF.finditer(text):
            name = m.group(1) or m.group(2) or m.group(3)
            if not name.isdigit():  # $1 in label_replace replacements is not a variable
                refs.append(name)
        return refs

    def check_ds_ref(self, where: str, ds, uids_used: set) -> None:
        if not isinstance(ds, dict):
            self.problem(where, f"datasource must be an object {{\"type\": \"prometheus\", \"uid\": ...}}, got {ds!r}")
            return
        if ds.get("type") != "prometheus":
            self.problem(where, f"datasource type must be \"prometheus\", got {ds.get('type')!r}")
        uid = ds.get("uid")
        if uid not in ALLOWED_UIDS:
            self.problem(where, f"datasource uid must be {DATASOURCE_UID!r} or {DATASOURCE_VAR!r}, got {uid!r}")
        else:
            uids_used.add(uid)

    def check_targets(self, fname: str, where: str, p: dict, variables: dict, uids_used: set) -> int:
        targets = p.get("targets")
        if targets is None:
            if p.get("type") not in ("row", "text", "news", "dashlist"):
                self.problem(where, "panel has no targets")
            return 0
        if not isinstance(targets, list):
            self.problem(where, "'targets' must be a list")
            return 0
        if not targets:
            self.problem(where, "'targets' is empty")
            return 0
        self.check_ds_ref(where, p.get("datasource"), uids_used)
        refids: set = set()
        count = 0
        for k, t in enumerate(targets):
            twhere = f"{where}, targets[{k}]"
            if not isinstance(t, dict):
                self.problem(twhere, "target is not an object")
                continue
            ref = t.get("refId")
            if not isinstance(ref, str) or not ref.strip():
                self.problem(twhere, "missing or empty 'refId'")
            else:
                twhere = f"{where}, refId {ref}"
                if ref in refids:
                    self.problem(twhere, "duplicate refId in the panel")
                refids.add(ref)
            if "datasource" in t:
                self.check_ds_ref(twhere, t["datasource"], uids_used)
            expr = t.get("expr")
            if not isinstance(expr, str) or not expr.strip():
                self.problem(twhere, "missing or empty 'expr'")
                continue
            count += 1
            self.check_expr(twhere, expr, variables)
            self.queries.append({"dashboard": fname, "panel": p.get("title") or f"id {p.get('id')}", "expr": expr})
        return count

    def check_expr(self, where: str, expr: str, variables: dict) -> None:
        for ref in self.var_refs(expr):
            if ref.startswith("__"):
                self.problem(where, f"uses Grafana built-in ${ref}; use a fixed range such as [5m]")
            elif ref not in variables:
                self.problem(where, f"references undefined template variable ${ref}")
        # Balanced brackets and closed string literals (outside strings and comments).
        stack: list[str] = []
        pairs = {")": "(", "]": "[", "}": "{"}
        i, n = 0, len(expr)
        while i < n:
            c = expr[i]
            if c in "\"'`":
                j = i + 1
                while j < n and expr[j] != c:
                    j += 2 if expr[j] == "\\" and c != "`" else 1
                if j >= n:
                    self.problem(where, f"unterminated string literal starting at offset {i}")
                    return
                i = j + 1
                continue
            if c == "#":
                nl = expr.find("\n", i)
                i = n if nl < 0 else nl + 1
                continue
            if c in "([{":
                stack.append(c)
            elif c in ")]}":
                if not stack or stack[-1] != pairs[c]:
                    self.problem(where, f"unbalanced {c!r} at offset {i}")
                    return
                stack.pop()
            i += 1
        if stack:
            self.problem(where, f"unclosed {stack[-1]!r}")

    def check_grid(self, fname: str, panels: list) -> None:
        cells: dict[tuple[int, int], str] = {}
        for i, p in enumerate(panels):
            if not isinstance(p, dict):
                continue
            label = self.panel_label(p, f"panels[{i}]")
            g = p.get("gridPos")
            keys = ("x", "y", "w", "h")
            if not isinstance(g, dict) or not all(isinstance(g.get(k), int) and not isinstance(g.get(k), bool) for k in keys):
                self.problem(f"{fname}: panel {label}", "'gridPos' must have integer x, y, w, h")
                continue
            x, y, w, h = (g[k] for k in keys)
            if x < 0 or y < 0 or w < 1 or h < 1 or x + w > 24:
                self.problem(f"{fname}: panel {label}", f"gridPos {g} does not fit the 24-column grid")
                continue
            for cx in range(x, x + w):
                for cy in range(y, y + h):
                    other = cells.get((cx, cy))
                    if other is not None:
                        self.problem(f"{fname}: panel {label}", f"overlaps panel {other}")
                        break
                    cells[(cx, cy)] = label
                else:
                    continue
                break


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Validate siteflow's Grafana provisioning and dashboards.")
    ap.add_argument("--list-queries", action="store_true",
                    help="print every panel query as one JSON object per line on stdout")
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parent,
                    help="the deploy/grafana folder (default: this script's folder)")
    args = ap.parse_args(argv)

    c = Checker(args.root)
    c.check_provisioning()
    c.check_dashboards()

    if args.list_queries:
        for q in c.queries:
            print(json.dumps(q, ensure_ascii=False))
    else:
        for line in c.summary:
            print(line)
    if c.problems:
        for p in c.problems:
            print(f"error: {p}", file=sys.stderr)
        print(f"{len(c.problems)} problem(s) found", file=sys.stderr)
        return 1
    if not args.list_queries:
        print(f"OK: {len(c.summary)} dashboards, {len(c.queries)} queries, provisioning files present")
    return 0


if __name__ == "__main__":
    sys.exit(main())

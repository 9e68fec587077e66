#!/usr/bin/python3
"""Draws a Grafana dashboard's panels from a real Prometheus, as Grafana would
show them, into one PNG (a grid, one plot per panel): no Grafana runs here.

Reads the dashboard JSON, replaces its variables ($name, and
$__rate_interval) with the values given, runs each panel's targets as range
queries over [start, end] on the Prometheus at --prometheus (loopback only),
and plots every series with the target's legend format.

  draw-dashboard.py --dashboard D.json --prometheus http://127.0.0.1:PORT \\
      --start UNIX --end UNIX --set namespace=local --set tidepool=local \\
      --out docs/img/dashboard-tidepool.png
"""

import argparse
import json
import math
import re
import sys
import urllib.parse
import urllib.request

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

UNITS = {"s": "seconds", "reqps": "requests/s", "ops": "per second", "short": ""}


def query_range(prometheus, expr, start, end, step):
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{prometheus}/api/v1/query_range?{params}", timeout=30) as response:
        answer = json.load(response)
    if answer.get("status") != "success":
        raise RuntimeError(f"{expr}: {answer}")
    return answer["data"]["result"]


def legend(fmt, labels):
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt) or json.dumps(labels)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dashboard", required=True)
    parser.add_argument("--prometheus", required=True)
    parser.add_argument("--start", type=int, required=True)
    parser.add_argument("--end", type=int, required=True)
    parser.add_argument("--step", type=int, default=1)
    parser.add_argument("--rate-interval", default="5s")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--columns", type=int, default=3)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    host = urllib.parse.urlparse(args.prometheus).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        sys.exit(f"--prometheus must be on loopback, not {host}")

    with open(args.dashboard) as f:
        dashboard = json.load(f)
    values = dict(item.split("=", 1) for item in args.set)
    values["__rate_interval"] = args.rate_interval

    def substitute(expr):
        return re.sub(r"\$(\w+)", lambda m: values.get(m.group(1), m.group(0)), expr)

    panels = [p for p in dashboard["panels"] if p.get("type") != "row"]
    rows = math.ceil(len(panels) / args.columns)
    figure, axes = plt.subplots(rows, args.columns, figsize=(6 * args.columns, 3.4 * rows), squeeze=False)
    empty = 0
    for index, panel in enumerate(panels):
        ax = axes[index // args.columns][index % args.columns]
        drawn = 0
        for target in panel["targets"]:
            for series in query_range(args.prometheus, substitute(target["expr"]), args.start, args.end, args.step):
                points = [(float(t) - args.start, float(v)) for t, v in series["values"] if v not in ("NaN", "+Inf", "-Inf")]
                if not points:
                    continue
                xs, ys = zip(*points)
                ax.plot(xs, ys, linewidth=1.2, label=legend(target.get("legendFormat", ""), series["metric"]))
                drawn += 1
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        ax.set_title(panel["title"], fontsize=10)
        ax.set_ylabel(UNITS.get(unit, unit), fontsize=8)
        ax.set_xlabel("seconds into the run", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=7, loc="upper left")
        else:
            empty += 1
            ax.text(0.5, 0.5, "no data here\n(from the operator: Kubernetes only)", ha="center", va="center",
                    transform=ax.transAxes, fontsize=9, color="gray")
    for index in range(len(panels), rows * args.columns):
        axes[index // args.columns][index % args.columns].axis("off")
    figure.suptitle(dashboard["title"], fontsize=14)
    figure.tight_layout(rect=(0, 0, 1, 0.98))
    figure.savefig(args.out, dpi=80)
    print(f"{args.out}: {len(panels)} panels, {empty} without data")


if __name__ == "__main__":
    main()

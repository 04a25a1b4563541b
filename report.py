"""
The EM report: one page that shows what a run did, iteration by iteration.

    python report.py runs/NAME          # writes runs/NAME/report.html and runs/NAME/report.md

It reads em.sh's layout, and copes with any file missing (a run still going, iteration 0 without an
E-step, a real checkpoint's summaries without families):

    iter_i/eval/summary.json             evaluate.py: accuracy, code rate, calls per mode and breakdown
    iter_i/train.jsonl.summary.json      synthesize.py, from iteration 1: the E-step that made iteration
                                         i's training data, explored with iteration i-1's model
    knobs.txt, times.txt                 em.sh: the run's settings (one line), "== STAGE: N s" per stage

and shows

    1. accuracy of auto (autonomous), code and cot (guided) per iteration, and selection accuracy
    2. the autonomous code rate per family: where the autonomous model chose to write code
    3. per family, s*(code), the share of the training the E-step sent to code, against the model's own
       autonomous code share in the same exploration: EM moves the second toward the first
    4. calls per problem, auto against code (code is the price of a forced choice)
    5. the stage times and the knobs

report.html is one self-contained file: inline SVG drawn below, no script, no dependency, and valid XML
(XHTML-compatible), so a test can parse it. report.md holds the same numbers as tables.
"""
import html
import json
import math
import os
import re
import sys

import flags
from task import FAMILIES

# ----------------------------------------------------------------------------- hyperparameters
run = ""                 # the run dir (em.sh's runs/NAME); a first positional argument sets it too
out = ""                 # where report.html and report.md go (default: the run dir)
form = ""                # the form of s* to plot: posterior | tempered | argmax (default: the one the
                         # run trained with, the "form" of each synthesize summary)
# ----------------------------------------------------------------------------- end of hyperparameters

MODES = ("auto", "code", "cot")
# The breakdown of a run: the embedded task has families (and difficulty), MATH has levels (and types).
BREAKDOWNS = ("family", "level", "difficulty", "type")
MODE_COLOURS = {"auto": "#4e79a7", "code": "#f28e2b", "cot": "#59a14f", "selection": "#555555"}
PALETTE = ("#9467bd", "#17becf", "#d62728", "#bcbd22", "#e377c2", "#8c564b", "#1f77b4", "#ff7f0e")  # not the modes'


# ----------------------------------------------------------------------------- reading a run
def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def read_knobs(path):
    """[(knob, value)] of knobs.txt's one line: KEY=VALUE words, where a value may hold spaces (MODEL=<warm start>)
    or be shell-quoted (EXPLORE_ARGS='--k=8'); a value runs up to the next upper-case KEY=."""
    try:
        with open(path, encoding="utf-8") as f:
            line = f.readline().strip()
    except FileNotFoundError:
        return []
    line = re.sub(r"^em\.sh:\s*", "", line)          # an older em.sh wrote its echo line
    keys = list(re.finditer(r"(?:^|\s)([A-Z][A-Z0-9_]*)=", line))
    if not keys:
        return [("knobs", line)] if line else []
    ends = [m.start() for m in keys[1:]] + [len(line)]
    return [(m.group(1), re.sub(r"^'(.*)'$", r"\1", line[m.end():end].strip())) for m, end in zip(keys, ends)]


def read_times(path):
    """[(stage, seconds)] from times.txt, in the order the stages ran."""
    try:
        with open(path, encoding="utf-8") as f:
            return [(m.group(1), int(m.group(2))) for m in map(re.compile(r"^== (.+): (\d+) s$").match, f) if m]
    except FileNotFoundError:
        return []


def load(run_dir):
    iterations = sorted(int(m.group(1)) for m in map(re.compile(r"iter_(\d+)$").match, os.listdir(run_dir))
                        if m and os.path.isdir(os.path.join(run_dir, m.group(0))))
    return {
        "name": os.path.basename(os.path.normpath(run_dir)),
        "iterations": iterations,
        "evals": {i: read_json(os.path.join(run_dir, f"iter_{i}", "eval", "summary.json")) for i in iterations},
        "synth": {i: read_json(os.path.join(run_dir, f"iter_{i}", "train.jsonl.summary.json")) for i in iterations},
        "knobs": read_knobs(os.path.join(run_dir, "knobs.txt")),
        "times": read_times(os.path.join(run_dir, "times.txt")),
    }


def natural(value):
    """Sort key: "Level 10" after "Level 9"."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", str(value)) if t]


def ordered(values, key):
    """Families in the embedded task's order (CoT reliable first, hopeless last), then any others."""
    values = set(values)
    first = [f for f in FAMILIES if f in values] if key == "family" else []
    return first + sorted(values - set(first), key=natural)


def breakdown(evals):
    """(key, its values) that the run's auto summaries break down by; (None, []): overall only."""
    for key in BREAKDOWNS:
        values = {v for s in evals.values() if s for v in s.get("auto", {}).get(f"by_{key}", {})}
        if values:
            return key, ordered(values, key)
    return None, []


# ----------------------------------------------------------------------------- the numbers
def pct(x):
    return "-" if x is None else f"{100 * x:.1f}"


def num(x):
    return "-" if x is None else f"{x:.2f}"


def tables(r):
    """Every number of the report, as {name: (title, caption, header, rows)}: the charts and both files read
    these, so the page and the markdown cannot disagree. A row is its label (iteration or family), then values:
    floats here, None where missing."""
    evals = {i: s for i, s in r["evals"].items() if s}
    key, groups = breakdown(evals)
    sampled = any("accuracy_ci95" in s.get("auto", {}) for s in evals.values())
    t = {}
    rows = [[i, *(s.get(m, {}).get("accuracy") for m in MODES), s.get("auto", {}).get("selection_accuracy")]
            for i, s in evals.items()]
    header = ["iteration", "auto", "code", "cot", "selection"]
    if sampled:   # evaluate.py --samples: the interval of auto's accuracy
        header += ["auto 95% low", "auto 95% high"]
        for row, s in zip(rows, evals.values()):
            row += s.get("auto", {}).get("accuracy_ci95") or [None, None]
    t["accuracy"] = ("Accuracy (%)", "Test problems solved per mode; selection: the autonomous choice agrees with the "
                     "oracle's (CoT when CoT is right, else code)", header, rows)
    t["code_rate"] = ("Autonomous code rate (%)", f"Autonomous solutions that ran code, overall and per {key}"
                      if key else "Autonomous solutions that ran code",
                      ["iteration", "all", *groups],
                      [[i, s.get("auto", {}).get("code_rate"),
                        *(s.get("auto", {}).get(f"by_{key}", {}).get(g, {}).get("code_rate") for g in groups)]
                       for i, s in evals.items()])
    t["calls"] = ("Calls per problem", "Code executions per problem, autonomous against guided to code",
                  ["iteration", "auto", "code"],
                  [[i, *(s.get(m, {}).get("calls_per_problem") for m in ("auto", "code"))] for i, s in evals.items()])
    # The E-step, one row per family, (own, s*) per iteration: the pairs the small charts draw.
    synth = {i: s for i, s in r["synth"].items() if s}
    families = ordered({f for s in synth.values() for f in s.get("by_family", {}) if f != "all"}, "family")
    used = {i: r["form"] or s.get("form") for i, s in synth.items()}
    rows = []
    for family in families + ["all"]:
        cells = [synth[i].get("by_family", {}).get(family) or {} for i in synth]
        if any(cells):
            rows.append([family, *(v for i, c in zip(synth, cells) for v in (
                c.get("unguided_code_share"), (c.get("strategy_code_share") or {}).get(used[i])))])
    strategies = ", ".join(sorted({f"{s.get('strategy', '?')} with s* {used[i]}" for i, s in synth.items()}))
    t["s_star"] = ("s*(code) against the model's own code share (%)",
                   "The E-step of iteration i, per family: own, the share of the model's autonomous rollouts that ran "
                   "code, against s*, the share of the training the reference strategy sent to code "
                   f"({strategies or 'no E-step yet'}; an RL-only run has no s*)",
                   ["family", *(f"{name} {i}" for i in synth for name in ("own", "s*"))], rows)
    return t


def formatted(t):
    """The tables with their values as text: calls as counts, the rest as percentages."""
    result = {}
    for name, (title, caption, header, rows) in t.items():
        as_text = num if name == "calls" else pct
        result[name] = (title, caption, header, [[row[0], *map(as_text, row[1:])] for row in rows])
    return result


# ----------------------------------------------------------------------------- SVG
def esc(text):
    return html.escape(str(text), quote=True)


def nice_top(value):
    """The top of a y axis: the smallest 1, 2, 2.5 or 5 × 10^k at or above value."""
    if not value or value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= value * (1 - 1e-9))


def line_chart(title, xs, series, percent=True, width=366, height=240, legend="right"):
    """An inline SVG line chart. series: [(label, colour, dashed, [y per x, None: missing])]. Percent charts
    run 0 to 100; others 0 to a round number. Each point carries its value as a tooltip (an SVG <title>); a series
    without a value is left out, legend included."""
    series = [s for s in series if any(y is not None for y in s[3])]
    left, top = 40, 26
    right = 112 if legend == "right" else 12
    bottom = 34 + (22 if legend == "bottom" else 0)
    pw, ph = width - left - right, height - top - bottom
    values = [y for *_, ys in series for y in ys if y is not None]
    top_value = 1.0 if percent else nice_top(max(values, default=1.0))
    lo, hi = min(xs) - 0.35, max(xs) + 0.35      # half a step of air at both ends; one iteration sits centred
    X = lambda x: left + (x - lo) / (hi - lo) * pw
    Y = lambda y: top + ph - y / top_value * ph
    show = (lambda v: f"{100 * v:.1f}") if percent else (lambda v: f"{v:.2f}")
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
           f'<title>{esc(title)}</title>',
           f'<text x="{left}" y="15" font-size="13" font-weight="bold" fill="#222">{esc(title)}</text>']
    for j in range(5):                                   # the y grid: quarters of the axis
        v = top_value * j / 4
        svg.append(f'<line x1="{left}" x2="{left + pw}" y1="{Y(v):.1f}" y2="{Y(v):.1f}" '
                   f'stroke="{"#444" if j == 0 else "#e3e3e3"}"/>')
        svg.append(f'<text x="{left - 5}" y="{Y(v) + 4:.1f}" text-anchor="end" fill="#555">'
                   f'{100 * v:g}</text>' if percent else
                   f'<text x="{left - 5}" y="{Y(v) + 4:.1f}" text-anchor="end" fill="#555">{v:g}</text>')
    svg.append(f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + ph}" stroke="#444"/>')
    for x in xs:
        svg.append(f'<line x1="{X(x):.1f}" x2="{X(x):.1f}" y1="{top + ph}" y2="{top + ph + 4}" stroke="#444"/>')
        svg.append(f'<text x="{X(x):.1f}" y="{top + ph + 15}" text-anchor="middle" fill="#555">{x}</text>')
    svg.append(f'<text x="{left + pw / 2:.1f}" y="{top + ph + 29}" text-anchor="middle" fill="#555">'
               f'iteration</text>')
    for k, (label, colour, dashed, ys) in enumerate(series):
        dash = ' stroke-dasharray="5,3"' if dashed else ""
        runs, current = [], []                           # a missing value breaks the line
        for x, y in zip(xs, ys):
            if y is None:
                runs, current = runs + [current], []
            else:
                current.append((x, y))
        for points in runs + [current]:
            if len(points) > 1:
                svg.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2"{dash} points="'
                           + " ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in points) + '"/>')
        for x, y in zip(xs, ys):
            if y is not None:
                svg.append(f'<circle cx="{X(x):.1f}" cy="{Y(y):.1f}" r="3" fill="{colour}">'
                           f'<title>{esc(label)}, iteration {x}: {show(y)}</title></circle>')
        last = next((y for y in reversed(ys) if y is not None), None)
        text = f"{label}  {show(last)}" if last is not None else f"{label}  -"
        if legend == "right":
            lx, ly = left + pw + 14, top + 8 + 17 * k
        else:
            lx, ly = left + k * (pw // max(1, len(series))), height - 8
        svg.append(f'<line x1="{lx}" x2="{lx + 18}" y1="{ly - 4}" y2="{ly - 4}" stroke="{colour}" '
                   f'stroke-width="2"{dash}/>')
        svg.append(f'<text x="{lx + 23}" y="{ly}" fill="#222">{esc(text)}</text>')
    svg.append("</svg>")
    return "\n".join(svg)


def charts(r, t):
    """The report's figures, as [(section, [svg])], from the tables' float values."""
    figures = []
    *_, header, rows = t["accuracy"]
    if rows:
        xs = [row[0] for row in rows]
        series = [(m, MODE_COLOURS[m], False, [row[1 + j] for row in rows]) for j, m in enumerate(MODES)]
        series.append(("selection", MODE_COLOURS["selection"], True, [row[4] for row in rows]))
        acc = line_chart("Accuracy, %", xs, series)
        *_, header, rows = t["code_rate"]
        code = line_chart("Autonomous code rate, %", xs,
                          [(g, "#222" if g == "all" else PALETTE[j % len(PALETTE)], g == "all",
                            [row[1 + j] for row in rows]) for j, g in enumerate(header[1:])])
        *_, rows = t["calls"]
        calls = line_chart("Code executions per problem", xs,
                           [(m, MODE_COLOURS[m], False, [row[1 + j] for row in rows]) for j, m in
                            enumerate(("auto", "code"))], percent=False)
        figures.append(("Accuracy and the method chosen", [acc, code, calls]))
    *_, header, rows = t["s_star"]
    if rows:
        xs = sorted({int(h.split()[-1]) for h in header[1:]})
        small = []
        for family, *pairs in rows:
            series = [("s*", "#e15759", False, pairs[1::2]), ("own", "#4e79a7", True, pairs[0::2])]
            small.append(line_chart(family, xs, series, width=212, height=190, legend="bottom"))
        figures.append(("The E-step: s*(code) against the model's own code share, per family (%)", small))
    return figures


# ----------------------------------------------------------------------------- the two files
def markdown_table(header, rows):
    # numbers to the right, the first column and words to the left
    align = [":---" if j == 0 or not all(re.fullmatch(r"[-\d.]+", str(row[j])) for row in rows) else "---:"
             for j in range(len(header))]
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "|".join(align) + "|"]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def html_table(header, rows, caption, raw_column=None):
    """caption: markup; raw_column: a column of markup (the stage-time bars), every other cell is text."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{v if j == raw_column else esc(v)}</td>" for j, v in enumerate(row))
                   + "</tr>" for row in rows)
    return (f'<div class="block"><p class="caption">{caption}</p>'
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>")


def write_markdown(r, text_tables, path):
    parts = [f"# EM report: {r['name']}", ""]
    if r["knobs"]:
        # code spans: a value such as <warm start> would read as an HTML tag
        knobs = [(k, f"`{v}`" if v else "") for k, v in r["knobs"]]
        parts += ["## Knobs", "", markdown_table(["knob", "value"], knobs), ""]
    for title, caption, header, rows in text_tables.values():
        parts += [f"## {title}", "", caption + ".", "",
                  markdown_table(header, rows) if rows else "(none in this run)", ""]
    if r["times"]:
        total = sum(s for _, s in r["times"])
        parts += ["## Stage times", "", markdown_table(["stage", "seconds"], r["times"] + [("total", total)]), ""]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))


STYLE = """
body { font-family: sans-serif; color: #222; margin: 24px auto; max-width: 1140px; font-size: 13px; }
h1 { font-size: 22px; margin: 0 0 4px 0; }
h2 { font-size: 16px; margin: 22px 0 8px 0; border-bottom: 1px solid #ddd; padding-bottom: 3px; }
.figures { display: flex; flex-wrap: wrap; gap: 8px 16px; }
.tables { display: flex; flex-wrap: wrap; gap: 10px 24px; align-items: flex-start; }
table { border-collapse: collapse; font-size: 12px; }
.block { max-width: 360px; }
.caption { color: #555; margin: 0 0 4px 0; }
th, td { padding: 2px 8px; text-align: right; border-bottom: 1px solid #eee; }
th { border-bottom: 1px solid #999; font-weight: 600; }
td:first-child, th:first-child { text-align: left; }
.knobs { color: #444; font-family: monospace; font-size: 11.5px; line-height: 1.6; }
.knobs span { background: #f3f3f3; border-radius: 3px; padding: 1px 5px; margin-right: 4px; white-space: nowrap; }
.track { width: 160px; }
.bar { background: #4e79a7; height: 9px; min-width: 1px; }
.note { color: #666; }
"""


def write_html(r, t, text_tables, path):
    body = [f"<h1>EM report: {esc(r['name'])}</h1>"]
    if r["knobs"]:
        body.append('<p class="knobs">' + "".join(f"<span>{esc(k)}={esc(v)}</span> " for k, v in r["knobs"]) +
                    "</p>")
    figures = charts(r, t)
    if not figures:
        body.append('<p class="note">No evaluation summary (iter_i/eval/summary.json) in this run yet.</p>')
    for section, svgs in figures:
        body.append(f"<h2>{esc(section)}</h2>")
        body.append('<div class="figures">' + "".join(f"<div>{svg}</div>" for svg in svgs) + "</div>")
        if section.startswith("The E-step"):
            body.append('<p class="note">Iteration i: the E-step that made iteration i\'s training data, explored '
                        "with iteration i&#8722;1's model. own: the share of its autonomous rollouts that ran code; "
                        "s*: the share of the training that the reference strategy sent to code.</p>")
    blocks = [html_table(header, rows, f"<b>{esc(title)}</b>. {esc(caption)}.")
              for title, caption, header, rows in text_tables.values() if rows]
    if r["times"]:
        longest, total = max(1, max(s for _, s in r["times"])), sum(s for _, s in r["times"])
        bars = [(stage, seconds, f'<div class="track"><div class="bar" style="width:{100 * seconds / longest:.1f}%">'
                 "</div></div>") for stage, seconds in r["times"]]
        blocks.append(html_table(["stage", "seconds", ""], bars, f"<b>Stage times</b>: {total} s in all.",
                                 raw_column=2))
    body.append("<h2>The numbers</h2>")
    body.append('<div class="tables">' + "".join(blocks) + "</div>")
    page = ('<!DOCTYPE html>\n<html xmlns="http://www.w3.org/1999/xhtml" lang="en">\n<head>\n'
            f'<meta charset="utf-8"/>\n<title>EM report: {esc(r["name"])}</title>\n<style>{STYLE}</style>\n'
            "</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n")
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)


def report(run_dir, out_dir="", form=""):
    r = load(run_dir)
    r["form"] = form
    t = tables(r)
    text_tables = formatted(t)
    out_dir = out_dir or run_dir
    os.makedirs(out_dir, exist_ok=True)
    write_markdown(r, text_tables, os.path.join(out_dir, "report.md"))
    write_html(r, t, text_tables, os.path.join(out_dir, "report.html"))
    return os.path.join(out_dir, "report.html"), os.path.join(out_dir, "report.md")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):
        argv[0] = f"--run={argv[0]}"                     # python report.py runs/NAME
    args = flags.parse(__file__, globals(), argv, required=("run",),
                       choices={"form": ("", "posterior", "tempered", "argmax")})
    paths = report(args.run, args.out, args.form)
    print("wrote " + " and ".join(paths))


if __name__ == "__main__":
    main()

"""Tests of report.py on small run dirs written here: the numbers land in report.md and in the SVG, the page
parses as XML, and a run of another shape (levels, no E-step, RL-only, sampled evaluation) still reports."""
import json
import xml.etree.ElementTree as ET

import report

SVG = "{http://www.w3.org/2000/svg}svg"


def write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))


def mode(accuracy, code_rate, calls, **extra):
    return {"accuracy": accuracy, "code_rate": code_rate, "calls_per_problem": calls, "n": 40, **extra}


def embedded_run(run):
    """Two evaluated checkpoints of the embedded task and the E-step between them."""
    families = lambda add_sub, mul: {"mul": {"accuracy": 1.0, "code_rate": mul},       # written out of order
                                     "add_sub": {"accuracy": 1.0, "code_rate": add_sub}}
    write(run / "iter_0/eval/summary.json", {
        "auto": mode(0.725, 0.045, 0.05, selection_accuracy=0.712, by_family=families(0.0, 0.07)),
        "code": mode(0.998, 1.0, 1.0), "cot": mode(0.71, 0.0, 0.0)})
    write(run / "iter_1/eval/summary.json", {
        "auto": mode(0.968, 0.295, 0.29, selection_accuracy=0.948, by_family=families(0.0, 0.912)),
        "code": mode(1.0, 1.0, 1.0), "cot": mode(0.698, 0.0, 0.0)})
    write(run / "iter_1/train.jsonl.summary.json", {"strategy": "em", "form": "argmax", "by_family": {
        "mul": {"unguided_code_share": 0.122, "strategy_code_share": {"argmax": 1.0, "posterior": 0.9}},
        "add_sub": {"unguided_code_share": 0.048, "strategy_code_share": {"argmax": 0.023, "posterior": 0.216}},
        "all": {"unguided_code_share": 0.1, "strategy_code_share": {"argmax": 0.328, "posterior": 0.45}}}})
    write(run / "knobs.txt", "STRATEGY=em SEED=1 NAME=toy MODEL=<warm start> K=4 EXPLORE_ARGS='--top_p=0.9' "
                             "TRAIN_ARGS=''\n")
    write(run / "times.txt", "== warm start: 554 s\n== evaluate 0: 20 s\n== explore 1: 41 s\n== train 1: 35 s\n")


def svg_text(page):
    root = ET.fromstring(page)                     # the whole file: XHTML-compatible
    return "\n".join("".join(svg.itertext()) for svg in root.iter(SVG))


def test_report_of_an_embedded_run(tmp_path):
    run = tmp_path / "toy"
    embedded_run(run)
    report.main([str(run)])                        # python report.py runs/NAME
    md = (run / "report.md").read_text()
    assert "| 0 | 72.5 | 99.8 | 71.0 | 71.2 |" in md and "| 1 | 96.8 | 100.0 | 69.8 | 94.8 |" in md
    assert "| iteration | all | add_sub | mul |" in md           # data.FAMILIES' order, not the file's
    assert "| 1 | 29.5 | 0.0 | 91.2 |" in md
    assert "| 0 | 0.05 | 1.00 |" in md                          # calls per problem, auto and code
    assert "| family | own 1 | s* 1 |" in md and "| mul | 12.2 | 100.0 |" in md and "| all | 10.0 | 32.8 |" in md
    assert "| MODEL | `<warm start>` |" in md and "| EXPLORE_ARGS | `--top_p=0.9` |" in md and "| TRAIN_ARGS |  |" in md
    assert "| explore 1 | 41 |" in md and "| total | 650 |" in md

    page = (run / "report.html").read_text()
    text = svg_text(page)
    for expected in ("auto, iteration 0: 72.5", "cot, iteration 1: 69.8", "selection, iteration 1: 94.8",
                     "mul, iteration 1: 91.2", "auto, iteration 1: 0.29", "s*, iteration 1: 100.0",
                     "own, iteration 1: 12.2", "auto  96.8"):
        assert expected in text, expected
    assert "<script" not in page and "MODEL=&lt;warm start&gt;" in page

    report.main([f"--run={run}", "--form=posterior", f"--out={tmp_path / 'posterior'}"])
    assert "| mul | 12.2 | 90.0 |" in (tmp_path / "posterior/report.md").read_text()


def test_report_of_another_shape(tmp_path):
    """MATH-like levels instead of families, a sampled evaluation, an RL-only E-step (no s*), no knobs or times,
    and an iteration whose evaluation has not finished."""
    run = tmp_path / "math"
    levels = {"Level 10": {"code_rate": 0.5}, "Level 2": {"code_rate": 0.25}}
    write(run / "iter_0/eval/summary.json", {
        "auto": mode(0.5, 0.375, 0.4, accuracy_ci95=[0.41, 0.59], by_level=levels), "cot": mode(0.45, 0.0, 0.0)})
    write(run / "iter_1/train.jsonl.summary.json", {"strategy": "rl", "form": "tempered", "by_family": {
        "none": {"unguided_code_share": 0.3, "strategy_code_share": {"tempered": None}},
        "all": {"unguided_code_share": 0.3, "strategy_code_share": {"tempered": None}}}})
    (run / "iter_2").mkdir()
    html_path, md_path = report.report(str(run))
    md = open(md_path).read()
    assert "| iteration | all | Level 2 | Level 10 |" in md and "| 0 | 37.5 | 25.0 | 50.0 |" in md
    assert "| 0 | 50.0 | - | 45.0 | - | 41.0 | 59.0 |" in md    # no code mode, no selection; auto's interval
    assert "| none | 30.0 | - |" in md and "rl with s* tempered" in md
    text = svg_text(open(html_path).read())
    assert "Level 10, iteration 0: 50.0" in text and "own, iteration 1: 30.0" in text

    empty = tmp_path / "empty"
    empty.mkdir()
    html_path, _ = report.report(str(empty))        # nothing to show yet: still a page
    ET.fromstring(open(html_path).read())

"""Check an assignment: its unit tests, then its experiment.

    python assignments/check.py --list              # the assignment ids, one a line
    python assignments/check.py A4                  # A4's unit tests, then (if they pass) its experiment
    python assignments/check.py A4 --unit           # the unit tests alone
    python assignments/check.py A1,A2,A3 --unit     # several (or: all); one pytest run for all of them
    python assignments/check.py A10 --seed=2        # the capstone: bash em.sh with SEED=2, then the bars

Run it from anywhere inside a student version (or the reference repo). Exit status:

    0  pass
    1  fail: what failed is printed in plain words above
    2  blocked: the check could not judge your code (the machine lacks something it needs, e.g. Linux
       namespaces for the sandbox, or a function of ANOTHER assignment that this check runs is still blanked)

The unit tests are assignments/tests/test_A*.py, one pytest marker per assignment (`-m A4`): run pytest on them
yourself for the full tracebacks (`python -m pytest assignments/tests -m A4 -x`). The experiments are in
assignments/experiments.py. Neither needs another assignment to be done: what they need from other assignments
comes from committed fixtures (assignments/fixtures/), never from code you are asked to write.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ASSIGNMENTS_DIR, ROOT, blanked_ids, by_id, load_assignments  # noqa: E402
from checklib import BLOCKED_PREFIX  # noqa: E402

PASS, FAIL, BLOCKED = 0, 1, 2
WORDS = {PASS: "PASS", FAIL: "FAIL", BLOCKED: "BLOCKED"}


def parse_ids(texts, table):
    known = [a["id"] for a in table]
    ids = []
    for text in texts:
        for part in text.replace(",", " ").split():
            if part.lower() == "all":
                ids += known
            elif part.upper() in known:
                ids.append(part.upper())
            else:
                sys.exit(f"check.py: unknown assignment {part!r}; known: {', '.join(known)} (python "
                         f"assignments/check.py --list)")
    return list(dict.fromkeys(ids))


def run_units(ids, verbose):
    """One pytest run over the ids' markers; returns the conftest's report (one entry per test)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report.json")
        env = dict(os.environ, TOCODE_CHECK_REPORT=report, PYTHONDONTWRITEBYTECODE="1")
        command = [sys.executable, "-m", "pytest", os.path.join(ASSIGNMENTS_DIR, "tests"), "-m", " or ".join(ids),
                   "-o", "addopts=", "-p", "no:cacheprovider", "--rootdir", ROOT, "-q", "--no-header",
                   "-W", "ignore::DeprecationWarning"]
        process = subprocess.run(command, cwd=ROOT, env=env, capture_output=not verbose, text=True)
        if not os.path.exists(report):
            output = (process.stdout or "") + (process.stderr or "")
            return None, output[-3000:]
        with open(report) as f:
            return json.load(f), ""


def assignment_of_file(test_id):
    name = os.path.basename(test_id.split("::")[0])
    if name.startswith("test_A"):
        return name[len("test_"):].split("_")[0]
    return None


def judge(assignment, entries):
    """(exit code, lines to print) for one assignment from its test entries."""
    aid = assignment["id"]
    mine = [e for e in entries if (e["assignment"] or assignment_of_file(e["test"])) == aid]
    lines, failed, blocked, passed = [], [], [], 0
    for e in mine:
        foreign = sorted(set(e["not_implemented"]) - {aid})
        if e["outcome"] == "passed":
            passed += 1
        elif e["outcome"] == "skipped":
            if e["message"].startswith(BLOCKED_PREFIX):
                blocked.append(f"{e['what']}: {e['message'][len(BLOCKED_PREFIX):]}")
        elif e["when"] == "collect":
            lines_of = [line.strip() for line in e["message"].splitlines() if line.strip()]
            where = [line for line in lines_of if line.startswith(("E ", "File ", "/")) or ".py:" in line][-4:]
            failed.append("the checks could not even be loaded (is every file of yours valid Python?):\n"
                          + "\n".join(f"      {line}" for line in where))
        elif foreign:
            names = ", ".join(f"{f} ({', '.join(by_id()[f]['functions'])})" for f in foreign)
            blocked.append(f"{e['what']}: needs {names}, still blanked in this copy")
        elif aid in e["not_implemented"]:
            failed.append(f"{e['what']}: not implemented yet")
        else:
            failed.append(f"{e['what']}: {e['message']}")
    if not assignment["functions"] and not mine:
        return PASS, [f"{aid} has no unit tests: its check is the experiment (python assignments/check.py {aid})"]
    if not mine:
        return FAIL, [f"no unit tests of {aid} were found (assignments/tests/test_{aid}_*.py)"]
    # several tests failing on the same NotImplementedError say it once
    not_done = [line for line in failed if line.endswith(": not implemented yet")]
    other = [line for line in failed if not line.endswith(": not implemented yet")]
    if not_done:
        lines.append(f"  not implemented yet: {len(not_done)} checks stopped at the NotImplementedError of "
                     f"{', '.join(assignment['functions'])}")
    lines += [f"  FAIL     {line}" for line in other]
    lines += [f"  BLOCKED  {line}" for line in blocked]
    summary = f"{passed} passed, {len(failed)} failed" + (f", {len(blocked)} blocked" if blocked else "")
    lines.insert(0, f"{aid} unit checks ({assignment['title']}): {summary}")
    return (FAIL if failed else BLOCKED if blocked else PASS), lines


def run_experiment(aid, extra):
    command = [sys.executable, os.path.join(ASSIGNMENTS_DIR, "experiments.py"), aid] + extra
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run(command, cwd=ROOT, env=env).returncode


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ids", nargs="*", help="assignment ids (A4, A1,A2, all)")
    parser.add_argument("--unit", action="store_true", help="the unit tests alone, no experiment")
    parser.add_argument("--list", action="store_true", help="print the assignment ids, one a line")
    parser.add_argument("--json", default="", help="also write {id: exit code} to this file")
    parser.add_argument("--verbose", action="store_true", help="show pytest's own output")
    parser.add_argument("--seed", type=int, default=None, help="A10 only: the em.sh SEED (default 1)")
    parser.add_argument("--name", default="", help="A10 only: the em.sh run NAME (default capstone-seedN)")
    args = parser.parse_args(argv)
    table = load_assignments()
    if args.list:
        print("\n".join(a["id"] for a in table))
        return 0
    if not args.ids:
        parser.error("name an assignment (python assignments/check.py --list shows them)")
    ids = parse_ids(args.ids, table)
    assignments = by_id()

    codes = {}
    with_tests = [aid for aid in ids if assignments[aid]["functions"]]
    entries, crash = ([], "") if not with_tests else run_units(with_tests, args.verbose)
    for aid in ids:
        if entries is None:
            print(f"{aid}: the unit checks did not run: pytest stopped before reporting:\n{crash}")
            codes[aid] = FAIL
            continue
        code, lines = judge(assignments[aid], entries)
        print("\n".join(lines))
        if code == FAIL:
            # a blanked function of this assignment is the usual reason on a fresh copy: say so plainly
            still = [spec for spec in assignments[aid]["functions"] if blanked_ids(ROOT, spec) == [aid]]
            if still:
                print(f"  still blanked: {', '.join(still)} (see assignments/{assignments[aid]['handout']})")
        if code == PASS and not args.unit:
            extra = []
            if args.seed is not None:
                extra.append(f"--seed={args.seed}")
            if args.name:
                extra.append(f"--name={args.name}")
            print(f"{aid} experiment:", flush=True)
            code = run_experiment(aid, extra)
        elif code != PASS and not args.unit:
            print(f"{aid}: the experiment is skipped until the unit checks pass")
        codes[aid] = code
        print(f"{aid}: {WORDS[code]} (exit {code})\n", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(codes, f, indent=1)
    values = set(codes.values())
    return FAIL if FAIL in values else BLOCKED if BLOCKED in values else PASS


if __name__ == "__main__":
    sys.exit(main())

"""Make a student version of tocode: a copy of the repo with the chosen assignments' functions blanked.

    python assignments/make_student.py --only all ../student          # every assignment
    python assignments/make_student.py --only A1,A4 ../student-a1a4   # two of them; the rest stays the reference
    python assignments/make_student.py --list                         # the assignments and their functions

What is copied: the files git tracks plus untracked files git does not ignore (so a working tree with new files
copies as it is), minus runs/, .git and the instructor-only files listed in INSTRUCTOR_ONLY. Outside a git
checkout (a student version made from a zip, say) every file under the root is copied, minus the same and
the usual caches.

What is blanked: each function listed for a chosen assignment in assignments/assignments.json, found by name with
`ast` ("module.py:function" or "module.py:Class.method"). Its signature, decorators and docstring stay; the rest of
its body becomes

    raise NotImplementedError("A4: see assignments/A4_mstep_loss.md")

Comments inside the body go with it (they often give the answer away). Nothing else changes, so the pipeline runs
with every function that was not chosen.

OUT_DIR must be outside the repo (exit 2 otherwise) and empty or absent.
"""
import argparse
import ast
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import MARKER, ROOT, docstring_node, find_node, function_of, load_assignments  # noqa: E402

EXCLUDED_DIRS = {".git", "runs", "__pycache__", ".pytest_cache", ".venv", "venv", "checkpoints", "out"}
# The negative controls (they plant bugs in a copy) and the fixture generator (it needs the reference code) are the
# instructor's; neither can run in a student version.
INSTRUCTOR_ONLY = {"tests/test_assignments.py", "assignments/make_fixtures.py"}


def files_to_copy(root):
    """Relative paths of the files of the repo at root."""
    try:
        listed = subprocess.run(["git", "-C", root, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                capture_output=True, check=True).stdout.decode().split("\0")
        paths = sorted({p for p in listed if p})
    except (OSError, subprocess.CalledProcessError):
        paths = []
        for directory, dirs, names in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d not in EXCLUDED_DIRS and not d.startswith(".venv"))
            paths += [os.path.relpath(os.path.join(directory, n), root) for n in sorted(names)
                      if not n.endswith((".pyc", ".partial"))]
    kept = []
    for path in paths:
        parts = path.split("/")
        if parts[0] in EXCLUDED_DIRS or path in INSTRUCTOR_ONLY or "__pycache__" in parts:
            continue
        if os.path.isfile(os.path.join(root, path)):     # a tracked file deleted in the working tree is skipped
            kept.append(path)
    return kept


def blank_functions(source, specs, path):
    """source with the body of each (names, marker) in specs replaced by the marker, kept docstring and all."""
    lines = source.splitlines(True)
    tree = ast.parse(source)
    edits = []
    for names, marker in specs:
        node = find_node(tree, names, path)
        doc = docstring_node(node)
        body = node.body[1:] if doc else node.body
        if node.body[0].lineno == node.lineno:
            raise ValueError(f"{path}:{'.'.join(names)}: a one-line function cannot be blanked")
        indent = " " * node.body[0].col_offset
        if body:
            start, end = body[0].lineno, node.end_lineno           # 1-based, inclusive
        else:                                                      # a docstring alone: the marker goes after it
            start, end = doc.end_lineno + 1, doc.end_lineno
        # comments between the docstring and the first statement are part of the body too
        if doc:
            start = doc.end_lineno + 1
        edits.append((start, end, indent + marker + "\n"))
    for start, end, text in sorted(edits, reverse=True):
        lines[start - 1:end] = [text]
    blanked = "".join(lines)
    ast.parse(blanked)      # still a valid module
    return blanked


def inside(path, directory):
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def parse_only(text, table):
    ids = [a["id"] for a in table]
    if text == "all":
        return ids
    chosen = [t.strip().upper() for t in text.split(",") if t.strip()]
    unknown = [c for c in chosen if c not in ids]
    if unknown or not chosen:
        sys.exit(f"make_student.py: unknown assignment {', '.join(unknown) or repr(text)}; known: {', '.join(ids)}")
    return chosen


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", nargs="?", help="where the student version goes (outside this repo)")
    parser.add_argument("--only", default="all", help="comma-separated assignment ids, or 'all' (default)")
    parser.add_argument("--list", action="store_true", help="print the assignments and their functions")
    args = parser.parse_args(argv)
    table = load_assignments()
    if args.list:
        for a in table:
            print(f"{a['id']:<4} {a['title']}: {', '.join(a['functions']) or '(no function: the whole loop)'}")
        return 0
    if not args.out_dir:
        parser.error("OUT_DIR is required")
    out = os.path.abspath(args.out_dir)
    if inside(out, ROOT):
        print(f"make_student.py: refusing to write inside the repo ({out} is inside {ROOT}): a student version "
              f"there would be copied into the next one and could be committed. Pick a directory outside, "
              f"e.g. ../student", file=sys.stderr)
        return 2
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        print(f"make_student.py: {out} exists and is not an empty directory; remove it or pick another",
              file=sys.stderr)
        return 2
    chosen = parse_only(args.only, table)

    # what to blank, per file: [(names, marker)]
    per_file = {}
    for a in table:
        if a["id"] not in chosen:
            continue
        for spec in a["functions"]:
            path, names = function_of(spec)
            per_file.setdefault(path, []).append((names, MARKER.format(id=a["id"], handout=a["handout"])))

    files = files_to_copy(ROOT)
    missing = [p for p in per_file if p not in files]
    if missing:
        print(f"make_student.py: {', '.join(missing)} not found in the repo", file=sys.stderr)
        return 2
    blanked = {}
    for path, specs in per_file.items():       # all edits are made before anything is written
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            blanked[path] = blank_functions(f.read(), specs, path)
    os.makedirs(out, exist_ok=True)
    for path in files:
        target = os.path.join(out, path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if path in blanked:
            with open(target, "w", encoding="utf-8") as f:
                f.write(blanked[path])
            shutil.copymode(os.path.join(ROOT, path), target)
        else:
            shutil.copy2(os.path.join(ROOT, path), target)
    count = sum(len(s) for s in per_file.values())
    print(f"wrote a student version to {out}: {len(files)} files, {count} functions blanked "
          f"({', '.join(chosen)})")
    print(f"next: cd {out} && python assignments/check.py --list")
    return 0


if __name__ == "__main__":
    sys.exit(main())

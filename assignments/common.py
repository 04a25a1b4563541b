"""What make_student.py, check.py and the assignment tests share: the table of assignments, where the repo root is,
how a function is found in a source file by name, and what a blanked function looks like.

Plain Python, no dependencies: make_student.py runs before anything is installed."""
import ast
import json
import os
import re

ASSIGNMENTS_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(ASSIGNMENTS_DIR)   # the root of the repo, or of a student version made from it
TABLE = os.path.join(ASSIGNMENTS_DIR, "assignments.json")
FIXTURES = os.path.join(ASSIGNMENTS_DIR, "fixtures")

# The body a blanked function gets. check.py tells "not done yet" (this assignment's own marker) from "blocked"
# (another assignment's marker) by this message.
MARKER = 'raise NotImplementedError("{id}: see assignments/{handout}")'
MARKER_MESSAGE = re.compile(r"^(A\d+): see assignments/")


def load_assignments():
    """[{id, title, handout, functions, teaches, hours, long?}] in the table's order."""
    with open(TABLE) as f:
        return json.load(f)["assignments"]


def by_id():
    return {a["id"]: a for a in load_assignments()}


def function_of(spec):
    """'logprobs.py:FusedLogprobs.backward' -> ('logprobs.py', ['FusedLogprobs', 'backward'])."""
    path, _, qualname = spec.partition(":")
    if not path.endswith(".py") or not qualname:
        raise ValueError(f"{spec!r}: expected 'module.py:function' or 'module.py:Class.method'")
    return path, qualname.split(".")


def find_node(tree, names, where=""):
    """The FunctionDef for names (['f'] or ['Class', 'method']) at the top level of a module's ast."""
    body = tree.body
    node = None
    for depth, name in enumerate(names):
        last = depth == len(names) - 1
        kinds = (ast.FunctionDef, ast.AsyncFunctionDef) if last else (ast.ClassDef,)
        matches = [n for n in body if isinstance(n, kinds) and n.name == name]
        if not matches:
            what = "function" if last else "class"
            raise LookupError(f"{where}: no {what} named {name!r} ({'.'.join(names)})")
        node = matches[-1]          # a later definition wins, as at import time
        body = node.body
    return node


def docstring_node(node):
    first = node.body[0] if node.body else None
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        return first
    return None


def function_source(root, spec):
    """The source text of one function (decorators included), as it is in root's copy of the module."""
    path, names = function_of(spec)
    with open(os.path.join(root, path), encoding="utf-8") as f:
        source = f.read()
    node = find_node(ast.parse(source), names, path)
    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
    return "".join(source.splitlines(True)[first - 1:node.end_lineno])


def blanked_ids(root, spec):
    """The assignment ids whose marker is the whole body of this function in root's copy ([] when it is code)."""
    path, names = function_of(spec)
    try:
        with open(os.path.join(root, path), encoding="utf-8") as f:
            node = find_node(ast.parse(f.read()), names, path)
    except (OSError, SyntaxError, LookupError):        # a file that does not parse is blanked by nobody
        return []
    body = node.body[1:] if docstring_node(node) else node.body
    if len(body) != 1 or not isinstance(body[0], ast.Raise):
        return []
    call = body[0].exc
    if (isinstance(call, ast.Call) and getattr(call.func, "id", None) == "NotImplementedError" and call.args
            and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str)):
        match = MARKER_MESSAGE.match(call.args[0].value)
        if match:
            return [match.group(1)]
    return []

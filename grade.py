"""
Grading math answers. One function here is the reward of the EM loop and the score of every number
we report: explore.py grades each rollout with it (r(y) in {0, 1}), evaluate.py each greedy answer.

    extract_answer(text) -> str | None     the model's final answer (the last \\boxed{...})
    is_equiv(pred, gold) -> bool           are two answers the same mathematical object?
    grade(text, gold) -> (answer, bool)    both: the extracted answer, and whether it equals gold

This file imports no torch and nothing of the repo: the sympy worker process imports it alone, and
data.py reads the golds of MATH / GSM8K files with extract_answer.

is_equiv is a pipeline, cheapest test first; it never raises and returns in bounded time:

    1. clean both strings: \\boxed, $, \\left/\\right, spacing, \\dfrac, \\text{units}, degrees,
       dollars, thousands separators, unicode, trailing periods ...       (_clean)
    2. read the structure: tuple / interval (ordered, bracket-sensitive), set / comma list
       (unordered), matrix, union, "x = 5", inequality -> interval         (_structure)
    3. per scalar: string equality; then OUR OWN LaTeX parser to a small tree; equal trees;
       then numbers in-process (exact fractions, or floats at random points for variables);
       only what numbers cannot settle goes to sympy, in a worker PROCESS that is killed and
       restarted on timeout (sympy is pure Python: a thread could not be stopped)  (_scalar_equiv)

Decisions on ambiguous forms (each one is a row of tests/test_grade.py):
    10\\% equals 10 (MATH's own convention) and also 0.1;   \\$5, 5 dollars, 5\\text{ cm}, 90^\\circ equal 5 / 90
    (units and degrees are dropped, never converted: 90^\\circ is not \\frac{\\pi}{2});   1,000 = 1000 only when the
    whole answer is one number ((3,100) stays a pair);   integers and fractions compare exactly, a decimal
    against a fraction forgives float noise only (1e-9: 0.333 != 1/3), a decimal against an irrational
    value uses 1e-4 relative (\\sqrt{2} = 1.41421356, \\pi != 3.14);   x = 5 equals 5, and "a = 3, b = 4"
    equals "b = 4, a = 3" and "3, 4" (in order) but not "a = 4, b = 3";   (1,2) equals the bare list 1, 2
    but not (2,1); a bare list and a set are unordered;   \\text{(A)}, (A), A are the same choice;
    1011_2 equals 1011;   2\\frac{1}{2} is the mixed number 5/2;   2^10 is 1024;   x > 3 is (3, \\infty);
    1 \\pm \\sqrt{2} is the pair {1 + \\sqrt{2}, 1 - \\sqrt{2}};   a response without an answer scores 0.
"""

import atexit
import cmath
import functools
import json
import math
import os
import re
import select
import subprocess
import sys
import threading
import time
from fractions import Fraction

# -----------------------------------------------------------------------------
# The grader's knobs (module-level on purpose: the tests import them).

REL_TOL_APPROX = 1e-4    # a decimal vs an irrational value (\sqrt{2} vs 1.41421, \pi vs 3.1416): the
                         # relative tolerance of the usual MATH graders (3.14 != \pi, 1.414 != \sqrt{2})
REL_TOL_FLOAT = 1e-9     # two rational values, one written as a decimal: only float noise is
                         # forgiven (18.000000000000004 == 18, but 0.333 != 1/3, 1234.5 != 1234.6)
SYMBOLIC_BUDGET = 2.5    # seconds of sympy per is_equiv call, all elements together
WORKER_GRACE = 0.5       # the worker polices its own budget; after this much more it is killed
WORKER_MEMORY_MB = 2048  # address-space limit of the sympy worker
MAX_ANSWER_CHARS = 1000  # longer answers are compared as strings only (MATH answers are short)
MAX_NESTING = 40         # deeper bracket nesting: strings only (protects the recursive parser)
MAX_TOKENS = 300         # a longer expression is not parsed
MAX_ITEMS = 40           # elements of a tuple / set / matrix compared one by one
MAX_EXACT_BITS = 20000   # exact rational arithmetic stops here (2^20000 ~ 10^6000) ...
MAX_MAGNITUDE = 300      # ... and a value beyond 10^300 is "absurd": refused, never sent to sympy

# =============================================================================
# 1. Extraction: the model's final answer.


def _braced(text, start):
    """The content of the {...} group opening at text[start], nested braces respected; None when
    the group is never closed."""
    depth = 0
    for i in range(start, len(text)):
        c = text[i]
        if c == "\\":               # \{ and \} are characters, not grouping
            continue
        if c == "{" and (i == 0 or text[i - 1] != "\\"):
            depth += 1
        elif c == "}" and text[i - 1] != "\\":
            depth -= 1
            if depth == 0:
                return text[start + 1:i]
    return None


_BOX = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")


def _last_boxed(text):
    """The last non-empty \\boxed{...} or \\fbox{...} (also `\\boxed 7`, LaTeX's one-token form)."""
    for match in reversed(list(_BOX.finditer(text))[-20:]):   # a bounded number of tries
        rest = match.end()
        while rest < len(text) and text[rest] == " ":
            rest += 1
        if rest < len(text) and text[rest] == "{":
            content = _braced(text, rest)
        else:
            content = re.match(r"[^\s$]*", text[rest:]).group(0)
        if content is not None and content.strip():
            return content.strip()
    return None


_GSM8K = re.compile(r"^[ \t]*####[ \t]*(.+?)[ \t]*$", re.M)
_SAYS = re.compile(r"(?:final answer|the answer) is[:\s]*\$?([^\n$]+?)\$?\s*(?:\.\s|\.?$|\n|I hope)",
                   re.I)


def extract_answer(text):
    """The final answer of a response or a gold solution, as a string, or None.

    In order: the last \\boxed{...} / \\fbox{...}; a GSM8K "#### N" line (gold solutions); the
    Minerva-style "The final answer is X" / "the answer is X". No "last number in the text"
    fallback: a response that never states an answer has none (and earns no reward)."""
    try:
        if not isinstance(text, str):
            return None
        boxed = _last_boxed(text)
        if boxed is not None:
            return boxed
        gsm8k = _GSM8K.findall(text)
        if gsm8k:
            return gsm8k[-1]
        said = _SAYS.findall(text[-2000:])
        if said and said[-1].strip():
            return said[-1].strip()
        return None
    except Exception:           # the promise is "never raises" (RecursionError, MemoryError...)
        return None


# =============================================================================
# 2. Cleaning: one canonical spelling for each notation. Idempotent, linear-time regexes only.

_UNICODE = {"\u2212": "-", "\u2013": "-", "\u00d7": "\\times ", "\u22c5": "\\cdot ", "\u00b7": "\\cdot ",
            "\u00f7": "\\div ", "\u03c0": "\\pi ", "\u221e": "\\infty ", "\u221a": "\\sqrt ", "\u00b0": "^\\circ",
            "\u2264": "\\le ", "\u2265": "\\ge ", "\u2260": "\\ne ", "\u222a": "\\cup ", "\u2205": "\\emptyset ",
            "\u00a0": " ", "\u2009": " ", "\u202f": " ", "\u2032": "'"}
_SYNONYMS = [  # (pattern, replacement), applied in order
    (r"\\left\s*\.|\\right\s*\.", ""),                               # invisible delimiters
    (r"\\(?:left|right|bigl|bigr|Bigl|Bigr|biggl|biggr|Biggl|Biggr|big|Big|bigg|Bigg)(?![a-zA-Z])", ""),
    (r"\\(?:displaystyle|textstyle|scriptstyle|limits|nolimits)(?![a-zA-Z])|(?<!\\)\\!", ""),
    (r"(?<!\\)\\(?:quad|qquad|[,;: ])", " "), (r"~", " "),           # spacing (not the row break \\)
    (r"\\[dtc]frac(?![a-zA-Z])", r"\\frac"), (r"\\[dt]binom(?![a-zA-Z])", r"\\binom"),
    (r"\\(?:lbrace)(?![a-zA-Z])", r"\\{"), (r"\\(?:rbrace)(?![a-zA-Z])", r"\\}"),
    (r"\\langle(?![a-zA-Z])", "("), (r"\\rangle(?![a-zA-Z])", ")"),
    (r"\\[lr]?vert(?![a-zA-Z])|\\[lr]Vert(?![a-zA-Z])|\\\|", "|"),
    (r"\\leq(?:slant)?(?![a-zA-Z])|<=", r"\\le "), (r"\\geq(?:slant)?(?![a-zA-Z])|>=", r"\\ge "),
    (r"\\neq(?![a-zA-Z])|!=", r"\\ne "), (r"\\lt(?![a-zA-Z])", "<"), (r"\\gt(?![a-zA-Z])", ">"),
    (r"\\mathbb\s*\{?R\}?|\\text\{all real numbers\}", r"(-\\infty,\\infty)"),
    (r"\\(?:varnothing|O)(?![a-zA-Z])|\\\{\s*\\\}", r"\\emptyset "), (r"\\infinity(?![a-zA-Z])", r"\\infty"),
    (r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ(?![a-zA-Z])|\\(?:text)?degree(?![a-zA-Z])|\\circ(?![a-zA-Z])", ""),
    (r"\{,\}", ""), (r"\\\$|\$", ""), (r"\\?%", r"\\%"),             # 1{,}000   \$5   50%
    (r"\\(?:dots|ldots|cdots)(?![a-zA-Z])", "..."), (r"\\hline", ""),
    # what a program prints (a code-using model often boxes it): sqrt(2)/2, 2**10, pi/4, oo
    (r"(?<![\\a-zA-Z])(sqrt|sin|cos|tan|cot|sec|csc|log|ln|exp|pi)(?![a-zA-Z])", r"\\\1"), (r"\*\*", "^"),
    (r"(?<![\\a-zA-Z])oo(?![a-zA-Z])", r"\\infty"),
]
_SYNONYMS = [(re.compile(p), r) for p, r in _SYNONYMS]
_TEXT_CMD = r"\\(?:text|textbf|textit|textrm|textsf|textnormal|mathrm|mathbf|mathit|mathsf|mbox|boldsymbol|bm|emph)"
_TRAILING_TEXT = re.compile(_TEXT_CMD + r"\s*\{([^{}]*)\}\s*(?:\^\s*\{?\d\}?)?\s*$")
_TEXT = re.compile(_TEXT_CMD + r"\s*\{([^{}]*)\}")
_UNIT_WORD = r"(?:[a-zA-Z]{2,}|[mgshlLK])(?:\s*/\s*[a-zA-Z]+)?(?:\^\s*\{?\d\}?)?\.?"
_TRAILING_UNITS = re.compile(r"(.*?[\d})\]!.])(?:\s+" + _UNIT_WORD + r")+")
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_CHOICE = re.compile(r"\(?\s*([A-Ea-e])\s*\)|([A-E])[.:]?")
_FUNCTION_NAMES = {"sin", "cos", "tan", "cot", "sec", "csc", "log", "ln", "exp", "sqrt", "pi"}


def _repeating_decimal(match):
    r"""0.1\overline{6} -> \frac{15}{90}: (digits with the period - digits without) / (10^k (10^p - 1))."""
    whole, fixed, period = match.group(1) or "0", match.group(2), match.group(3)
    numerator = int(whole + fixed + period) - int(whole + fixed)
    return f"\\frac{{{numerator}}}{{{10 ** len(fixed) * (10 ** len(period) - 1)}}}"


_REPEATING = re.compile(r"(\d*)\.(\d{0,20})\\overline\s*\{(\d{1,20})\}")


@functools.lru_cache(maxsize=8192)
def _clean(s):
    if len(s) > MAX_ANSWER_CHARS:
        return s.strip()
    boxed = _last_boxed(s) if ("\\boxed" in s or "\\fbox" in s) else None
    if boxed is not None:
        s = boxed
    for char, replacement in _UNICODE.items():
        s = s.replace(char, replacement)
    for pattern, replacement in _SYNONYMS:
        s = pattern.sub(replacement, s)
    s = _REPEATING.sub(_repeating_decimal, s)
    # "5\text{ cm}", "12 \mbox{square units}": a trailing text group after a value is a unit
    for _ in range(3):
        match = _TRAILING_TEXT.search(s)
        if not (match and s[:match.start()].strip() and re.fullmatch(r"[a-zA-Z\s./]*", match.group(1))):
            break
        s = s[:match.start()]
    for _ in range(5):
        s, n = _TEXT.subn(lambda m: " " + m.group(1) + " ", s)
        if not n:
            break
    s = re.sub(r"\s+", " ", s).strip()
    s = re.sub(r"^\\\(|\\\)$|^\\\[|\\\]$", "", s).strip()
    s = re.sub(r"(?:\s|\\\\)*[.,;]*$", "", s) if not re.search(r"\d\.$", s) else s[:-1]  # "5." "x=3,"
    # "5 cm", "27 dollars", "60 km/h": trailing plain words after a value (not "\sin x", "2 m" kept
    # only when the letter follows a space and is a common unit symbol)
    match = _TRAILING_UNITS.fullmatch(s)
    if match and not (set(re.findall(r"[a-zA-Z]+", s[match.end(1):])) & _FUNCTION_NAMES):
        s = match.group(1).strip()
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    s = re.sub(r"^(?:the answer is|answer:?)\s*", "", s, flags=re.I)
    match = _CHOICE.fullmatch(s)
    if match:
        s = (match.group(1) or match.group(2)).upper()
    return s.strip()


def _key(s):
    """What two answers must share to be equal as strings."""
    return s.replace(" ", "")


# =============================================================================
# 3. Structure: what kind of object an answer is.
#
#   ("scalar", s)                 one expression (or a relation such as y = 2x + 3)
#   ("tuple", open, close, items) ordered; the brackets matter: (1,2) [1,2) (1,2] [1,2]
#   ("set", items)                unordered: \{1,2\}, and also a bare "1, 2" or "1 and 2"
#   ("matrix", rows)              \begin{pmatrix} ... \end{pmatrix}, element by element
#   ("union", items)              (-\infty,1) \cup (2,\infty), unordered
#   ("assign", name, item)        x = 5, a = 3 (the name is dropped unless both sides name several)


def _split_top(s, separators):
    """Split at separators outside every bracket (all of ( [ { count, so "[1,2)" nests fine)."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(s):
        c = s[i]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0:
            for sep in separators:
                if s.startswith(sep, i):
                    parts.append(s[start:i])
                    start = i + len(sep)
                    i = start - 1
                    break
        i += 1
    parts.append(s[start:])
    return [p.strip() for p in parts]


def _encloses(s):
    """Does the bracket opening at s[0] close exactly at the last character?"""
    depth = 0
    for i, c in enumerate(s):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth == 0:
                return i == len(s) - 1
    return False


def _nesting(s):
    depth = deepest = 0
    for c in s:
        if c in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in ")]}":
            depth -= 1
    return deepest


_ASSIGN = re.compile(r"([a-zA-Z](?:_\{?\w+\}?)?|\\[a-zA-Z]+|[a-zA-Z]\s*\(\s*[a-z]\s*\))\s*(?:=|\\in\b)(.*)")
_MATRIX = re.compile(r"\\begin\{([pbBvV]?matrix|array)\}(?:\{[^{}]*\})?(.*)\\end\{\1\}", re.S)
_INEQUALITY = re.compile(r"\\le|\\ge|<|>")


def _interval_of_inequality(s):
    """x > 3 -> (3, \\infty);  -1 \\le x < 2 -> [-1, 2). None for anything else."""
    parts = [p.strip() for p in re.split(r"(\\le|\\ge|<|>)", s)]
    variable = r"[a-zA-Z]|\\[a-zA-Z]+"
    if len(parts) == 3 and re.fullmatch(variable, parts[2]) and not re.fullmatch(variable, parts[0]):
        flip = {"<": ">", ">": "<", "\\le": "\\ge", "\\ge": "\\le"}
        parts = [parts[2], flip[parts[1]], parts[0]]
    if len(parts) == 3 and re.fullmatch(variable, parts[0]):
        op, bound = parts[1], parts[2]
        if op in ("<", "\\le"):
            return ("tuple", "(", "]" if op == "\\le" else ")", [("scalar", "-\\infty"), ("scalar", bound)])
        return ("tuple", "[" if op == "\\ge" else "(", ")", [("scalar", bound), ("scalar", "\\infty")])
    if len(parts) == 5 and re.fullmatch(variable, parts[2]):
        ops = parts[1], parts[3]
        if all(op in ("<", "\\le") for op in ops):
            lo, hi = parts[0], parts[4]
        elif all(op in (">", "\\ge") for op in ops):
            lo, hi, ops = parts[4], parts[0], ops[::-1]
        else:
            return None
        return ("tuple", "[" if ops[0] == "\\le" else "(", "]" if ops[1] == "\\le" else ")",
                [("scalar", lo), ("scalar", hi)])
    return None


def _structure(s, depth=0):
    s = _clean(s)
    if depth > 6 or not s:
        return ("scalar", s)
    if s == "\\emptyset":
        return ("set", [])
    matrix = _MATRIX.fullmatch(s)
    if matrix:
        rows = [r for r in _split_top(matrix.group(2), ["\\\\"]) if r]
        return ("matrix", [[_structure(c, depth + 1) for c in _split_top(r, ["&"])] for r in rows])
    pieces = _split_top(s, ["\\cup"])
    if len(pieces) > 1:
        return ("union", [_structure(p, depth + 1) for p in pieces])
    if s.startswith("\\{") and s.endswith("\\}") and _encloses(s[1:]):
        inner = s[2:-2].strip()
        return ("set", [_structure(p, depth + 1) for p in _split_top(inner, [",", ";"])] if inner else [])
    if s[0] in "([" and s[-1] in ")]" and _encloses(s):
        items = _split_top(s[1:-1], [","])
        if len(items) > 1:
            return ("tuple", s[0], s[-1], [_structure(p, depth + 1) for p in items])
    items = [p for p in _split_top(s, [",", ";", " and ", " or "]) if p]   # \text{ or } is " or " by now
    if len(items) > 1:
        return ("set", [_structure(p, depth + 1) for p in items])
    assign = _ASSIGN.fullmatch(s)
    if assign and "=" not in assign.group(2) and assign.group(2).strip():
        name = re.sub(r"\s", "", assign.group(1))
        return ("assign", name, _structure(assign.group(2), depth + 1), s)
    if _INEQUALITY.search(s):
        interval = _interval_of_inequality(s)
        if interval:
            return interval
    plus_minus = re.findall(r"\\pm|\\mp", s)
    if len(plus_minus) == 1:     # 1 \pm \sqrt{2} is the pair {1 + \sqrt{2}, 1 - \sqrt{2}}
        return ("set", [("scalar", _clean(s.replace(plus_minus[0], sign, 1))) for sign in "+-"])
    return ("scalar", s)


def _values_of(items):
    """Drop the names of x = 1, x = 2 (or of a single y = 2x + 3)."""
    return [item[2] if item[0] == "assign" else item for item in items]


def _struct_equiv(a, b, deadline):
    kind_a, kind_b = a[0], b[0]
    if kind_a == "assign" or kind_b == "assign":
        if kind_a == "assign" and kind_b == "assign" and a[1] != b[1] and "(" not in a[1] + b[1]:
            return _scalar_equiv(a[3], b[3], deadline)   # y = 2x vs x = y/2: same equation?
        if kind_b == "scalar" and "=" in b[1]:
            return _scalar_equiv(a[3], b[1], deadline)
        if kind_a == "scalar" and "=" in a[1]:
            return _scalar_equiv(a[1], b[3], deadline)
        return _struct_equiv(*_values_of([a, b]), deadline)
    if kind_a == "set" and kind_b == "set":
        names_a = [x[1] for x in a[1] if x[0] == "assign"]
        names_b = [x[1] for x in b[1] if x[0] == "assign"]
        several = lambda names, items: len(names) == len(items) and len(set(names)) == len(names) > 1
        if several(names_a, a[1]) and several(names_b, b[1]):      # a = 3, b = 4 vs b = 4, a = 3
            pairs_b = {x[1]: x[2] for x in b[1]}
            return set(names_a) == set(names_b) and all(
                _struct_equiv(x[2], pairs_b[x[1]], deadline) for x in a[1])
        if several(names_a, a[1]) and not names_b:                 # a = 3, b = 4 vs 3, 4: in order
            return _ordered(_values_of(a[1]), b[1], deadline)
        if several(names_b, b[1]) and not names_a:
            return _ordered(a[1], _values_of(b[1]), deadline)
        return _unordered(_values_of(a[1]), _values_of(b[1]), deadline)
    if kind_a == "tuple" and kind_b == "tuple":
        return a[1] == b[1] and a[2] == b[2] and _ordered(a[3], b[3], deadline)
    if {kind_a, kind_b} == {"tuple", "set"}:     # (1, 2) vs 1, 2: a bare list read in order
        tuple_, other = (a, b) if kind_a == "tuple" else (b, a)
        return tuple_[1:3] == ("(", ")") and _ordered(tuple_[3], other[1], deadline)
    if kind_a == "matrix" and kind_b == "matrix":
        return len(a[1]) == len(b[1]) and all(len(r) == len(q) for r, q in zip(a[1], b[1])) and _ordered(
            [x for r in a[1] for x in r], [x for r in b[1] for x in r], deadline)
    if {kind_a, kind_b} == {"matrix", "tuple"}:  # a column vector written as a tuple
        matrix, tuple_ = (a, b) if kind_a == "matrix" else (b, a)
        if tuple_[1:3] == ("(", ")") and (len(matrix[1]) == 1 or all(len(r) == 1 for r in matrix[1])):
            return _ordered([x for r in matrix[1] for x in r], tuple_[3], deadline)
        return False
    if kind_a == "union" or kind_b == "union":    # x < -1 or x > 1: a list of intervals is a union
        items_a = a[1] if kind_a in ("union", "set") else [a]
        items_b = b[1] if kind_b in ("union", "set") else [b]
        return (len(items_a) > 1 or len(items_b) > 1) and _unordered(items_a, items_b, deadline)
    if kind_a == "scalar" and kind_b == "scalar":
        return _scalar_equiv(a[1], b[1], deadline)
    if kind_a == "set" and len(a[1]) == 1:
        return _struct_equiv(a[1][0], b, deadline)
    if kind_b == "set" and len(b[1]) == 1:
        return _struct_equiv(a, b[1][0], deadline)
    return False


def _ordered(xs, ys, deadline):
    return len(xs) == len(ys) <= MAX_ITEMS and all(_struct_equiv(x, y, deadline) for x, y in zip(xs, ys))


def _unordered(xs, ys, deadline):
    if len(xs) != len(ys) or len(xs) > MAX_ITEMS:
        return False
    unused = list(ys)
    for x in xs:                 # greedy matching: equivalence is (numerically) transitive
        for j, y in enumerate(unused):
            if _struct_equiv(x, y, deadline):
                del unused[j]
                break
        else:
            return False
    return True


# =============================================================================
# 4. Our own LaTeX parser: tokens -> a small tree of tuples (JSON-friendly, so it can be sent to
#    the sympy worker). Nodes: ("num", "1.5") ("sym", "x") ("const", "pi"|"E"|"I"|"oo")
#    ("add"|"sub"|"mul"|"div"|"pow", a, b) ("neg", a) ("fn", name, a) ("log", a, base)
#    ("root", a, n) ("fact", a) ("binom", n, k) ("rel", [ops], [exprs]).

class _ParseError(Exception):
    pass


_TOKENS = re.compile(r"(?P<num>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)|(?P<cmd>\\[a-zA-Z]+|\\.)|(?P<ch>\S)")
_FUNCTIONS = {"sin", "cos", "tan", "cot", "sec", "csc", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh",
              "ln", "exp", "log"}
_GREEK = {"alpha", "beta", "gamma", "delta", "epsilon", "varepsilon", "zeta", "eta", "theta", "vartheta", "iota",
          "kappa", "lambda", "mu", "nu", "xi", "rho", "sigma", "tau", "upsilon", "phi", "varphi", "chi", "psi",
          "omega", "Gamma", "Delta", "Theta", "Lambda", "Xi", "Sigma", "Phi", "Psi", "Omega"}
_RELATIONS = {"=": "=", "<": "<", ">": ">", "\\le": "<=", "\\ge": ">=", "\\ne": "!="}
_ATOM_COMMANDS = {"\\frac", "\\sqrt", "\\binom", "\\pi", "\\infty", "\\lfloor", "\\lceil", "\\imath"} | {
    "\\" + f for f in _FUNCTIONS} | {"\\" + g for g in _GREEK}


def _tokenize(s):
    tokens = []
    for match in _TOKENS.finditer(s):
        kind = match.lastgroup
        tokens.append((kind, match.group(kind)))
        if len(tokens) > MAX_TOKENS:
            raise _ParseError("too long")
    return tokens


class _Parser:
    """Recursive descent over the usual precedence: relation > sum > product (explicit, or implicit
    as in 2\\sqrt{3}, 3\\pi, 2x(x+1)) > sign > power > factorial > atom."""

    def __init__(self, tokens):
        self.tokens, self.i, self.abs_open, self.depth = tokens, 0, 0, 0

    def peek(self, k=0):
        return self.tokens[self.i + k] if self.i + k < len(self.tokens) else ("end", "")

    def take(self):
        token = self.peek()
        self.i += 1
        return token

    def expect(self, text):
        if self.take()[1] != text:
            raise _ParseError(f"expected {text}")

    def parse(self):
        exprs, ops = [self.expr()], []
        while self.peek()[1] in _RELATIONS:
            ops.append(_RELATIONS[self.take()[1]])
            exprs.append(self.expr())
        if self.i != len(self.tokens):
            raise _ParseError(f"unexpected {self.peek()[1]}")
        return exprs[0] if not ops else ("rel", ops, exprs)

    def expr(self):
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise _ParseError("too deep")
        node = self.term()
        while self.peek()[1] in ("+", "-"):
            op = "add" if self.take()[1] == "+" else "sub"
            node = (op, node, self.term())
        self.depth -= 1
        return node

    def starts_atom(self, token):
        kind, text = token
        return (kind == "num" or (kind == "ch" and (text.isalpha() or text in "([{" or (text == "|" and not self.abs_open)))
                or text in _ATOM_COMMANDS)

    def term(self):
        node = self.signed()
        while True:
            text = self.peek()[1]
            if text in ("*", "\\cdot", "\\times"):
                self.take()
                node = ("mul", node, self.signed())
            elif text in ("/", "\\div"):
                self.take()
                node = ("div", node, self.signed())
            elif self.starts_atom(self.peek()):
                if self.peek()[0] == "num" and self.tokens[self.i - 1][0] == "num":
                    raise _ParseError("two numbers in a row")   # "1 000": not a product
                node = ("mul", node, self.power())
            else:
                return node

    def signed(self):
        if self.peek()[1] == "-":
            self.take()
            return ("neg", self.signed())
        if self.peek()[1] == "+":
            self.take()
            return self.signed()
        return self.power()

    def power(self):
        base = self.postfix()
        if self.peek()[1] == "^":
            self.take()
            return ("pow", base, self.exponent())
        return base

    def exponent(self):
        """The argument of ^: a {group}, or one token; a bare number is read whole (2^10 = 1024,
        as plain-text answers mean it, though LaTeX would typeset 2^1 0)."""
        if self.peek()[1] in ("-", "+"):
            sign = self.take()[1]
            value = self.exponent()
            return ("neg", value) if sign == "-" else value
        return self.power()

    def postfix(self):
        node = self.atom()
        while self.peek()[1] == "!":
            self.take()
            node = ("fact", node)
        return node

    def argument(self):
        """A macro argument: {group}, or ONE token (\\frac12 is 1/2, \\sqrt3 is sqrt(3))."""
        kind, text = self.peek()
        if text == "{":
            self.take()
            node = self.expr()
            self.expect("}")
            return node
        if kind == "num" and len(text) > 1:
            self.tokens[self.i] = ("num", text[1:])   # the rest of the digits stay in the stream
            return ("num", text[0])
        return self.atom()

    def group(self, close):
        node = self.expr()
        self.expect(close)
        return node

    def atom(self):
        kind, text = self.take()
        if kind == "num":
            if self.peek()[1] == "_":           # 1011_2: a base subscript, the digits are the answer
                self.take()
                self.argument()
            return self.mixed_number(("num", text))
        if kind == "ch" and text.isalpha():
            if self.peek()[1] == "_":
                self.take()
                return ("sym", text + "_" + self.subscript())
            return ("const", "E") if text == "e" else ("const", "I") if text == "i" else ("sym", text)
        if text in ("(", "["):
            return self.group(")" if text == "(" else "]")
        if text == "{":
            return self.group("}")
        if text == "|":
            self.abs_open += 1
            node = self.group("|")
            self.abs_open -= 1
            return ("fn", "abs", node)
        if text == "\\lfloor":
            return ("fn", "floor", self.group("\\rfloor"))
        if text == "\\lceil":
            return ("fn", "ceiling", self.group("\\rceil"))
        if text == "\\frac":
            return ("div", self.argument(), self.argument())
        if text == "\\binom":
            return ("binom", self.argument(), self.argument())
        if text == "\\sqrt":
            index = ("num", "2")
            if self.peek()[1] == "[":
                self.take()
                index = self.group("]")
            return ("root", self.argument(), index)
        if text == "\\pi":
            return ("const", "pi")
        if text == "\\infty":
            return ("const", "oo")
        if text == "\\imath":
            return ("const", "I")
        if text[1:] in _GREEK:
            return ("sym", text[1:])
        if text[1:] in _FUNCTIONS:
            return self.function(text[1:])
        raise _ParseError(f"unknown {text}")

    def subscript(self):
        if self.peek()[1] == "{":
            self.take()
            parts = []
            while self.peek()[1] != "}":
                if self.peek()[0] == "end":
                    raise _ParseError("open subscript")
                parts.append(self.take()[1])
            self.take()
            return "".join(parts)
        return self.take()[1]

    def mixed_number(self, whole):
        """2\\frac{1}{2} is 5/2 (MATH's mixed numbers) when both parts are integers and it is a
        proper fraction; otherwise a product (2\\frac{\\pi}{3})."""
        if whole[1].isdigit() and self.peek()[1] == "\\frac":
            saved, saved_tokens = self.i, list(self.tokens)
            self.take()
            numerator, denominator = self.argument(), self.argument()
            if (numerator[0] == denominator[0] == "num" and numerator[1].isdigit() and denominator[1].isdigit()
                    and 0 < int(numerator[1]) < int(denominator[1])):
                return ("add", whole, ("div", numerator, denominator))
            self.i, self.tokens = saved, saved_tokens
        return whole

    def function(self, name):
        power = None
        base = None
        if name == "log" and self.peek()[1] == "_":
            self.take()
            base = self.argument()
        if self.peek()[1] == "^":               # \sin^2 x = (\sin x)^2, \sin^{-1} x = \arcsin x
            self.take()
            power = self.exponent()
        if self.peek()[1] in ("(", "{"):
            argument = self.atom()
        else:                                   # \sin 2x = \sin(2x); stops at the next function
            argument = self.power()
            while self.starts_atom(self.peek()) and self.peek()[1][1:] not in _FUNCTIONS:
                argument = ("mul", argument, self.power())
        if power == ("neg", ("num", "1")) and name in ("sin", "cos", "tan"):
            return ("fn", "a" + name, argument)
        node = ("log", argument, base) if base is not None else ("fn", name, argument)
        return ("pow", node, power) if power is not None else node


@functools.lru_cache(maxsize=8192)
def _parse_or_none(s):
    try:
        if len(s) > MAX_ANSWER_CHARS or _nesting(s) > MAX_NESTING:
            raise _ParseError("too big")
        return _Parser(_tokenize(s)).parse()
    except (_ParseError, RecursionError, IndexError):
        return None


def _parse(s):
    """The tree of a cleaned scalar string; raises _ParseError."""
    tree = _parse_or_none(s)
    if tree is None:
        raise _ParseError(f"cannot parse {s!r}")
    return tree


# =============================================================================
# 5. Numbers, in-process and fast: exact Fractions while the arithmetic stays rational and small,
#    complex floats otherwise (so \sqrt{-4}, \log(-1) just work). Values past 10^300 are refused.

class _Absurd(Exception):
    pass


class _Undefined(Exception):
    pass


def _bits(q):
    return max(q.numerator.bit_length(), q.denominator.bit_length())


def _exact_root(q, n):
    """The exact n-th root of a Fraction q >= 0, or None."""
    roots = []
    for part in (q.numerator, q.denominator):
        r = round(part ** (1.0 / n)) if part < 2 ** 1000 else None
        if r is None:
            return None
        for candidate in (r - 1, r, r + 1):
            if candidate >= 0 and candidate ** n == part:
                roots.append(candidate)
                break
        else:
            return None
    return Fraction(roots[0], roots[1])


def _finite(z):
    z = complex(z)
    if not (math.isfinite(z.real) and math.isfinite(z.imag)) or abs(z) > 10.0 ** MAX_MAGNITUDE:
        raise _Absurd("overflow")
    return z


def _power(a, b):
    if isinstance(a, Fraction) and isinstance(b, Fraction):
        if b.denominator == 1:
            e = b.numerator
            if a == 0 and e < 0:
                raise _Undefined("0^-n")
            if abs(a) in (0, 1) or _bits(a) * abs(e) <= MAX_EXACT_BITS:
                return a ** e
            raise _Absurd("huge power")
        if a >= 0 and b.denominator <= 64:
            root = _exact_root(a, b.denominator)
            if root is not None:
                return _power(root, Fraction(b.numerator))
        if a < 0 and b.denominator % 2 == 1:     # (-8)^{1/3} = -2: the real root, as MATH means it
            return (-1) ** b.numerator * _power(-a, b)
    a, b = complex(a), complex(b)
    if a == 0:
        if b.real > 0:
            return 0j
        raise _Undefined("0^x")
    if abs(b) * abs(cmath.log(a)) > 700:
        raise _Absurd("huge power")
    return _finite(a ** b)


def _real(z):
    z = complex(z)
    if abs(z.imag) > 1e-12 * max(1.0, abs(z)):
        raise _Undefined("not real")
    return z.real


def _integer(v, limit):
    if isinstance(v, Fraction) and v.denominator == 1 and 0 <= v.numerator <= limit:
        return v.numerator
    raise _Absurd("not a small integer")


_COMPLEX_FUNCTIONS = {"sin": cmath.sin, "cos": cmath.cos, "tan": cmath.tan, "arcsin": cmath.asin, "asin": cmath.asin,
                      "arccos": cmath.acos, "acos": cmath.acos, "arctan": cmath.atan, "atan": cmath.atan,
                      "sinh": cmath.sinh, "cosh": cmath.cosh, "tanh": cmath.tanh, "exp": cmath.exp,
                      "ln": cmath.log, "log": cmath.log, "cot": lambda z: 1 / cmath.tan(z),
                      "sec": lambda z: 1 / cmath.cos(z), "csc": lambda z: 1 / cmath.sin(z)}
_CONSTANTS = {"pi": math.pi, "E": math.e, "I": 1j}


def _value(node, env):
    """The value of a tree: a Fraction when exact, else a complex. env: symbol -> value."""
    kind = node[0]
    if kind == "num":
        mantissa, _, exponent = node[1].lower().partition("e")
        if len(node[1]) > MAX_MAGNITUDE or (exponent and abs(int(exponent)) > MAX_MAGNITUDE):
            raise _Absurd("long number")
        return Fraction(node[1].rstrip("."))
    if kind == "sym":
        if node[1] not in env:
            raise _Undefined("free symbol")
        return env[node[1]]
    if kind == "const":
        if node[1] == "oo":
            raise _Undefined("infinity inside an expression")
        return complex(_CONSTANTS[node[1]])
    if kind == "neg":
        return -_value(node[1], env)
    if kind in ("add", "sub", "mul", "div"):
        a, b = _value(node[1], env), _value(node[2], env)
        if isinstance(a, Fraction) != isinstance(b, Fraction):
            a, b = complex(a), complex(b)
        if isinstance(a, Fraction) and max(_bits(a), _bits(b)) > MAX_EXACT_BITS:
            a, b = _finite(a), _finite(b)
        if kind == "div" and b == 0:
            raise _Undefined("division by zero")
        result = a + b if kind == "add" else a - b if kind == "sub" else a * b if kind == "mul" else a / b
        return result if isinstance(result, Fraction) else _finite(result)
    if kind == "pow":
        return _power(_value(node[1], env), _value(node[2], env))
    if kind == "root":
        return _power(_value(node[1], env), 1 / Fraction(_integer(_value(node[2], env), 1000) or 1))
    if kind == "fact":
        v = _value(node[1], env)
        if isinstance(v, Fraction) and v.denominator == 1:
            return Fraction(math.factorial(_integer(v, 2000)))
        return _finite(math.gamma(_real(v) + 1))
    if kind == "binom":
        n, k = _value(node[1], env), _value(node[2], env)
        return Fraction(math.comb(_integer(n, 20000), _integer(k, 20000)))
    if kind == "log":
        argument, base = complex(_value(node[1], env)), complex(_value(node[2], env))
        if argument == 0 or base in (0, 1):
            raise _Undefined("log")
        return _finite(cmath.log(argument) / cmath.log(base))
    if kind == "fn":
        name, v = node[1], _value(node[2], env)
        if name == "abs":
            return abs(v) if isinstance(v, Fraction) else complex(abs(v))
        if name in ("floor", "ceiling"):
            x = v if isinstance(v, Fraction) else _real(v)
            return Fraction(math.floor(x) if name == "floor" else math.ceil(x))
        try:
            return _finite(_COMPLEX_FUNCTIONS[name](complex(v)))
        except (ValueError, ZeroDivisionError):
            raise _Undefined(name)
    raise _Undefined(kind)


def _symbols(node, found=None):
    found = set() if found is None else found
    if isinstance(node, (tuple, list)):
        if node and node[0] == "sym":
            found.add(node[1])
        for child in node[1:]:
            _symbols(child, found)
    return found


def _has_decimal(node):
    if isinstance(node, (tuple, list)):
        if node and node[0] == "num":
            return "." in node[1] or "e" in node[1].lower()
        return any(_has_decimal(child) for child in node[1:])
    return False


def _close(x, y, rel):
    x, y = complex(x), complex(y)
    return abs(x - y) <= rel * max(abs(x), abs(y)) or abs(x - y) <= 1e-12


def _infinity(node):
    """+1 / -1 for \\infty / -\\infty, else 0."""
    if node == ("const", "oo"):
        return 1
    return -_infinity(node[1]) if node[0] == "neg" else 0


# Points where expressions in variables are compared (fixed, so grading is deterministic).
_POINTS = [(0.6180339887, 0.2718281828), (1.3247179572, 0.5772156649), (2.1543469014, 0.4142135623)]


def _numeric_verdict(a, b):
    """True / False when the numbers settle it; "confirm" when they agree and only the symbolic
    check can make it certain; "unknown" when they could not be computed; "absurd" when a value
    is too large to handle (refused: the strings already differ, so the answer is False)."""
    inf_a, inf_b = _infinity(a), _infinity(b)
    if inf_a or inf_b:
        other = b if inf_a else a
        if not (inf_a and inf_b) and "oo" in json.dumps(other):
            return "unknown"        # \infty + 1: sympy knows that arithmetic
        return inf_a == inf_b
    symbols = sorted(_symbols(a) | _symbols(b))
    decimal = _has_decimal(a) or _has_decimal(b)
    try:
        if not symbols:
            va, vb = _value(a, {}), _value(b, {})
            if isinstance(va, Fraction) and isinstance(vb, Fraction):
                return va == vb or (decimal and _close(va, vb, REL_TOL_FLOAT))
            if decimal:
                return _close(va, vb, REL_TOL_APPROX)
            if _close(va, vb, 1e-9):
                return "confirm"
            return "unknown" if _close(va, vb, 1e-6) else False   # near miss: sympy's 40 digits decide
        agreed = 0
        for point in _POINTS:
            for imaginary in (0, 1):     # real points first; complex ones where the reals are outside the domain
                env = {s: complex(point[0] + 0.37 * k, imaginary * point[1]) for k, s in enumerate(symbols)}
                try:
                    va, vb = _value(a, env), _value(b, env)
                except _Undefined:
                    continue
                if not _close(va, vb, 1e-8):
                    return False
                agreed += 1
                break
        return "confirm" if agreed else "unknown"
    except _Absurd:
        return "absurd"
    except (_Undefined, ArithmeticError, ValueError, TypeError):
        return "unknown"


def _proportional(f, g):
    """Are f and g (lhs - rhs of two equations) nonzero multiples of each other at the points?"""
    symbols = sorted(_symbols(f) | _symbols(g))
    ratios = []
    try:
        for point in _POINTS:
            env = {s: complex(point[0] + 0.37 * k, point[1]) for k, s in enumerate(symbols)}
            vf, vg = complex(_value(f, env)), complex(_value(g, env))
            if abs(vg) < 1e-12 or abs(vf) < 1e-12:
                return "unknown" if abs(vf) < 1e-12 and abs(vg) < 1e-12 else False
            ratios.append(vf / vg)
    except _Absurd:
        return "absurd"
    except (_Undefined, ArithmeticError, ValueError, TypeError):
        return "unknown"
    return "confirm" if all(_close(r, ratios[0], 1e-8) for r in ratios) else False


# =============================================================================
# 6. Symbolic check with sympy, through our own tree -> sympy converter, in a worker process.

def _to_sympy(node):
    import sympy as sp
    kind = node[0]
    if kind == "num":
        q = Fraction(node[1].rstrip("."))
        return sp.Rational(q.numerator, q.denominator)
    if kind == "sym":
        return sp.Symbol(node[1])
    if kind == "const":
        return {"pi": sp.pi, "E": sp.E, "I": sp.I, "oo": sp.oo}[node[1]]
    if kind == "neg":
        return -_to_sympy(node[1])
    if kind == "rel":
        raise ValueError("relations are compared as lhs - rhs")
    args = [_to_sympy(child) for child in node[1:] if isinstance(child, (list, tuple))]
    if kind == "fn":
        name = node[1]
        table = {"sin": sp.sin, "cos": sp.cos, "tan": sp.tan, "cot": sp.cot, "sec": sp.sec, "csc": sp.csc,
                 "arcsin": sp.asin, "asin": sp.asin, "arccos": sp.acos, "acos": sp.acos, "arctan": sp.atan,
                 "atan": sp.atan, "sinh": sp.sinh, "cosh": sp.cosh, "tanh": sp.tanh, "exp": sp.exp, "ln": sp.log,
                 "log": sp.log, "abs": sp.Abs, "floor": sp.floor, "ceiling": sp.ceiling}
        return table[name](args[0])
    a, b = args[0], (args[1] if len(args) > 1 else None)
    if kind == "add":
        return a + b
    if kind == "sub":
        return a - b
    if kind == "mul":
        return a * b
    if kind == "div":
        return a / b
    if kind in ("pow", "root"):
        exponent = b if kind == "pow" else 1 / b
        if exponent.is_Rational and exponent.q % 2 == 1 and exponent.q > 1 and a.is_negative:
            return (-1) ** exponent.p * (-a) ** exponent   # the real odd root, as _power computes it
        return a ** exponent
    if kind == "fact":
        return sp.factorial(a)
    if kind == "binom":
        return sp.binomial(a, b)
    if kind == "log":
        return sp.log(a, b)
    raise ValueError(f"unknown node {kind}")


def latex_to_sympy(latex):
    """Our LaTeX -> sympy converter, for a scalar answer ("\\frac{\\sqrt3}{2}", "2x^2+1", "\\binom{5}{2}").
    Raises ValueError when the string is not an expression we read."""
    try:
        tree = _parse(_clean(str(latex)))
    except _ParseError as e:
        raise ValueError(f"cannot parse {latex!r}: {e}") from None
    if tree[0] == "rel":
        import sympy as sp
        ops = {"=": sp.Eq, "<": sp.Lt, ">": sp.Gt, "<=": sp.Le, ">=": sp.Ge, "!=": sp.Ne}
        return ops[tree[1][0]](_to_sympy(tree[2][0]), _to_sympy(tree[2][1]))
    return _to_sympy(tree)


def _sympy_equal(kind, a_tree, b_tree):
    """In the worker: True / False, or None when sympy cannot tell. kind "expr": a == b;
    kind "equation": a and b (each lhs - rhs) are nonzero multiples of each other."""
    import sympy as sp
    a, b = _to_sympy(a_tree), _to_sympy(b_tree)
    if kind == "equation":
        ratio = sp.simplify(a / b)
        return bool(ratio.is_number and ratio != 0 and ratio.is_finite) or None
    difference = a - b
    if a == b or difference == 0 or sp.expand(difference) == 0 or sp.simplify(difference) == 0:
        return True
    # simplify may fail to prove a true identity: decide with 40 digits at rational points
    symbols = sorted(difference.free_symbols, key=str)
    for point in _POINTS:
        subs = {s: sp.Rational(point[0]).limit_denominator(1000) + sp.Rational(37, 100) * k
                for k, s in enumerate(symbols)}
        value, scale = sp.N(difference.subs(subs), 40), sp.N(a.subs(subs), 40)
        if value.is_number and value.is_finite and scale.is_finite:
            return bool(abs(value) <= sp.Float("1e-25") * max(1, abs(scale)))
    return None


class _Expired(BaseException):
    pass


def _sympy_worker():
    """The worker's loop: one JSON request per line on stdin, one JSON answer per line on stdout.
    Each request carries its deadline; SIGALRM stops pure-Python work at it, and the parent kills
    the process if even that fails (a long C-level big-integer operation)."""
    import resource
    import signal
    limit = WORKER_MEMORY_MB * 2 ** 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        import sympy  # noqa: F401
    except Exception as e:  # reported to the parent, which warns once and falls back to numbers
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
        return

    def expire(signum, frame):
        raise _Expired()

    signal.signal(signal.SIGALRM, expire)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        result = None
        left = request["deadline"] - time.time()
        if left > 0.01:
            try:
                signal.setitimer(signal.ITIMER_REAL, left)
                result = _sympy_equal(request["kind"], request["a"], request["b"])
            except BaseException:
                result = None
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        print(json.dumps({"id": request["id"], "result": result}), flush=True)


class _SympyWorker:
    """A long-lived `python -c "...grade._sympy_worker()"` process: sympy is imported once, and a
    request that runs past its deadline costs one restart, never a hung grader."""

    def __init__(self):
        self.process, self.owner, self.buffer, self.request_id = None, None, b"", 0
        self.lock = threading.Lock()
        self.broken = None      # why sympy is unavailable (then numbers decide alone)
        self.ready = False      # sympy imported

    def start(self):
        here = os.path.dirname(os.path.abspath(__file__))
        code = f"import sys; sys.path.insert(0, {here!r}); import grade; grade._sympy_worker()"
        self.ready = False
        # no preexec_fn: the parent has threads (the sampler's tool calls); the worker limits itself
        self.process = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, start_new_session=True)
        self.owner, self.buffer = os.getpid(), b""

    def stop(self):
        if self.process is not None and self.owner == os.getpid():
            self.process.kill()
            self.process.wait()
        self.process = None

    def readline(self, until):
        while b"\n" not in self.buffer:
            left = until - time.time()
            if left <= 0 or not select.select([self.process.stdout], [], [], left)[0]:
                return None
            chunk = os.read(self.process.stdout.fileno(), 65536)
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def ask(self, kind, a, b, deadline):
        if self.broken:
            return None
        with self.lock:
            if self.process is None or self.owner != os.getpid() or self.process.poll() is not None:
                self.start()    # first use, or a fork of a process that had one
            self.request_id += 1
            request = {"id": self.request_id, "kind": kind, "a": a, "b": b, "deadline": deadline}
            try:
                self.process.stdin.write((json.dumps(request) + "\n").encode())
                self.process.stdin.flush()
                while True:
                    answer = self.readline(deadline + WORKER_GRACE)
                    if answer is None:
                        break
                    if "error" in answer:
                        self.broken = answer["error"]
                        print(f"grade.py: WARNING: sympy is unavailable ({self.broken}); symbolic "
                              "equivalence is off, numbers decide alone", file=sys.stderr)
                        return None
                    if answer.get("ready"):
                        self.ready = True
                    if answer.get("id") == self.request_id:
                        return answer["result"]
            except (OSError, ValueError):
                pass
            if self.ready or self.process.poll() is not None:
                self.stop()     # stuck past its deadline (or dead): replace it, in the background
                self.start()
            # else it is still importing sympy (a loaded machine): keep it; it will skip this
            # request, whose deadline has passed, and answer the next one
            return None


_WORKER = _SympyWorker()
atexit.register(_WORKER.stop)


def _start_worker_early():
    """Start the worker before it is needed: importing sympy takes a while on a busy machine."""
    if _WORKER.process is None and not _WORKER.broken:
        with _WORKER.lock:
            if _WORKER.process is None:
                _WORKER.start()


def _symbolic(kind, a, b, deadline, default):
    if deadline - time.time() <= 0.05:
        return default
    result = _WORKER.ask(kind, a, b, deadline)
    return default if result is None else result


# =============================================================================
# 7. is_equiv and grade.

def _lhs_minus_rhs(tree):
    return ("sub", tree[2][0], tree[2][1])


def _scalar_equiv(a, b, deadline):
    a, b = _clean(a), _clean(b)
    if _key(a) == _key(b):
        return True
    if not a or not b:
        return False
    percent_a, percent_b = a.endswith("\\%"), b.endswith("\\%")
    if percent_a or percent_b:     # 10\% equals 10 (the MATH convention) and also 0.1
        a, b = a[:-2].strip() if percent_a else a, b[:-2].strip() if percent_b else b
        if _scalar_equiv(a, b, deadline):
            return True
        if percent_a != percent_b:
            return _scalar_equiv(f"\\frac{{{a}}}{{100}}" if percent_a else a,
                                 f"\\frac{{{b}}}{{100}}" if percent_b else b, deadline)
        return False
    words = re.compile(r"[A-Za-z][A-Za-z\s'\-]*")
    if words.fullmatch(a) and words.fullmatch(b):    # "Monday", "yes", "(A)" after cleaning
        if a.lower() == b.lower():
            return True
        if " " in a + b or max(len(a), len(b)) > 3:
            return False
    _start_worker_early()
    try:
        tree_a, tree_b = _parse(a), _parse(b)
    except (_ParseError, RecursionError, IndexError):
        return False
    if tree_a == tree_b:
        return True
    rel_a, rel_b = tree_a[0] == "rel", tree_b[0] == "rel"
    if rel_a or rel_b:
        if not (rel_a and rel_b) or len(tree_a[1]) != 1 or len(tree_b[1]) != 1:
            return False
        if tree_a[1] == tree_b[1] == ["="]:        # y = 2x + 3 vs 2x - y + 3 = 0
            f, g = _lhs_minus_rhs(tree_a), _lhs_minus_rhs(tree_b)
            verdict = _proportional(f, g)
            if verdict in ("confirm", "unknown"):
                return _symbolic("equation", f, g, deadline, default=verdict == "confirm")
            return verdict is True
        flip = {"<": ">", ">": "<", "<=": ">=", ">=": "<=", "!=": "!="}
        if tree_a[1][0] != tree_b[1][0]:
            if flip.get(tree_a[1][0]) != tree_b[1][0]:
                return False
            tree_b = ("rel", [tree_a[1][0]], tree_b[2][::-1])
        return all(_tree_equiv(x, y, deadline) for x, y in zip(tree_a[2], tree_b[2]))
    return _tree_equiv(tree_a, tree_b, deadline)


def _tree_equiv(a, b, deadline):
    if a == b:
        return True
    verdict = _numeric_verdict(a, b)
    if verdict == "confirm":    # the numbers agree: sympy may only overturn it with a proof
        return _symbolic("expr", a, b, deadline, default=True)
    if verdict == "unknown":    # e.g. \infty inside an expression: sympy alone decides
        return _symbolic("expr", a, b, deadline, default=False)
    return verdict is True


def is_equiv(pred, gold, timeout=SYMBOLIC_BUDGET):
    """Are pred and gold the same answer? Never raises; returns in about `timeout` seconds at most
    (the symbolic checks' budget) plus a few milliseconds. None on either side is never equal."""
    try:
        if pred is None or gold is None:
            return False
        pred, gold = str(pred), str(gold)
        if pred.strip() == gold.strip():
            return True
        if max(len(pred), len(gold)) > MAX_ANSWER_CHARS or max(_nesting(pred), _nesting(gold)) > MAX_NESTING:
            return _key(pred.strip()) == _key(gold.strip())     # absurd inputs: strings only
        a, b = _clean(pred), _clean(gold)
        if _key(a) == _key(b):
            return True
        return bool(_struct_equiv(_structure(a), _structure(b), time.time() + timeout))
    except Exception:
        return False


def grade(response_text, gold):
    """(the extracted answer or None, whether it equals gold)."""
    answer = extract_answer(response_text)
    return answer, (answer is not None and is_equiv(answer, gold))

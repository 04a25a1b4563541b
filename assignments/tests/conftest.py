"""pytest setup for the assignment checks: the repo root on sys.path, one marker per assignment, and a report that
check.py turns into plain words (which checks failed and why; which were blocked by another assignment's blank)."""
import json
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))           # assignments/ (common, replay)
from common import MARKER_MESSAGE, ROOT, load_assignments  # noqa: E402

sys.path.insert(0, ROOT)
# As in tests/conftest.py: no hub, one thread per test process (the CPU is shared with the sandbox's workers)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ASSIGNMENT_IDS = [a["id"] for a in load_assignments()]
_results = []


def pytest_configure(config):
    for a in load_assignments():
        config.addinivalue_line("markers", f"{a['id']}: {a['title']}")


def _assignment_of(item):
    ids = [m.name for m in item.iter_markers() if m.name in ASSIGNMENT_IDS]
    return ids[0] if ids else None


def _not_implemented(excinfo):
    """The assignment ids of every NotImplementedError marker in the exception and its causes."""
    found, error, seen = [], excinfo.value if excinfo else None, set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, NotImplementedError):
            match = MARKER_MESSAGE.match(str(error))
            if match:
                found.append(match.group(1))
        error = error.__cause__ or error.__context__
    return found


def _where(excinfo):
    """file:line of the deepest frame in the repo's own code (not the checks): where the student's code failed."""
    where = None
    for entry in excinfo.traceback:
        path = str(entry.path)
        if path.startswith(ROOT) and "/assignments/" not in path and "/site-packages/" not in path:
            where = f"{os.path.relpath(path, ROOT)}:{entry.lineno + 1}"
    return where


def _message(excinfo):
    error = excinfo.value
    if isinstance(error, AssertionError):
        text = str(error)
        # pytest appends its own rendering of the failed expression after our message: keep ours
        for cut in ("\nassert ", "\n+  where", "\nassert"):
            if cut in text and not text.startswith("assert"):
                text = text.split(cut)[0]
        return text.strip() or "an assertion failed"
    text = f"{type(error).__name__}: {error}"
    where = _where(excinfo)
    return text + (f" (raised at {where})" if where else "")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" or report.outcome != "passed":    # each test once, and any setup/teardown failure
        doc = (item.obj.__doc__ or "").strip().splitlines() if hasattr(item, "obj") else []
        entry = {"test": item.nodeid, "assignment": _assignment_of(item), "what": doc[0] if doc else item.name,
                 "outcome": report.outcome, "when": report.when, "message": "", "not_implemented": []}
        if report.outcome == "skipped":
            entry["message"] = str(call.excinfo.value.msg if call.excinfo else report.longrepr[-1])
        elif call.excinfo is not None:
            entry["message"] = _message(call.excinfo)
            entry["not_implemented"] = _not_implemented(call.excinfo)
        _results.append(entry)


def pytest_collectreport(report):
    if report.failed:
        _results.append({"test": report.nodeid, "assignment": None, "what": "import the test file",
                         "outcome": "failed", "when": "collect", "message": str(report.longrepr)[-2000:],
                         "not_implemented": []})


def pytest_sessionfinish(session):
    path = os.environ.get("TOCODE_CHECK_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump(_results, f, indent=1)

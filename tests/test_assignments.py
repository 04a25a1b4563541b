"""Negative controls of the assignments (assignments/): every unit check passes on the reference, fails when its own
functions are blanked, is not blocked by any other assignment, and catches a planted bug.

    python -m pytest tests/test_assignments.py -q        # ~1.5 minutes on 2 cores (four unit runs, two at a time)

How, cheaply: one `check.py all --unit` on the repo (everything passes), one on a student version with everything
blanked (each assignment fails with exit 1: its own NotImplementedError, never 2, which would mean it reached
another assignment's blank), two on copies with one planted bug per assignment each (each fails). Blanking one
assignment at a time is checked without pytest: its functions become the marker and every other assignment's
function is byte-identical to the reference, so by the all-blanked run its checks cannot see it either way.
"""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "assignments"))
from common import blanked_ids, function_of, function_source, load_assignments  # noqa: E402

pytestmark = pytest.mark.assignments
MAKE = os.path.join(REPO, "assignments", "make_student.py")
TABLE = load_assignments()
IDS = [a["id"] for a in TABLE]
UNIT_IDS = [a["id"] for a in TABLE if a["functions"]]

# One planted bug per assignment: (file, exact text of the reference, what it becomes, the bug in words).
PLANTED = {
    "A1": ("synthesize.py", 'p_code = 1.0 if score["code"] > score["cot"] else 0.0',
           'p_code = 1.0 if score["code"] >= score["cot"] else 0.0', "argmax ties go to code"),
    "A2": ("synthesize.py", "std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / n)",
           "std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / max(n - 1, 1))", "the sample std in whiten"),
    "A3": ("synthesize.py", '"prompt_ids": autonomous_prompt_ids(rollout),', '"prompt_ids": rollout["prompt_ids"],',
           "training records keep the guided prompt"),
    "A4": ("train.py", "policy_term = torch.minimum(ratio * advantages, clipped_ratio * advantages)",
           "policy_term = torch.maximum(ratio * advantages, clipped_ratio * advantages)",
           "max for min in the clipped term"),
    "A5": ("logprobs.py", "                    probs_times_weight /= temperature\n", "                    pass\n",
           "d hidden forgets the temperature"),
    "A6": ("model.py", 'mask.masked_fill_(keys > positions[:, None, None, None], float("-inf"))',
           'mask.masked_fill_(keys > positions[:, None, None, None] + 1, float("-inf"))',
           "off-by-one: the decode mask lets a row see one position past its own"),
    "A7": ("sampler.py", "elif sampled and rules.tail_chars:", "elif rules.tail_chars:",
           "injected tool output can trigger another call or stop the row"),
    "A8": ("sandbox.py", '    if "pid_ns" not in features:\n        sweep()\n    status_msg',
           "    status_msg", "without a PID namespace, a timeout does not kill the child's children"),
    "A9": ("grade.py", "return _close(va, vb, REL_TOL_APPROX)", "return _close(va, vb, 1e-2)",
           "decimals match irrational values to 1e-2"),
}

# A second bug per assignment, of another kind, in a second copy: each was missed by an earlier version of the checks.
PLANTED_AGAIN = {
    "A1": ("synthesize.py",
           "p_code = 1.0 / (1.0 + math.exp(-gap)) if gap >= 0 else math.exp(gap) / (1.0 + math.exp(gap))",
           'p_code = math.exp(alpha * score["code"]) / (math.exp(alpha * score["code"]) + math.exp(alpha * score["cot"]))',
           "the tempered form as a ratio of two exponentials (overflows at a large α)"),
    "A2": ("synthesize.py", "    if max(rewards) == min(rewards):", "    if False:",
           "no zero-variance guard: 0 / 0 at eps = 0"),
    "A3": ("synthesize.py", 'if failed.get("finish_reason") == "eos":', 'if failed.get("finish_reason") != "length":',
           "a failed attempt that ended on a stop string or max_calls loses its last token"),
    "A4": ("train.py", "ratio = torch.exp(logprobs - behaviour_logprobs)",
           "ratio = torch.exp((logprobs - behaviour_logprobs).clamp(-5.0, 5.0))", "the ratio itself capped at e^5"),
    "A5": ("logprobs.py", "grad_hidden = torch.zeros(hidden.shape, dtype=float_dtype",
           "grad_hidden = torch.zeros(hidden.shape, dtype=hidden.dtype", "d hidden accumulated in bf16"),
    "A6": ("model.py", "cos, sin = self.rope_tables(capacity, x.dtype)", "cos, sin = self.rope_tables(n, x.dtype)",
           "the rotary table sized by the batch, not by the cache's capacity"),
    "A7": ("sampler.py", "if any(tail.endswith(s) for s in rules.stop_strings):",
           "if any(tail.rstrip().endswith(s) for s in rules.stop_strings):",
           "stop strings compared with the stripped tail (a whitespace stop string never stops)"),
    "A8": ("sandbox.py", "outputs[fd] += chunk[: cap + 1 - len(outputs[fd])]", "outputs[fd] += chunk[: cap + 1]",
           "the cap forgets the bytes already kept"),
    "A9": ("grade.py", "complex(point[0] + 0.37 * k, imaginary * point[1])",
           "complex(point[0] + 0.37 * (k + 1), imaginary * point[1])", "variables shifted off the fixed points"),
}


def planted_copy(out, bugs):
    """An exact copy of the repo with every bug of `bugs` written in."""
    student_copy(out, "A10")                                # A10 has no functions: an exact copy
    for aid, (path, old, new, _) in bugs.items():
        file = out / path
        text = file.read_text()
        assert text.count(old) == 1, (f"the planted bug of {aid} no longer applies: {path} changed (expected the "
                                      f"text {old!r} once); update the planted bugs in tests/test_assignments.py")
        file.write_text(text.replace(old, new))
    return out


def student_copy(out, only):
    result = subprocess.run([sys.executable, MAKE, "--only", only, str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def start_units(root, json_path):
    """check.py all --unit in root, in the background; returns the Popen."""
    return subprocess.Popen([sys.executable, os.path.join(str(root), "assignments", "check.py"), "all", "--unit",
                             "--json", str(json_path)], cwd=str(root), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(process, json_path):
    output, _ = process.communicate(timeout=600)
    assert os.path.exists(json_path), output[-3000:]
    with open(json_path) as f:
        return json.load(f), output


@pytest.fixture(scope="module")
def unit_runs(tmp_path_factory):
    """The four unit runs, two at a time (2 cores): the reference repo, all blanked, and two copies with one planted
    bug per assignment each."""
    tmp = tmp_path_factory.mktemp("assignments")
    blank = student_copy(tmp / "all_blanked", "all")
    planted = planted_copy(tmp / "planted", PLANTED)
    planted_again = planted_copy(tmp / "planted_again", PLANTED_AGAIN)
    runs = {}
    first = {"repo": start_units(REPO, tmp / "repo.json"), "blank": start_units(blank, tmp / "blank.json")}
    runs["blank"] = finish(first.pop("blank"), tmp / "blank.json")
    planted_run = start_units(planted, tmp / "planted.json")
    runs["repo"] = finish(first.pop("repo"), tmp / "repo.json")
    again_run = start_units(planted_again, tmp / "planted_again.json")
    runs["planted"] = finish(planted_run, tmp / "planted.json")
    runs["planted_again"] = finish(again_run, tmp / "planted_again.json")
    return runs


def sandbox_has_pid_namespaces():
    """Whether this kernel gives the sandbox PID namespaces (a default Docker container does not): without them A8's
    check is blocked (exit 2) for its namespace variant, on the reference too."""
    probe = ("import sandbox; launcher = sandbox._checkout(); print('pid_ns' in launcher.hello['features']); "
             "sandbox._idle.append(launcher)")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    return result.stdout.strip().endswith("True")


def test_the_reference_passes_every_unit_check(unit_runs):
    codes, output = unit_runs["repo"]
    expected = {aid: 0 for aid in IDS}
    if not sandbox_has_pid_namespaces():
        expected["A8"] = 2
    assert codes == expected, output[-4000:]


def test_a_blanked_assignment_fails_its_own_check_and_blocks_no_other(unit_runs):
    codes, output = unit_runs["blank"]
    expected = {aid: (1 if aid in UNIT_IDS else 0) for aid in IDS}
    # 2 (blocked) would mean a check ran into ANOTHER assignment's NotImplementedError
    assert codes == expected, output[-4000:]
    assert "still blanked in this copy" not in output, output[-4000:]


@pytest.mark.parametrize("aid", UNIT_IDS)
def test_blanking_one_assignment_touches_only_its_functions(tmp_path, aid):
    out = student_copy(tmp_path / aid, aid)
    for a in TABLE:
        for spec in a["functions"]:
            if a["id"] == aid:
                assert blanked_ids(str(out), spec) == [aid], f"{spec} was not blanked"
                assert f'"{aid}: see assignments/{a["handout"]}"' in function_source(str(out), spec)
            else:
                assert function_source(str(out), spec) == function_source(REPO, spec), f"{spec} changed"
    touched = {function_of(spec)[0] for spec in next(a for a in TABLE if a["id"] == aid)["functions"]}
    for path in ("synthesize.py", "train.py", "model.py", "sandbox.py", "grade.py", "task.py", "jsonl.py", "sampler.py", "logprobs.py", "em.sh"):
        if path not in touched:
            with open(os.path.join(REPO, path), "rb") as f, open(out / path, "rb") as g:
                assert f.read() == g.read(), f"{path} differs in the {aid} student version"


@pytest.mark.parametrize("aid", UNIT_IDS)
def test_a_planted_bug_is_caught(unit_runs, aid):
    codes, output = unit_runs["planted"]
    assert codes[aid] == 1, f"{aid}'s unit check missed the planted bug ({PLANTED[aid][3]}):\n{output[-3000:]}"
    codes, output = unit_runs["planted_again"]
    assert codes[aid] == 1, (f"{aid}'s unit check missed the second planted bug ({PLANTED_AGAIN[aid][3]}):\n"
                             f"{output[-3000:]}")


def test_one_check_alone_from_the_command_line(tmp_path):
    """check.py ID --unit on a copy with ID blanked: exit 1 and the words 'not implemented yet'."""
    out = student_copy(tmp_path / "a2", "A2")
    result = subprocess.run([sys.executable, "assignments/check.py", "A2", "--unit"], cwd=out, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1 and "not implemented yet" in result.stdout, result.stdout + result.stderr
    listed = subprocess.run([sys.executable, "assignments/check.py", "--list"], cwd=out, capture_output=True, text=True)
    assert listed.stdout.split() == IDS


def test_make_student_refuses_to_write_inside_the_repo_or_over_files(tmp_path):
    inside = subprocess.run([sys.executable, MAKE, "--only", "A1", os.path.join(REPO, "student")], capture_output=True,
                            text=True)
    assert inside.returncode == 2 and "refusing" in inside.stderr and not os.path.exists(os.path.join(REPO, "student"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    over = subprocess.run([sys.executable, MAKE, "--only", "A1", str(tmp_path / "full")], capture_output=True, text=True)
    assert over.returncode == 2 and "not an empty directory" in over.stderr


def test_a_student_version_has_the_repo_files_but_runs_and_instructor_files(tmp_path):
    sys.path.insert(0, os.path.join(REPO, "assignments"))
    import make_student
    out = student_copy(tmp_path / "s", "all")
    copied = sorted(os.path.relpath(os.path.join(d, n), out) for d, _, names in os.walk(out) for n in names)
    assert copied == sorted(make_student.files_to_copy(REPO))
    assert "assignments/check.py" in copied and "README.md" in copied and "em.sh" in copied
    assert not any(p.startswith(("runs/", ".git/")) for p in copied)
    assert "tests/test_assignments.py" not in copied and "assignments/make_fixtures.py" not in copied


def test_fixtures_are_up_to_date():
    """The committed fixtures are what the reference code gives now (else: python assignments/make_fixtures.py)."""
    result = subprocess.run([sys.executable, os.path.join(REPO, "assignments", "make_fixtures.py"), "--check"],
                            capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("callers", [{}, {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "ACTIVE"}])
def test_the_capstone_runs_em_sh_with_the_callers_threading(callers):
    """The small experiments pin one passive thread; the capstone's em.sh must not inherit that (it is timed as
    `bash em.sh` runs): it gets exactly what the caller of check.py had set, or nothing."""
    script = ("import json, sys\n"
              f"sys.path.insert(0, {os.path.join(REPO, 'assignments')!r})\n"
              "import experiments\n"
              "def em_sh(command, cwd, env):\n"
              "    print(json.dumps({k: env.get(k) for k in ('OMP_NUM_THREADS', 'OMP_WAIT_POLICY', 'SEED')}))\n"
              "    sys.exit(0)\n"
              "experiments.subprocess.run = em_sh\n"
              "experiments.experiment_capstone(2, 'threads')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    run = subprocess.run([sys.executable, "-c", script], env={**env, **callers}, capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.splitlines()[-1]) == {"OMP_NUM_THREADS": callers.get("OMP_NUM_THREADS"),
                                                       "OMP_WAIT_POLICY": callers.get("OMP_WAIT_POLICY"), "SEED": "2"}

"""em.sh end to end at toy size: the stages chain, their files appear, a rerun skips everything, and
summary.json carries the fields the README's table is made of."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def em_env(runs, **knobs):
    return {**os.environ, "PYTHON": sys.executable, "RUNS": str(runs), "NAME": "toy", "ITERS": "1",
            "N_QUERIES": "3", "N_TEST": "3", "K": "1", "MAX_NEW_TOKENS": "12", "EPOCHS": "1",
            "WARMSTART_ARGS": "--steps=3 --n_train=24 --batch_size=4 --check_n=0", "TRAIN_ARGS": "--batch_size=4",
            "OMP_NUM_THREADS": "1", **knobs}


def run_em(runs, **knobs):
    result = subprocess.run(["bash", os.path.join(REPO, "em.sh")], env=em_env(runs, **knobs), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_em_sh_runs_resumes_and_summarises(tmp_path):
    first = run_em(tmp_path)
    run = tmp_path / "toy"
    for path in ["queries.jsonl", "test.jsonl", "iter_0/model/config.json", "iter_0/eval/summary.json",
                 "iter_1/queries.jsonl", "iter_1/rollouts.jsonl", "iter_1/train.jsonl",
                 "iter_1/model/model.safetensors", "iter_1/model/train_config.json", "iter_1/eval/summary.json"]:
        assert (run / path).exists(), path
    assert len((run / "iter_1/queries.jsonl").read_text().splitlines()) == 3
    assert len((run / "iter_1/rollouts.jsonl").read_text().splitlines()) == 3 * 3  # 3 queries x 3 modes x K=1
    assert "== train 1:" in first and "done" not in first.split("== train 1:")[1].splitlines()[0]

    second = run_em(tmp_path)  # a rerun finds every output complete and runs no stage
    stages = [line for line in second.splitlines() if line.startswith("== ")]
    assert stages and all(line.endswith(")") and ": done (" in line for line in stages), stages

    summary = json.loads((run / "summary.json").read_text())
    assert [row["iteration"] for row in summary] == [0, 1]
    for row in summary:
        for mode in ("auto", "code", "cot"):
            for field in ("accuracy", "code_rate", "calls_per_problem", "by_family"):
                assert field in row[mode], (mode, field)
            for cell in row[mode]["by_family"].values():
                assert "accuracy" in cell and "code_rate" in cell
        assert "selection_accuracy" in row["auto"]
    assert "autonomous code rate" in second
    # a 3-step warm start cannot carry out either method: em.sh names it, with each family it missed
    misses = summary[0]["warm_start_misses"]
    assert misses and all(m.startswith("forced ") and m.endswith(": 0.0%") for m in misses), misses
    assert "THE WARM START MISSED ITS THRESHOLDS" in second and misses[0] in second
    assert summary[0]["warm_start_steps"] == 3
    assert summary[0]["warm_start_restarts"] == 0 and summary[0]["warm_start_repairs"] == 0
    # a threshold it meets everywhere (0%) names nothing; the threshold is no knob of the stages: nothing reruns
    passing = run_em(tmp_path, WARM_CODE_MIN="0", WARM_COT_MIN="0")
    assert "MISSED" not in passing and "warm start (3 steps, 0 restarts, 0 repairs)" in passing
    assert "at least 0.0%" in passing
    assert json.loads((run / "summary.json").read_text())[0]["warm_start_misses"] == []
    assert (run / "report.html").exists() and (run / "report.md").exists()

    # the same run dir with another knob is refused, not resumed into a mix of two settings
    other = subprocess.run(["bash", os.path.join(REPO, "em.sh")], env=em_env(tmp_path, SEED="2"), capture_output=True,
                           text=True, timeout=60)
    assert other.returncode == 2 and "other knobs" in other.stderr


def test_every_knob_has_a_default(tmp_path):
    """em.sh runs under `set -u`: with no knob in the environment, every knob line must still expand. A bad STRATEGY
    stops it right after the knobs, before any stage."""
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "STRATEGY": "bogus"}
    result = subprocess.run(["bash", os.path.join(REPO, "em.sh")], env=env, capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    assert result.returncode == 2 and "STRATEGY must be em, rl or sft" in result.stderr, result.stderr

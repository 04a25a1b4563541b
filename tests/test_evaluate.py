"""Tests of evaluate.py: the metrics on hand-computed records, p_code_open against a naive
computation, and the stage end to end on a tiny random checkpoint with a fake tool. The grader's
tests are in tests/test_grade.py."""

import json
import os

import pytest
import torch

import evaluate
import model
import sampler
import sandbox
import task


# -----------------------------------------------------------------------------
# The metrics on records whose numbers can be computed by hand.

def record(query, mode, correct, calls, family="easy", statuses=None, **extra):
    return {"id": f"{query}:{mode}", "query_id": query, "mode": mode, "correct": correct, "calls": calls,
            "statuses": statuses if statuses is not None else ["ok"] * calls, "response_tokens": 10 + calls,
            "family": family, **extra}


def test_summarize_by_hand():
    records = [
        # q1: CoT right -> oracle CoT; auto used no code: right choice
        record("q1", "code", True, 1), record("q1", "cot", True, 0), record("q1", "auto", True, 0, p_code_open=0.1),
        # q2: only code right -> oracle code; auto used code: right
        record("q2", "code", True, 1, "hard"), record("q2", "cot", False, 0, "hard"),
        record("q2", "auto", True, 2, "hard", statuses=["ok", "error"], p_code_open=0.5),
        # q3: CoT right -> oracle CoT; auto used code: wrong choice
        record("q3", "code", False, 1, statuses=["timeout"]), record("q3", "cot", True, 0),
        record("q3", "auto", True, 1, p_code_open=0.3),
        # q4: both forced modes wrong -> not counted for selection
        record("q4", "code", False, 1, "hard"), record("q4", "cot", False, 0, "hard"),
        record("q4", "auto", False, 0, "hard", p_code_open=0.1),
    ]
    summary = evaluate.summarize(records)
    assert list(summary) == ["auto", "code", "cot"]
    auto = summary["auto"]
    assert auto["n"] == 4 and auto["accuracy"] == 0.75 and auto["code_rate"] == 0.5
    assert auto["calls_per_problem"] == 0.75 and auto["tool_error_rate"] == pytest.approx(1 / 3)
    assert auto["mean_response_tokens"] == pytest.approx((10 + 12 + 11 + 10) / 4)
    assert auto["p_code_open"] == pytest.approx(0.25)
    assert auto["selection_accuracy"] == pytest.approx(2 / 3) and auto["selection_n"] == 3
    assert auto["oracle_accuracy"] == pytest.approx(3 / 4)
    assert auto["by_family"]["easy"] == {"accuracy": 1.0, "code_rate": 0.5, "n": 2, "p_code_open": pytest.approx(0.2),
                                         "selection_accuracy": 0.5}
    assert auto["by_family"]["hard"]["selection_accuracy"] == 1.0
    assert summary["code"]["tool_error_rate"] == 0.25 and summary["code"]["code_rate"] == 1.0
    assert summary["cot"]["accuracy"] == 0.5 and "selection_accuracy" not in summary["cot"]
    only_cot = evaluate.summarize([r for r in records if r["mode"] == "cot"])
    assert list(only_cot) == ["cot"] and only_cot["cot"]["tool_error_rate"] == 0.0


# -----------------------------------------------------------------------------
# The stage end to end on a tiny random checkpoint.

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny") / "ckpt")
    net, tokenizer = model.load("tiny")
    model.save(net, tokenizer, path)
    return path


def test_code_open_probability_matches_naive(tiny_checkpoint):
    net, tokenizer = model.load(tiny_checkpoint)
    open_ids = tokenizer.encode(task.CODE_OPEN, add_special_tokens=False)
    prompts = [task.encode_prompt(tokenizer, p, "auto") for p in ("What is 2 + 3?", "Compute 123 * 45 now, please.")]
    with torch.inference_mode():
        ours = sampler.code_open_probability(net, tokenizer, prompts)
        for prompt, p in zip(prompts, ours):
            logprobs = torch.log_softmax(net(torch.tensor([prompt + open_ids]))[0].float(), -1)
            naive = sum(logprobs[len(prompt) - 1 + j, t].item() for j, t in enumerate(open_ids))
            assert p == pytest.approx(float(torch.tensor(naive).exp()), rel=1e-4)


def test_stage_end_to_end(tiny_checkpoint, tmp_path, monkeypatch):
    tool_calls = []

    def fake_tool(responses, **limits):
        tool_calls.append(len(responses))
        return [("42", "ok")] * len(responses)

    monkeypatch.setattr(sandbox, "tool", fake_tool)
    generated = []
    real_generate = sampler.generate
    monkeypatch.setattr(evaluate, "generate", lambda net, prompts, *a, **k: generated.append(len(prompts)) or
                        real_generate(net, prompts, *a, **k))

    queries = task.make_problems(5, "test")
    queries_path = tmp_path / "queries.jsonl"
    queries_path.write_text("".join(json.dumps({**q, "level": "Level 1"}) + "\n" for q in queries))
    out = tmp_path / "eval"
    common = [f"--model={tiny_checkpoint}", f"--data={queries_path}", f"--out={out}", "--max_new_tokens=16",
              "--batch_size=4", "--n=3"]

    evaluate.main(common + ["--mode=cot"])
    assert sum(generated) == 3
    evaluate.main(common + ["--mode=all"])           # extends the finished cot run with auto and code
    assert sum(generated) == 9

    assert not os.path.exists(out / "eval.jsonl.partial")
    records = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert len(records) == 9 and len({r["id"] for r in records}) == 9
    assert {r["mode"] for r in records} == {"auto", "code", "cot"}
    fields = {"id", "query_id", "mode", "response", "answer", "gold", "correct", "calls", "statuses",
              "finish_reason", "family", "level", "response_tokens"}
    for r in records:
        assert fields <= set(r)
        assert r["id"] == f"{r['query_id']}:{r['mode']}" and r["calls"] == len(r["statuses"])
        assert r["finish_reason"] in ("eos", "stop", "length", "max_calls")
        assert ("p_code_open" in r) == (r["mode"] == "auto")
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == ["auto", "code", "cot"]
    for m, s in summary.items():
        for key in ("accuracy", "code_rate", "calls_per_problem", "tool_error_rate", "mean_response_tokens", "n",
                    "by_family", "by_level"):
            assert key in s, (m, key)
        assert s["n"] == 3 and sum(c["n"] for c in s["by_family"].values()) == 3
    assert 0 <= summary["auto"]["p_code_open"] <= 1 and "selection_accuracy" in summary["auto"]
    assert json.loads((out / "eval_config.json").read_text())["mode"] == "all"
    assert summary == evaluate.summarize(records)

    # killed mid-way: a partial file with two records (the last cut short) is resumed, not redone
    (out / "summary.json").unlink()
    lines = (out / "eval.jsonl").read_text().splitlines(keepends=True)
    (out / "eval.jsonl").unlink()
    (out / "eval.jsonl.partial").write_text("".join(lines[:2]) + lines[2][:10])
    generated.clear()
    evaluate.main(common + ["--mode=all"])
    assert sum(generated) == 7
    again = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in again) == sorted(r["id"] for r in records)
    generated.clear()
    evaluate.main(common + ["--mode=all"])           # complete: nothing is generated again
    assert generated == []


# -----------------------------------------------------------------------------
# Sampled evaluation: the estimators by hand, then the stage on a tiny random model.

def test_pass_at_k_by_hand():
    # n = 5 solutions, c = 2 correct: pass@1 = c/n; pass@2 = 1 − C(3,2)/C(5,2) = 1 − 3/10; from k = 4 on, any k
    # solutions hold a correct one (only 3 are wrong)
    assert [evaluate.pass_at_k(5, 2, k) for k in range(1, 6)] == pytest.approx([0.4, 0.7, 0.9, 1.0, 1.0])
    assert evaluate.pass_at_k(5, 0, 5) == 0.0 and evaluate.pass_at_k(3, 3, 1) == 1.0


def test_majority_votes_group_equivalent_answers():
    # "1/2", "0.5" and "\frac{1}{2}" are one answer with three votes, against "3"'s two
    answers = ["3", "1/2", "0.5", "\\frac{1}{2}", "3"]
    correct = [False, True, True, True, False]
    # k=1: "3" alone; k=2: a 1-1 tie goes to "3", seen first; k=3..5: the half wins 2-1, 3-1, 3-2
    assert evaluate.majority_votes(answers, correct) == [False, False, True, True, True]
    # no answer casts no vote: the lone "7" wins against two abstentions
    assert evaluate.majority_votes([None, "7", None], [False, True, False]) == [False, True, True]
    assert evaluate.majority_votes([None], [False]) == [False]


def test_mean_interval_is_normal_over_problems():
    mean, (low, high) = evaluate.mean_interval([1.0, 0.5, 0.0, 0.5])
    half = 1.959964 * (0.5 / 3) ** 0.5 / 2          # s = sqrt((0.5² + 0 + 0.5² + 0) / 3), over √4 problems
    assert mean == 0.5 and low == pytest.approx(0.5 - half) and high == pytest.approx(0.5 + half)
    assert evaluate.mean_interval([1.0, 1.0]) == (1.0, [1.0, 1.0])
    assert evaluate.mean_interval([0.3]) == (0.3, [0.0, 1.0])


def sampled(query, mode, outcomes, family="easy", answers=None):
    """The records of one problem in one mode: outcomes is a string of (correct, used code) per sample, as
    'Cc' (right, with code), 'Wt' (wrong, in text)."""
    return [record(query, mode, o[0] == "C", int(o[1] == "c"), family, id=f"{query}:{mode}:{j}", sample=j,
                   answer=(answers or {}).get(j, "1" if o[0] == "C" else f"wrong{j}"))
            for j, o in enumerate(outcomes[i:i + 2] for i in range(0, len(outcomes), 2))]


def test_summarize_sampled_by_hand():
    records = (
        # q1: cot right in 2 of 3 (majority right) -> oracle CoT; auto used code in 1 of 3 samples: 2/3 right choices
        sampled("q1", "code", "CcCcCc") + sampled("q1", "cot", "CtCtWt") + sampled("q1", "auto", "CtCcCt") +
        # q2: cot right in 1 of 3 only, code in 3 -> oracle code; auto coded twice: 2/3
        sampled("q2", "code", "CcCcCc", "hard") + sampled("q2", "cot", "WtCtWt", "hard") +
        sampled("q2", "auto", "CcWtCc", "hard") +
        # q3: neither forced mode right in most samples -> not counted for selection
        sampled("q3", "code", "WcWcCc", "hard") + sampled("q3", "cot", "WtWtWt", "hard") +
        sampled("q3", "auto", "WtWtWt", "hard"))
    summary = evaluate.summarize(records)
    auto, cot = summary["auto"], summary["cot"]
    assert auto["samples"] == 3 and auto["problems"] == 3 and auto["n"] == 9
    assert auto["accuracy"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert auto["code_rate"] == pytest.approx(3 / 9) and auto["calls_per_problem"] == pytest.approx(3 / 9)
    low, high = auto["accuracy_ci95"]
    assert 0 <= low < auto["accuracy"] < high <= 1
    # per problem c = 3, 2, 0 of n = 3: pass@1 = mean(c/n), pass@2 = mean(1, 1, 0), pass@3 = mean(1, 1, 0)
    assert auto["pass_at_k"] == pytest.approx({"1": 5 / 9, "2": 2 / 3, "3": 2 / 3})
    # every wrong answer is different ("wrong0", ...) and every right one is "1": maj@1 = first sample right
    # (1, 0, 0 for q2's first sample is right: 1, 1, 0); maj@2: q2 ties "1" vs "wrong1", the first seen wins
    assert auto["maj_at_k"] == pytest.approx({"1": 2 / 3, "2": 2 / 3, "3": 2 / 3})
    assert cot["pass_at_k"]["1"] == pytest.approx((2 / 3 + 1 / 3 + 0) / 3)
    assert cot["maj_at_k"] == pytest.approx({"1": 1 / 3, "2": 1 / 3, "3": 1 / 3})  # q2: "wrong0" seen first
    assert auto["selection_accuracy"] == pytest.approx(2 / 3) and auto["selection_n"] == 2
    assert auto["oracle_accuracy"] == pytest.approx(2 / 3)
    hard = auto["by_family"]["hard"]
    assert hard["problems"] == 2 and hard["pass_at_k"]["3"] == pytest.approx(0.5)
    assert hard["selection_accuracy"] == pytest.approx(2 / 3) and hard["calls_per_problem"] == pytest.approx(2 / 6)
    assert json.loads(json.dumps(summary)) == summary        # reads back from summary.json as it was


def test_sampled_stage_resumes(tmp_path, monkeypatch):
    monkeypatch.setattr(sandbox, "tool", lambda responses, **limits: [("42", "ok")] * len(responses))
    generated = []
    real_generate = sampler.generate
    monkeypatch.setattr(evaluate, "generate", lambda net, prompts, *a, **k: generated.append(len(prompts)) or
                        real_generate(net, prompts, *a, **k))
    queries_path = tmp_path / "queries.jsonl"
    queries_path.write_text("".join(json.dumps(q) + "\n" for q in task.make_problems(3, "test")))
    out = tmp_path / "eval"
    common = ["--model=tiny", f"--data={queries_path}", f"--out={out}", "--samples=3", "--temperature=0.7",
              "--max_new_tokens=8", "--batch_size=5"]

    summary = evaluate.main(common)
    assert sum(generated) == 3 * 3 * 3
    records = {r["id"]: r for r in map(json.loads, (out / "eval.jsonl").read_text().splitlines())}
    assert len(records) == 27 and all(r["id"] == f"{r['query_id']}:{r['mode']}:{r['sample']}" for r in records.values())
    for s in summary.values():
        assert {"accuracy_ci95", "pass_at_k", "maj_at_k", "samples", "problems"} <= set(s)
        assert list(s["pass_at_k"]) == ["1", "2", "3"] and s["problems"] == 3 and s["samples"] == 3
        assert "pass_at_k" in next(iter(s["by_family"].values()))
    assert json.loads((out / "summary.json").read_text()) == summary

    generated.clear()
    evaluate.main(common)                                # complete: nothing is decoded again
    assert generated == []

    # killed mid-way: the missing solutions are drawn in other batches, and come out the same (seeded per row)
    lines = (out / "eval.jsonl").read_text().splitlines(keepends=True)
    (out / "eval.jsonl").unlink()
    (out / "eval.jsonl.partial").write_text("".join(lines[::2]))
    evaluate.main(common)
    assert sum(generated) == 27 - len(lines[::2])
    again = {r["id"]: r for r in map(json.loads, (out / "eval.jsonl").read_text().splitlines())}
    assert {i: r["response"] for i, r in again.items()} == {i: r["response"] for i, r in records.items()}

    with pytest.raises(SystemExit):                      # other decoding settings: refused, not mixed in
        evaluate.main([a for a in common if not a.startswith("--temperature")] + ["--temperature=1.0"])
    with pytest.raises(SystemExit):
        evaluate.main(common[:3] + ["--samples=2", "--temperature=0"])   # n greedy solutions: one, n times


# -----------------------------------------------------------------------------
# Shards: two processes' parts, merged, are the one-process run.

def assert_close(a, b):
    """Equal, floats up to rounding: the shards batch other rows together (p_code_open comes from a padded batch)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_close(a[key], b[key])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_close(x, y)
    elif isinstance(a, float):
        assert a == pytest.approx(b, abs=1e-4)
    else:
        assert a == b


def test_two_shards_merge_into_the_one_process_run(tiny_checkpoint, tmp_path):
    queries_path = tmp_path / "queries.jsonl"
    queries = task.make_problems(5, "test")
    queries_path.write_text("".join(json.dumps(q) + "\n" for q in queries))
    common = [f"--model={tiny_checkpoint}", f"--data={queries_path}", "--mode=all", "--max_new_tokens=12",
              "--batch_size=4"]
    evaluate.main(common + [f"--out={tmp_path / 'one'}"])
    for i in range(2):
        evaluate.main(common + [f"--out={tmp_path / 'two'}", f"--shard={i}/2"])
    shard1 = [json.loads(line) for line in (tmp_path / "two" / "shard1of2" / "eval.jsonl").read_text().splitlines()]
    assert {r["query_id"] for r in shard1} == {q["id"] for q in queries[1::2]}     # split by problem index

    with pytest.raises(SystemExit, match="never started"):
        evaluate.main([f"--out={tmp_path / 'two'}", "--merge=3"])
    partial = tmp_path / "two" / "shard1of2" / "eval.jsonl.partial"
    (tmp_path / "two" / "shard1of2" / "eval.jsonl").rename(partial)               # shard 1 not finished
    with pytest.raises(SystemExit, match="not finished"):
        evaluate.main([f"--out={tmp_path / 'two'}", "--merge=2"])
    assert not (tmp_path / "two" / "summary.json").exists()
    partial.rename(tmp_path / "two" / "shard1of2" / "eval.jsonl")

    summary = evaluate.main([f"--out={tmp_path / 'two'}", "--merge=2"])
    one, two = ({r["id"]: r for r in map(json.loads, (tmp_path / d / "eval.jsonl").read_text().splitlines())}
                for d in ("one", "two"))
    assert len(two) == 15
    assert_close(two, one)
    assert_close(json.loads((tmp_path / "two" / "summary.json").read_text()),
                 json.loads((tmp_path / "one" / "summary.json").read_text()))
    assert summary == json.loads((tmp_path / "two" / "summary.json").read_text())
    configs = [json.loads((tmp_path / d / "eval_config.json").read_text()) for d in ("two", "one")]
    assert configs[0] == {**configs[1], "out": str(tmp_path / "two")}

"""Tests of evaluate.py: the metrics on hand-computed records, p_code_open against a naive
computation, and the stage end to end on a tiny random checkpoint with a fake tool. The grader's
tests are in tests/test_grade.py."""

import json
import os
import sys
import types

import pytest

import evaluate


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
    model = pytest.importorskip("model")
    path = str(tmp_path_factory.mktemp("tiny") / "ckpt")
    net, tokenizer = model.load("tiny")
    model.save(net, tokenizer, path)
    return path


def test_code_open_probability_matches_naive(tiny_checkpoint):
    import torch
    import data
    import model
    net, tokenizer = model.load(tiny_checkpoint)
    open_ids = tokenizer.encode(evaluate.CODE_OPEN, add_special_tokens=False)
    prompts = [data.encode_prompt(tokenizer, p, "auto") for p in ("What is 2 + 3?", "Compute 123 * 45 now, please.")]
    with torch.inference_mode():
        ours = evaluate.code_open_probability(net, prompts, open_ids)
        for prompt, p in zip(prompts, ours):
            logprobs = torch.log_softmax(net(torch.tensor([prompt + open_ids]))[0].float(), -1)
            naive = sum(logprobs[len(prompt) - 1 + j, t].item() for j, t in enumerate(open_ids))
            assert p == pytest.approx(float(torch.tensor(naive).exp()), rel=1e-4)


def test_stage_end_to_end(tiny_checkpoint, tmp_path, monkeypatch):
    import data
    import model
    try:
        import sandbox
    except ImportError:      # sandbox.py not written yet: the stage only needs sandbox.tool
        sandbox = types.ModuleType("sandbox")
        monkeypatch.setitem(sys.modules, "sandbox", sandbox)
    tool_calls = []

    def fake_tool(responses, **limits):
        tool_calls.append(len(responses))
        return [("42", "ok")] * len(responses)

    monkeypatch.setattr(sandbox, "tool", fake_tool, raising=False)
    generated = []
    real_generate = model.generate
    monkeypatch.setattr(model, "generate", lambda net, prompts, *a, **k: generated.append(len(prompts)) or
                        real_generate(net, prompts, *a, **k))

    queries = data.make_problems(5, "test")
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

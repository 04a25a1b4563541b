"""Bad inputs are refused where they enter, before compute is spent on them, with an error that names the file and the
line (or the record), and no stage writes its output before it has succeeded (em.sh takes an existing OUT for a
finished stage): empty files, duplicate query ids, bytes that are not UTF-8, a query too long for the model's
context, wrongly typed fields, token ids outside the vocabulary, a truncated checkpoint."""
import json
import os
import re

import pytest

import evaluate
import explore
import jsonl
import model
import sampler
import synthesize
import train

CONTEXT = model.TINY_CONFIG["max_position_embeddings"]
VOCAB = model.TINY_CONFIG["vocab_size"]


def write_queries(path, *queries):
    path.write_text("".join(json.dumps(q) + "\n" for q in queries))
    return path


def query(query_id, problem="What is 2 + 3?", answer="5"):
    return {"id": query_id, "problem": problem, "answer": answer}


def listing(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files)


@pytest.fixture
def no_compute(monkeypatch):
    """Neither stage may load a model or run a forward pass for an input refused at reading; the prompt checks, once
    the model is loaded, must come before any forward."""
    def refuse(*args, **kwargs):
        raise AssertionError("compute spent on an input that should have been refused")
    for stage in (explore, evaluate):
        monkeypatch.setattr(stage, "code_open_probability", refuse)
        monkeypatch.setattr(stage, "generate", refuse)
    return refuse


# ----------------------------------------------------------------------------- reading queries (jsonl.py)
def test_a_line_that_is_not_utf8_is_named_by_file_and_line(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_bytes(json.dumps(query("a")).encode() + b'\n{"id": "b", "problem": "caf\xe9 costs?", "answer": "3"}\n')
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: not UTF-8 (byte 0xe9")):
        jsonl.read_queries(str(path))
    path.write_bytes("{\"id\": \"b\", \"problem\": \"café costs 3\", \"answer\": \"3\"}\r\n".encode())
    assert jsonl.read_queries(str(path))[0]["problem"] == "café costs 3"       # UTF-8 and CRLF still read


@pytest.mark.parametrize("text", ["", "\n  \n"])
def test_an_empty_query_file_is_refused_naming_it(tmp_path, text):
    path = tmp_path / "q.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(f"{path}: no queries")):
        jsonl.read_queries(str(path))


def test_duplicate_query_ids_are_refused_naming_both_lines(tmp_path):
    path = write_queries(tmp_path / "q.jsonl", query("a"), query("b"), query("a"))
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: duplicate id 'a' (first on line 1)")):
        jsonl.read_queries(str(path))
    # a missing id is the line number: one that an explicit id already took is a duplicate too
    path = write_queries(tmp_path / "q.jsonl", query("2"), {"problem": "What is 1 + 1?", "answer": "2"})
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: duplicate id '2' (first on line 1)")):
        jsonl.read_queries(str(path))


def test_a_query_keeps_its_origin_for_the_prompt_check(tmp_path):
    path = write_queries(tmp_path / "q.jsonl", query("a"), query("b"))
    b = jsonl.read_queries(str(path))[1]
    jsonl.check_prompt_fits(b, "auto", [1] * (CONTEXT - 1), CONTEXT)              # room for one new token: accepted
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: query 'b': its auto prompt is {CONTEXT} tokens")):
        jsonl.check_prompt_fits(b, "auto", [1] * CONTEXT, CONTEXT)


# ----------------------------------------------------------------------------- explore.py and evaluate.py
BAD_QUERY_FILES = {   # name: (file content, what the error says)
    "empty": (b"", r"q\.jsonl: no queries"),
    "duplicate": ((json.dumps(query("a")) + "\n" + json.dumps(query("a")) + "\n").encode(),
                  r"q\.jsonl:2: duplicate id 'a' \(first on line 1\)"),
    "not_utf8": (b'{"id": "a", "problem": "\xff", "answer": "1"}\n', r"q\.jsonl:1: not UTF-8"),
}


def run_stage(stage, queries, out, *extra):
    if stage == "explore":
        explore.main(["--model=tiny", f"--queries={queries}", f"--out={out / 'rollouts.jsonl'}", "--k=1",
                      "--max_new_tokens=4", "--threads=1", *extra])
    else:
        evaluate.main(["--model=tiny", f"--data={queries}", f"--out={out / 'eval'}", "--max_new_tokens=4", *extra])


@pytest.mark.parametrize("stage", ["explore", "evaluate"])
@pytest.mark.parametrize("bad", list(BAD_QUERY_FILES))
def test_a_bad_query_file_is_refused_before_loading_or_writing(tmp_path, monkeypatch, no_compute, stage, bad):
    content, error = BAD_QUERY_FILES[bad]
    (tmp_path / "q.jsonl").write_bytes(content)
    monkeypatch.setattr(explore, "load", no_compute)
    monkeypatch.setattr(evaluate, "load", no_compute)
    with pytest.raises(ValueError, match=error):
        run_stage(stage, tmp_path / "q.jsonl", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("stage", ["explore", "evaluate"])
def test_a_query_too_long_for_the_context_is_refused_before_any_forward(tmp_path, no_compute, stage):
    # about 10 tokens a repeat in the tiny tokenizer: several times the context of 384
    big = query("big", problem="What is 12 + 34? " * 200, answer="46")
    path = write_queries(tmp_path / "q.jsonl", query("a"), big, query("c"))
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: query 'big': its ") + r"\w+ prompt is \d+ tokens, "
                       + re.escape(f"and the model's context of {CONTEXT} leaves no room")):
        run_stage(stage, path, tmp_path / "out")
    assert not (tmp_path / "out").exists()              # no config, no partial file: nothing was written


def test_code_open_probability_checks_the_context_before_its_forward():
    net, tokenizer = model.load("tiny")
    with pytest.raises(ValueError, match=f"code_open_probability: prompt 1 has {CONTEXT + 1} tokens"):
        sampler.code_open_probability(net, tokenizer, [[5, 6], [5] * (CONTEXT + 1)])


# ----------------------------------------------------------------------------- synthesize.py
def rollout(query_id, mode, k, correct, **fields):
    return {"id": f"{query_id}:{mode}:{k}", "query_id": query_id, "mode": mode, "k": k, "family": "mul",
            "prompt_ids": [5, 6], "auto_prompt_ids": [7, 7], "response_ids": [10, 11, 0], "sampled_mask": [1, 1, 1],
            "behaviour_logprobs": [-0.5, -0.5, -0.5], "calls": 0, "correct": correct, "finish_reason": "eos",
            "temperature": 0.5, "top_p": 1.0, "top_k": 0, **fields}


def test_an_empty_rollouts_file_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "rollouts.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'rollouts.jsonl'}: no rollouts")):
        synthesize.main([f"--rollouts={tmp_path / 'rollouts.jsonl'}", f"--out={tmp_path / 'train.jsonl'}"])
    assert listing(tmp_path) == ["rollouts.jsonl"]


def test_out_is_written_after_success_summary_first(tmp_path, monkeypatch, capsys):
    rollouts = [rollout("q", mode, k, mode == "code") for mode in ("code", "cot", "auto") for k in range(2)]
    path = tmp_path / "rollouts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rollouts))
    args = [f"--rollouts={path}", f"--out={tmp_path / 'train.jsonl'}"]
    real_table = synthesize.format_table
    monkeypatch.setattr(synthesize, "format_table", lambda summary: 1 / 0)     # a failure after the E-step
    with pytest.raises(ZeroDivisionError):
        synthesize.main(args)
    assert listing(tmp_path) == ["rollouts.jsonl"]
    monkeypatch.setattr(synthesize, "format_table", real_table)
    written = []
    for name in ("write_json_atomic", "write_jsonl_atomic"):
        real = getattr(synthesize, name)
        monkeypatch.setattr(synthesize, name, lambda p, obj, real=real: written.append(p) or real(p, obj))
    synthesize.main(args)
    assert written == [f"{tmp_path / 'train.jsonl'}.summary.json", str(tmp_path / "train.jsonl")]   # OUT last
    assert len((tmp_path / "train.jsonl").read_text().splitlines()) == 2


def test_zero_training_records_from_rollouts_is_a_result_not_an_error(tmp_path, capsys):
    # every group all wrong: nothing to learn, and train.py then saves the model unchanged
    rollouts = [rollout(q, mode, k, False) for q in ("q", "r") for mode in ("code", "cot", "auto") for k in range(2)]
    path = tmp_path / "rollouts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rollouts))
    synthesize.main([f"--rollouts={path}", f"--out={tmp_path / 'train.jsonl'}"])
    assert (tmp_path / "train.jsonl").read_text() == ""
    summary = json.loads((tmp_path / "train.jsonl.summary.json").read_text())
    assert summary["by_family"]["all"]["examples"] == 0 and summary["by_family"]["all"]["queries_unsolved"] == 2
    assert "wrote 0 training records" in capsys.readouterr().out


@pytest.mark.parametrize("field, value, error", [
    ("correct", "false", "'correct' must be true or false"),          # a non-empty string: true in Python
    ("correct", 1, "'correct' must be true or false"),
    ("calls", "1", "'calls' must be an integer >= 0"),
    ("calls", -1, "'calls' must be an integer >= 0"),
    ("response_ids", [10, "11", 0], "'response_ids' must be a list of integer token ids"),
    ("response_ids", [10, 11.0, 0], "'response_ids' must be a list of integer token ids"),
    ("response_ids", "10 11 0", "'response_ids' must be a list of integer token ids"),
    ("sampled_mask", [1, 2, 1], "'sampled_mask' must be a list of 0/1"),
    ("behaviour_logprobs", [-0.5, "x", -0.5], "'behaviour_logprobs' must be a list of finite numbers"),
    ("behaviour_logprobs", [-0.5, float("nan"), -0.5], "'behaviour_logprobs' must be a list of finite numbers"),
    ("auto_prompt_ids", [7, None], "'auto_prompt_ids' must be a list of integer token ids"),
    ("p_code_open", 1.5, "'p_code_open' must be a number in \\[0, 1\\]"),
    ("sampled_mask", [1, 1], "differ in length"),
    ("behaviour_logprobs", [-0.5], "differ in length"),
])
def test_rollout_fields_of_the_wrong_kind_are_named(tmp_path, field, value, error):
    path = tmp_path / "rollouts.jsonl"
    bad = {**rollout("q", "cot", 0, True), field: value}
    path.write_text(json.dumps(rollout("q", "code", 0, True)) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: ") + ".*" + error):
        synthesize.read_rollouts(str(path))


# ----------------------------------------------------------------------------- train.py
def training_record(i, **fields):
    return {"id": f"r{i}", "prompt_ids": [3, 4, 5], "response_ids": [6, 7], "trainable_mask": [1, 1],
            "behaviour_logprobs": [-1.0, -1.0], "advantage": 1.0, "sft": True, "temperature": 1.0, "top_p": 1.0,
            "top_k": 0, **fields}


@pytest.mark.parametrize("field, ids, bad", [("response_ids", [6, VOCAB], VOCAB), ("prompt_ids", [-1, 4], -1)])
def test_token_ids_outside_the_vocabulary_are_refused_before_training(tmp_path, monkeypatch, field, ids, bad):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(training_record(0)) + "\n" + json.dumps(training_record(1, **{field: ids})) + "\n")
    monkeypatch.setattr(train, "m_step_loss", lambda *a, **k: pytest.fail("trained on an out-of-vocabulary id"))
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: record 'r1': {field} holds token id {bad}, outside "
                                                   f"the model's vocabulary of {VOCAB}")):
        train.main(["--device=cpu", "--mode=rl", f"--data={path}", f"--out={tmp_path / 'out'}"])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mode, field, value, error", [
    ("rl", "advantage", "x", "'advantage' must be a finite number"),
    ("rl", "advantage", float("inf"), "'advantage' must be a finite number"),
    ("rl", "sft", "true", "'sft' must be true or false"),
    ("rl", "advantage", None, "'advantage' must be a finite number"),      # the RL objective needs it
    ("sft", "advantage", "x", "'advantage' must be a finite number"),      # optional in SFT, but typed when given
    ("sft", "response_ids", [6, [7]], "'response_ids' must be a list of integer token ids"),
    ("sft", "trainable_mask", [1, 1, 1], "differ in length"),
    ("sft", "behaviour_logprobs", [-1.0, "-1"], "'behaviour_logprobs' must be a list of finite numbers"),
    ("sft", "temperature", "1.0", "'temperature' must be a finite number"),
])
def test_training_record_fields_of_the_wrong_kind_are_named(tmp_path, mode, field, value, error):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(training_record(0)) + "\n" + json.dumps(training_record(1, **{field: value})) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: record 'r1': ") + ".*" + error):
        train.read_records(str(path), mode, VOCAB)


def test_sft_records_may_leave_out_advantage_and_sft(tmp_path):
    record = training_record(0)
    del record["advantage"], record["sft"]
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(record) + "\n")
    lines = train.read_records(str(path), "sft", VOCAB)
    assert [e["input_ids"] for e in train.record_examples([r for _, r in lines], "sft")] == [[3, 4, 5, 6, 7]]
    with pytest.raises(ValueError, match=re.escape(f"{path}:1: record 'r0': lacks advantage, sft")):
        train.read_records(str(path), "rl", VOCAB)


# ----------------------------------------------------------------------------- model.load (model.py)
def test_a_truncated_checkpoint_is_refused_naming_the_file(tmp_path):
    net, tokenizer = model.load("tiny")
    model.save(net, tokenizer, str(tmp_path / "ckpt"))
    weights = tmp_path / "ckpt" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2])                          # an interrupted copy
    with pytest.raises(Exception, match=re.escape(str(weights)) + r".*(truncated|incomplete|cut short)"):
        model.load(str(tmp_path / "ckpt"))

"""explore.py end to end on a tiny random checkpoint: every (query, mode, k) drawn once with the contract's
fields; a killed run resumed draws only what is missing and reproduces what an uninterrupted run draws;
the code-opening probability against a naive computation; the per-mode summary on hand-built records."""
import json

import pytest
import torch

import explore
import jsonl
import model
import sampler
import task

K, N_QUERIES, MODES = 2, 6, ("code", "cot", "auto")
TOTAL = N_QUERIES * len(MODES) * K


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("explore")
    net, tokenizer = model.load("tiny", seed=0)
    model.save(net, tokenizer, str(root / "tiny"))
    queries = root / "queries.jsonl"
    queries.write_text("".join(json.dumps(q) + "\n" for q in task.make_problems(N_QUERIES, "train", seed=3)))
    return root


def explore_args(root, out, *extra):
    # batch_size 10 is not a multiple of 3K = 6: batches cut queries in two, as resumed runs do
    return [f"--model={root / 'tiny'}", f"--queries={root / 'queries.jsonl'}", f"--out={out}", f"--k={K}",
            "--max_new_tokens=24", "--batch_size=10", "--seed=5", "--threads=1", "--temperature=0.8", *extra]


def read(path):
    return [json.loads(line) for line in open(path)]


@pytest.fixture(scope="module")
def full_run(setup):
    out = setup / "full" / "rollouts.jsonl"
    explore.main(explore_args(setup, out))
    return out


def test_every_rollout_once_with_the_contract_fields(setup, full_run):
    records = read(full_run)
    assert len(records) == TOTAL and len({r["id"] for r in records}) == TOTAL
    _, tokenizer = model.load(str(setup / "tiny"))
    queries = {q["id"]: q for q in jsonl.read_queries(str(setup / "queries.jsonl"))}
    for r in records:
        assert r["id"] == f"{r['query_id']}:{r['mode']}:{r['k']}"
        problem = queries[r["query_id"]]["problem"]
        assert r["prompt"] == task.make_prompt(tokenizer, problem, r["mode"])
        assert r["prompt_ids"] == task.encode_prompt(tokenizer, problem, r["mode"])
        assert r["auto_prompt_ids"] == task.encode_prompt(tokenizer, problem, "auto")
        assert len(r["response_ids"]) == len(r["sampled_mask"]) == len(r["behaviour_logprobs"]) <= 24
        assert r["gold"] == queries[r["query_id"]]["answer"] and r["family"] == queries[r["query_id"]]["family"]
        assert isinstance(r["correct"], bool) and r["calls"] == len(r["statuses"])
        assert r["finish_reason"] in ("eos", "stop", "length", "max_calls")
        assert 0.0 < r["p_code_open"] < 1.0
        assert all(lp <= 0.0 for lp in r["behaviour_logprobs"])
        assert (r["temperature"], r["top_p"], r["top_k"]) == (0.8, 1.0, 0)   # π_b, for train.py's ratio
    assert {(r["query_id"], r["mode"], r["k"]) for r in records} == \
        {(q, m, j) for q in queries for m in MODES for j in range(K)}
    assert not (full_run.parent / "rollouts.jsonl.partial").exists()
    config = json.loads((full_run.parent / "rollouts.jsonl.config.json").read_text())
    assert config["k"] == K and config["seed"] == 5 and config["modes"] == "code,cot,auto"
    assert config["dtype"] == ("bf16" if torch.cuda.is_available() else "fp32")   # auto, resolved before saving
    summary = json.loads((full_run.parent / "rollouts.jsonl.summary.json").read_text())
    assert set(MODES) <= set(summary) and summary["auto"]["rollouts"] == N_QUERIES * K


def test_resume_after_a_kill_draws_only_the_missing_rows_and_reproduces(setup, full_run, monkeypatch):
    lines = open(full_run).read().splitlines(keepends=True)
    out = setup / "resumed" / "rollouts.jsonl"
    out.parent.mkdir()
    # killed mid-write: 13 complete records (lines of different modes and queries), then half a line
    (out.parent / "rollouts.jsonl.partial").write_text("".join(lines[:13]) + lines[13][:40])
    drawn = []
    real_generate = sampler.generate

    def counting_generate(net, prompts, *args, **kwargs):
        drawn.extend(kwargs["seed"])
        return real_generate(net, prompts, *args, **kwargs)

    monkeypatch.setattr(explore, "generate", counting_generate)
    explore.main(explore_args(setup, out))
    assert len(drawn) == TOTAL - 13                            # nothing redrawn
    resumed = read(out)
    ids = [r["id"] for r in resumed]
    assert len(ids) == len(set(ids)) == TOTAL                  # nothing lost, nothing duplicated
    reference = {r["id"]: r for r in read(full_run)}
    # per-row seeds: the resumed file holds exactly the rollouts of the uninterrupted run
    for r in resumed:
        assert r["response_ids"] == reference[r["id"]]["response_ids"]
        assert r["behaviour_logprobs"] == pytest.approx(reference[r["id"]]["behaviour_logprobs"], abs=1e-4)

    # a complete OUT means done: a rerun draws nothing and leaves it alone
    drawn.clear()
    before = out.read_text()
    explore.main(explore_args(setup, out))
    assert drawn == [] and out.read_text() == before


def test_row_seeds_depend_only_on_seed_query_mode_and_k():
    seed = explore.row_seed(0, "q1", "code", 3)
    assert seed == explore.row_seed(0, "q1", "code", 3) and 0 <= seed < 2**32
    assert len({seed, explore.row_seed(1, "q1", "code", 3), explore.row_seed(0, "q2", "code", 3),
                explore.row_seed(0, "q1", "cot", 3), explore.row_seed(0, "q1", "code", 2)}) == 5


def test_summary_per_mode_by_hand():
    def r(query, mode, correct, statuses):
        return {"query_id": query, "mode": mode, "correct": correct, "calls": len(statuses), "statuses": statuses,
                "response_ids": [1, 2], "finish_reason": "eos"}
    records = [r("a", "code", True, ["ok"]), r("a", "code", True, ["ok", "error"]),
               r("b", "code", False, ["timeout"]), r("b", "code", True, []),
               r("a", "cot", False, []), r("a", "cot", False, [])]
    summary = explore.summarize(records, ("code", "cot", "auto"))
    assert set(summary) == {"code", "cot"}
    code = summary["code"]
    assert code["accuracy"] == 0.75 and code["code_rate"] == 0.75 and code["tool_error_rate"] == 0.5
    assert (code["groups"], code["groups_all_correct"], code["groups_all_wrong"]) == (2, 1, 0)
    assert (summary["cot"]["groups_all_correct"], summary["cot"]["groups_all_wrong"]) == (0, 1)
    assert "code rate" in explore.format_summary(summary)


def test_bad_arguments_are_refused(setup, tmp_path):
    with pytest.raises(SystemExit):
        explore.parse_args(explore_args(setup, tmp_path / "x.jsonl", "--modes=code,autonomous"))
    with pytest.raises(SystemExit):
        explore.parse_args(explore_args(setup, tmp_path / "x.jsonl", "--temperature=0"))


def test_cached_tool_runs_each_distinct_program_once(monkeypatch):
    ran = []

    def fake_tool(responses, timeout, memory_mb, workers):
        ran.extend(responses)
        return [("boom", "sandbox_error") if "fail" in text else (f"out{len(ran) - len(responses) + i}", "ok")
                for i, text in enumerate(responses)]

    monkeypatch.setattr(explore.sandbox, "tool", fake_tool)
    tool = explore.cached_tool(5.0, 1024, None)
    a, b = "```python\nprint(1)\n```\n```output", "```python\nprint(2)\n```\n```output"
    same_as_a = "Some text first.\n" + a                      # another response, the same program
    first = tool([a, b, same_as_a])
    assert first[0] == first[2] and first[0] != first[1] and len(ran) == 2
    assert tool([b, a]) == [first[1], first[0]] and len(ran) == 2          # remembered
    failing = "```python\nfail()\n```\n```output"
    assert tool([failing]) == [("boom", "sandbox_error")] and tool([failing])[0][1] == "sandbox_error"
    assert len(ran) == 4                                                   # an infrastructure failure is retried
    assert tool.counts == {"executed": 4, "remembered": 3}


def test_a_partial_file_is_not_resumed_under_other_sampling_settings(setup, full_run, tmp_path):
    out = tmp_path / "rollouts.jsonl"
    (tmp_path / "rollouts.jsonl.partial").write_text(open(full_run).readline())
    (tmp_path / "rollouts.jsonl.config.json").write_text((full_run.parent / "rollouts.jsonl.config.json").read_text())
    with pytest.raises(SystemExit, match="temperature"):
        explore.main(explore_args(setup, out, "--temperature=0.7"))


# ----------------------------------------------------------------------------- shards
@pytest.fixture(scope="module")
def two_shards(setup):
    out = setup / "shards" / "rollouts.jsonl"
    for i in range(2):
        explore.main(explore_args(setup, out, f"--shard={i}/2"))
    return out


def test_two_shards_merge_into_what_one_process_draws(setup, full_run, two_shards):
    queries = [q["id"] for q in jsonl.read_queries(str(setup / "queries.jsonl"))]
    for i in range(2):      # split by query index: every query's rollouts in one shard
        assert {r["query_id"] for r in read(f"{two_shards}.shard{i}of2")} == set(queries[i::2])
    assert not two_shards.exists()
    explore.main([f"--out={two_shards}", "--merge=2"])
    merged, reference = read(two_shards), read(full_run)
    assert [r["id"] for r in merged] == [r["id"] for r in reference]       # in query order, as one process writes
    # The shards batch other rows together, and the sampler's float arithmetic depends slightly on the batch:
    # tokens, masks, calls and answers are the same, the log-probs equal up to rounding.
    floats = ("behaviour_logprobs", "p_code_open")
    for m, r in zip(merged, reference):
        assert {k: v for k, v in m.items() if k not in floats} == {k: v for k, v in r.items() if k not in floats}
        assert m["behaviour_logprobs"] == pytest.approx(r["behaviour_logprobs"], abs=1e-4)
        assert m["p_code_open"] == pytest.approx(r["p_code_open"], abs=1e-4)
    summaries = [json.loads(open(f"{path}.summary.json").read()) for path in (two_shards, full_run)]
    for s in summaries:     # the time and the memo's counts are the shards' own
        del s["seconds_this_run"], s["tool_executions_this_run"]
    assert summaries[0] == summaries[1]
    configs = [json.loads(open(f"{path}.config.json").read()) for path in (two_shards, full_run)]
    assert configs[0] == {**configs[1], "out": str(two_shards)}


def test_merge_refuses_an_incomplete_or_mixed_shard_set(setup, two_shards, tmp_path):
    out = tmp_path / "rollouts.jsonl"
    merge = [f"--out={out}", "--merge=2"]

    def shard(i, suffix=""):
        return tmp_path / f"rollouts.jsonl.shard{i}of2{suffix}"

    def copy(i, suffix=""):
        shard(i, suffix).write_text(open(f"{two_shards}.shard{i}of2{suffix}").read())

    for suffix in ("", ".config.json", ".summary.json"):
        copy(0, suffix)
    with pytest.raises(SystemExit, match="never started"):
        explore.main(merge)
    copy(1, ".config.json")
    lines = open(f"{two_shards}.shard1of2").readlines()
    shard(1, ".partial").write_text("".join(lines[:3]))                   # shard 1 still running, or killed
    with pytest.raises(SystemExit, match="not finished"):
        explore.main(merge)
    shard(1).write_text("".join(lines[:-1]))                              # a finished file short of a record
    with pytest.raises(SystemExit, match="missing"):
        explore.main(merge)
    shard(1).write_text("".join(lines) + open(shard(0)).readline())       # a record of shard 0's queries
    with pytest.raises(SystemExit, match="belongs to shard 0"):
        explore.main(merge)
    assert not out.exists()
    shard(1).write_text("".join(lines))
    copy(1, ".summary.json")
    explore.main(merge)
    assert len(read(out)) == TOTAL

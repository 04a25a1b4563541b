"""synthesize.py on hand-computed examples: Q, π, the three forms of s*, advantages, the zero-variance
groups, guidance stripping (sampling settings carried), the three strategies (RL-only: no λ term, M records
per query), self-reflection, and malformed input."""
import json
import math
import random

import pytest

import synthesize
import task

AUTO_IDS = [7, 7, 7]                                 # the autonomous prompt of every query here
GUIDED_IDS = {"code": [5, 5], "cot": [6, 6, 6, 6], "auto": AUTO_IDS}


def rollout(query_id, mode, k, correct, calls=0, family="mul", finish_reason="eos"):
    # response: 2 sampled tokens, 1 injected (tool output) token when it called code, then EOS (sampled)
    response_ids = [10 + k, 11] + ([99] if calls else []) + [0]
    sampled_mask = [1, 1] + ([0] if calls else []) + [1]
    return {"id": f"{query_id}:{mode}:{k}", "query_id": query_id, "mode": mode, "k": k, "family": family,
            "prompt_ids": GUIDED_IDS[mode], "auto_prompt_ids": AUTO_IDS,
            "response_ids": response_ids, "sampled_mask": sampled_mask,
            "behaviour_logprobs": [-0.5 if m else 0.0 for m in sampled_mask],
            "calls": calls, "correct": bool(correct), "finish_reason": finish_reason,
            "temperature": 0.5, "top_p": 0.9, "top_k": 0}


def query(query_id, code, cot, native_calls, family="mul", code_calls=1):
    """Rollouts of one query: code/cot are the correctness of the K guided rollouts of each mode,
    native_calls the calls of the K autonomous ones (all correct)."""
    return ([rollout(query_id, "code", k, c, calls=code_calls, family=family) for k, c in enumerate(code)]
            + [rollout(query_id, "cot", k, c, family=family) for k, c in enumerate(cot)]
            + [rollout(query_id, "auto", k, True, calls=n, family=family) for k, n in enumerate(native_calls)])


def run(rollouts, strategy="em", form="argmax", alpha=10.0, code_cost=0.05, m=4, reflect=0, hint_ids=None):
    return synthesize.synthesize_query(rollouts, strategy, form, alpha, code_cost, "samples", 1.0, m, 1e-6,
                              random.Random(0), reflect, hint_ids)


# --------------------------------------------------------------------------- Q and π
def test_q_is_mean_reward_minus_code_cost_per_call():
    pool = [rollout("q", "code", k, c, calls=n) for k, (c, n) in enumerate([(1, 1), (1, 1), (1, 2), (0, 1)])]
    assert synthesize.estimate_q(pool, 0.05) == pytest.approx((3 - 0.05 * 5) / 4)   # 0.6875
    assert synthesize.estimate_q(pool, 0.0) == pytest.approx(0.75)
    cot_pool = [rollout("q", "cot", k, c) for k, c in enumerate([1, 0, 1, 1])]
    assert synthesize.estimate_q(cot_pool, 0.05) == pytest.approx(0.75)               # no call, no cost


def test_pi_is_smoothed_share_of_native_rollouts_that_ran_code():
    never = [rollout("q", "auto", k, 1, calls=0) for k in range(4)]
    always = [rollout("q", "auto", k, 1, calls=1) for k in range(4)]
    once = never[:3] + always[:1]
    assert synthesize.estimate_pi(never, 1.0)["code"] == pytest.approx(1 / 6)        # (0+1)/(4+2), never 0
    assert synthesize.estimate_pi(always, 1.0)["code"] == pytest.approx(5 / 6)
    assert synthesize.estimate_pi(once, 0.0) == pytest.approx({"code": 0.25, "cot": 0.75})
    assert synthesize.estimate_pi([], 1.0)["code"] == 0.5                              # no autonomous rollouts: the prior
    with pytest.raises(ValueError):
        synthesize.estimate_pi([], 0.0)


# --------------------------------------------------------------------------- s* in its three forms
def test_reference_strategy_three_forms_by_hand():
    pi = {"code": 1 / 6, "cot": 5 / 6}
    q = {"code": 0.95, "cot": 0.25}           # π·Q: code 0.158333, cot 0.208333
    assert synthesize.reference_strategy(pi, q, "posterior", 10)["code"] == pytest.approx(0.95 / 2.2)
    assert synthesize.reference_strategy(pi, q, "tempered", 10)["code"] == pytest.approx(1 / (1 + math.exp(0.5)))
    assert synthesize.reference_strategy(pi, q, "argmax", 10) == {"code": 0.0, "cot": 1.0}
    q = {"code": 0.95, "cot": 0.0}            # CoT never works: every form sends x to code
    assert synthesize.reference_strategy(pi, q, "posterior", 10)["code"] == 1.0
    assert synthesize.reference_strategy(pi, q, "tempered", 10)["code"] == pytest.approx(1 / (1 + math.exp(-0.95 * 10 / 6)))
    assert synthesize.reference_strategy(pi, q, "argmax", 10)["code"] == 1.0
    for f in synthesize.FORMS:
        s = synthesize.reference_strategy(pi, {"code": 0.4, "cot": 0.9}, f, 3.0)
        assert s["code"] + s["cot"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        synthesize.reference_strategy(pi, q, "softmax", 10)


def test_ties_prefer_cot_through_the_code_cost_and_never_a_coin_flip():
    pi = {"code": 0.5, "cot": 0.5}
    # Both methods always right, code pays 0.05 per call: Q(code) = 0.95 < Q(cot) = 1.
    q = {"code": 0.95, "cot": 1.0}
    assert synthesize.reference_strategy(pi, q, "posterior", 10)["code"] == pytest.approx(0.95 / 1.95)
    assert synthesize.reference_strategy(pi, q, "tempered", 10)["code"] == pytest.approx(1 / (1 + math.exp(0.25)))
    assert synthesize.reference_strategy(pi, q, "argmax", 10)["code"] == 0.0
    # An exact tie (no cost): the argmax still picks CoT, deterministically; the posterior is the posterior.
    q = {"code": 1.0, "cot": 1.0}
    assert synthesize.reference_strategy(pi, q, "argmax", 10)["code"] == 0.0
    assert synthesize.reference_strategy(pi, q, "posterior", 10)["code"] == 0.5
    assert synthesize.reference_strategy(pi, {"code": 0.0, "cot": 0.0}, "posterior", 10)["code"] == 0.0
    # Through a whole query: equal accuracy, equal propensity -> the argmax trains CoT only.
    res = run(query("q", [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]), form="argmax")
    assert {r["source_mode"] for r in res.records} == {"cot"}


# --------------------------------------------------------------------------- advantages and groups
def test_whitened_advantages_by_hand():
    assert synthesize.whiten([1, 1, 0, 0], 0.0) == pytest.approx([1, 1, -1, -1])
    std = math.sqrt(0.1875)
    assert synthesize.whiten([1, 0, 0, 0], 0.0) == pytest.approx([0.75 / std, -0.25 / std, -0.25 / std, -0.25 / std])
    assert synthesize.whiten([1, 1, 1], 1e-6) == [0.0, 0.0, 0.0]
    assert synthesize.whiten([0, 0], 1e-6) == [0.0, 0.0]


def test_mixed_group_on_a_hard_query():
    # CoT never works, code 3 of 4: argmax sends all M=4 draws to the code pool.
    res = run(query("q", [1, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]), form="argmax")
    assert res.group == "mixed" and len(res.records) == 4
    by_id = {r["id"]: r for r in res.records}
    std = math.sqrt(0.1875)
    assert by_id["q:code:0"]["advantage"] == pytest.approx(0.25 / std, rel=1e-5)
    assert by_id["q:code:3"]["advantage"] == pytest.approx(-0.75 / std, rel=1e-5)
    assert [by_id[f"q:code:{k}"]["sft"] for k in range(4)] == [True, True, True, False]
    assert res.s_star_code["argmax"] == 1.0 and res.pi_code == pytest.approx(1 / 6)
    assert res.autonomous_code == 0.0


def test_all_correct_group_keeps_its_samples_for_the_likelihood_term():
    res = run(query("q", [1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]), form="argmax")
    assert res.group == "all_correct" and len(res.records) == 4
    assert all(r["advantage"] == 0.0 and r["sft"] and r["reward"] == 1.0 for r in res.records)


def test_all_wrong_is_dropped_and_counted():
    res = run(query("q", [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]))
    assert res.group == "unsolved" and res.records == [] and res.s_star_code == {}
    rollouts = [rollout("q", "auto", k, 0) for k in range(4)]
    res = run(rollouts, strategy="rl")
    assert res.group == "all_wrong" and res.records == []


# --------------------------------------------------------------------------- guidance stripping
def test_guidance_is_stripped_but_behaviour_logprobs_kept():
    rollouts = query("q", [1, 1, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0])
    res = run(rollouts, form="argmax")
    source = {r["id"]: r for r in rollouts}
    for record in res.records:
        guided = source[record["id"]]
        assert record["prompt_ids"] == AUTO_IDS != guided["prompt_ids"]      # the autonomous prompt
        assert record["response_ids"] == guided["response_ids"]
        assert record["behaviour_logprobs"] == guided["behaviour_logprobs"]  # from the guided prompt
        assert record["trainable_mask"] == [1, 1, 0, 1]                       # tool output masked
        assert record["method"] == "code" and record["source_mode"] == "code"
        assert len(record["behaviour_logprobs"]) == len(record["response_ids"])
        # the distribution behaviour_logprobs are log-probs of, for train.py's ratio
        assert (record["temperature"], record["top_p"], record["top_k"]) == (0.5, 0.9, 0)


# --------------------------------------------------------------------------- strategies
def test_rl_strategy_uses_native_rollouts_only():
    rollouts = query("q", [1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 0])
    for r, ok in zip(rollouts[8:], [1, 0, 0, 0]):
        r["correct"] = bool(ok)
    res = run(rollouts, strategy="rl")
    assert [r["source_mode"] for r in res.records] == ["auto"] * 4
    assert [r["prompt_ids"] for r in res.records] == [AUTO_IDS] * 4
    std = math.sqrt(0.1875)
    assert [r["advantage"] for r in res.records] == pytest.approx([0.75 / std] + [-0.25 / std] * 3, rel=1e-5)
    assert [r["method"] for r in res.records] == ["cot", "cot", "code", "cot"]
    assert not any(r["sft"] for r in res.records)              # RL-only has no λ term, correct or not


def test_sft_strategy_keeps_correct_samples_only_with_zero_advantage():
    res = run(query("q", [1, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]), strategy="sft", form="argmax")
    assert sorted(r["id"] for r in res.records) == ["q:code:0", "q:code:2"]
    assert all(r["advantage"] == 0.0 and r["sft"] for r in res.records)


def test_subsampling_follows_s_star_and_is_reproducible():
    pools = {"code": [rollout("q", "code", k, 1, calls=1) for k in range(4)],
             "cot": [rollout("q", "cot", k, 1) for k in range(4)]}
    rng = random.Random(1)
    draws = [synthesize.subsample(pools, {"code": 0.25, "cot": 0.75}, 4, rng) for _ in range(2000)]
    assert all(len(d) == 4 and len({r["id"] for r in d}) == 4 for d in draws)   # no duplicates
    code_share = sum(r["mode"] == "code" for d in draws for r in d) / 8000
    assert abs(code_share - 0.25) < 0.02                                        # E[n_code] = M·s*(code)
    one = synthesize.subsample(pools, {"code": 0.3, "cot": 0.7}, 4, random.Random("0:q"))
    assert one == synthesize.subsample(pools, {"code": 0.3, "cot": 0.7}, 4, random.Random("0:q"))
    assert {r["mode"] for r in synthesize.subsample(pools, {"code": 1.0, "cot": 0.0}, 4, rng)} == {"code"}


def test_self_reflective_example_masks_failed_attempt_and_hint():
    rollouts = query("q", [1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0])
    hint_ids = {"code": [42, 43], "cot": [44]}
    res = run(rollouts, form="argmax", reflect=1, hint_ids=hint_ids)
    reflective = [r for r in res.records if r["source_mode"] == "reflect"]
    assert len(reflective) == 1
    r = reflective[0]
    failed = next(x for x in rollouts if r["id"].startswith(f"q:reflect:{x['id']}>"))
    success = next(x for x in rollouts if r["id"].endswith(f">{x['id']}"))
    assert failed["mode"] == "cot" and success["mode"] == "code"
    failed_ids = failed["response_ids"][:-1]                           # its EOS removed
    assert r["response_ids"] == failed_ids + [42, 43] + success["response_ids"]
    assert r["trainable_mask"] == [0] * (len(failed_ids) + 2) + success["sampled_mask"]
    assert r["behaviour_logprobs"] == [0.0] * (len(failed_ids) + 2) + success["behaviour_logprobs"]
    assert r["prompt_ids"] == AUTO_IDS and r["sft"] and r["advantage"] == 0.0 and r["method"] == "code"
    assert (r["temperature"], r["top_p"], r["top_k"]) == (0.5, 0.9, 0)   # the successful rollout's


# --------------------------------------------------------------------------- input and the stage
def test_malformed_lines_are_named_with_file_and_line(tmp_path):
    path = tmp_path / "rollouts.jsonl"
    good = json.dumps(rollout("q", "code", 0, 1, calls=1))
    path.write_text(good + "\n{not json\n")
    with pytest.raises(ValueError, match=f"{path}:2"):
        synthesize.read_rollouts(str(path))
    bad = rollout("q", "cot", 0, 1)
    del bad["correct"]
    path.write_text(good + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match=f"{path}:3: .*correct"):
        synthesize.read_rollouts(str(path))
    bad = rollout("q", "cot", 0, 1)
    del bad["auto_prompt_ids"]
    path.write_text(json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match=f"{path}:1: .*auto_prompt_ids"):
        synthesize.read_rollouts(str(path))
    path.write_text(good + "\n" + good + "\n")
    with pytest.raises(ValueError, match=f"{path}:2: duplicate"):
        synthesize.read_rollouts(str(path))


def test_stage_end_to_end_summary_by_family(tmp_path, capsys):
    rollouts = []
    for i in range(3):   # easy: both methods always right, the model codes 1 time in 4
        rollouts += query(f"e{i}", [1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0], family="easy")
    for i in range(3):   # hard: only code works
        rollouts += query(f"h{i}", [1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0], family="hard")
    rollouts += query("u", [0, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0], family="hard")
    path = tmp_path / "rollouts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rollouts))
    out = tmp_path / "train.jsonl"
    synthesize.main([f"--rollouts={path}", f"--out={out}", "--form=argmax"])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 24 and not (tmp_path / "train.jsonl.partial").exists()
    summary = json.loads((tmp_path / "train.jsonl.summary.json").read_text())
    easy, hard = summary["by_family"]["easy"], summary["by_family"]["hard"]
    assert easy["unguided_code_share"] == hard["unguided_code_share"] == 0.25
    assert easy["strategy_code_share"]["argmax"] == 0.0 and hard["strategy_code_share"]["argmax"] == 1.0
    # posterior, by hand: π(code) = 2/6; easy π·Q = (2/6)(0.95) vs (4/6)(1) -> 0.95/2.95
    assert easy["strategy_code_share"]["posterior"] == pytest.approx(0.95 / 2.95)
    assert hard["strategy_code_share"]["posterior"] == 1.0
    assert easy["examples_code_share"] == 0.0 and hard["examples_code_share"] == 1.0
    assert hard["queries"] == 4 and hard["queries_unsolved"] == 1 and hard["groups_all_correct"] == 3
    assert summary["by_family"]["all"]["examples"] == 24
    assert "hard" in capsys.readouterr().out


def test_rl_stage_keeps_m_records_per_query_without_the_lambda_term(tmp_path, capsys):
    # em.sh's RL-only: 3K = 12 autonomous rollouts per query and no guided pools. M = 12 / 3 = 4 = EM's M = K, drawn
    # at random; the advantages are whitened over all 12.
    correct = {"q0": [1, 1, 1] + [0] * 9, "q1": [1] * 6 + [0] * 6, "all_ok": [1] * 12, "all_bad": [0] * 12}
    rollouts = [rollout(q, "auto", k, ok, calls=k % 2) for q, oks in correct.items() for k, ok in enumerate(oks)]
    for r in rollouts:
        del r["auto_prompt_ids"]                       # autonomous rollouts need none: their prompt is autonomous
    path = tmp_path / "rollouts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rollouts))
    synthesize.main([f"--rollouts={path}", f"--out={tmp_path / 'train.jsonl'}", "--strategy=rl"])
    records = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert sorted(r["query_id"] for r in records) == ["q0"] * 4 + ["q1"] * 4   # A = 0 everywhere: none kept
    assert not any(r["sft"] for r in records) and all(r["prompt_ids"] == AUTO_IDS for r in records)
    std = math.sqrt(0.25 * 0.75)                       # q0: 3 of 12 right, p = 1/4
    for r in records:
        if r["query_id"] == "q0":
            assert r["advantage"] == pytest.approx((0.75 if r["reward"] else -0.25) / std, rel=1e-5)
        else:                                          # q1: 6 of 12, A = ±1
            assert r["advantage"] == pytest.approx(1.0 if r["reward"] else -1.0, rel=1e-5)
    assert len({r["id"] for r in records}) == 8        # drawn without repeats
    summary = json.loads((tmp_path / "train.jsonl.summary.json").read_text())
    row = summary["by_family"]["mul"]
    assert summary["samples_per_query"] == [4] and row["examples"] == 8 and row["sft_examples"] == 0
    assert row["groups_all_correct"] == 1 and row["groups_all_wrong"] == 1
    assert row["strategy_code_share"]["argmax"] is None and row["unguided_code_share"] == 0.5
    assert "M=4 per query" in capsys.readouterr().out
    synthesize.main([f"--rollouts={path}", f"--out={tmp_path / 'six.jsonl'}", "--strategy=rl", "--samples_per_query=6"])
    assert len((tmp_path / "six.jsonl").read_text().splitlines()) == 12


def test_default_m_is_k_for_both_strategies():
    def pools(n_code, n_cot):
        return {"code": [None] * n_code, "cot": [None] * n_cot}
    assert synthesize.default_m(pools(4, 4), [None] * 4) == 4       # EM: K + K + K
    assert synthesize.default_m(pools(0, 0), [None] * 12) == 4      # RL-only: 3K autonomous
    assert synthesize.default_m(pools(0, 0), [None] * 2) == 1


def test_reflect_stage_encodes_hints_with_the_models_tokenizer(tmp_path):
    task.tiny_tokenizer().save_pretrained(str(tmp_path / "tok"))
    rollouts = query("h", [1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0])
    path = tmp_path / "rollouts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rollouts))
    out = tmp_path / "train.jsonl"
    synthesize.main([f"--rollouts={path}", f"--out={out}", "--reflect=2", f"--model={tmp_path / 'tok'}"])
    reflective = [json.loads(line) for line in out.read_text().splitlines() if '"reflect"' in line]
    hint = synthesize.encode_hints(str(tmp_path / "tok"), {"code": synthesize.hint_to_code})["code"]
    assert len(reflective) == 2 and len(hint) > 10
    for r in reflective:
        i = r["trainable_mask"].index(1)                  # the first trained token: the retry's
        assert r["response_ids"][i - len(hint):i] == hint
    with pytest.raises(ValueError, match="hint"):         # a character the tiny vocabulary lacks
        synthesize.encode_hints(str(tmp_path / "tok"), {"code": "\nLet me use Python \u2192\n"})


def test_rollouts_cut_at_the_length_limit_are_in_neither_term_but_count_in_q():
    """A mixed hard query whose one correct CoT rollout hit the length limit: Q(x, cot) still counts it (it is what
    the policy got), but no training record carries it, in the RL term or the λ term, and the query says so."""
    rollouts = query("h", [1, 1, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0])
    cut = rollout("h", "code", 1, True, calls=1, finish_reason="length")
    rollouts = [cut if r["id"] == cut["id"] else r for r in rollouts]
    res = run(rollouts)
    assert res.q["code"] == pytest.approx((3 - 0.05 * 4) / 4)       # the cut rollout's reward is in Q
    assert res.group == "mixed" and res.cut == 1
    assert cut["id"] not in {r["id"] for r in res.records} and len(res.records) == 3
    sft = run(rollouts, strategy="sft")
    assert sft.cut == 1 and len(sft.records) == 2 and cut["id"] not in {r["id"] for r in sft.records}
    autonomous = [rollout("h", "auto", k, c, finish_reason=f) for k, (c, f) in
                  enumerate([(1, "eos"), (0, "eos"), (1, "length"), (0, "length")])]
    rl = run(rollouts[:8] + autonomous, strategy="rl")
    assert rl.cut == 2 and {r["id"] for r in rl.records} == {"h:auto:0", "h:auto:1"}

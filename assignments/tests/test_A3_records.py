"""A3: autonomous_prompt_ids, training_record and reflective_record: the guidance is stripped from the prompt, the
behaviour log-probs of the guided prompt are kept, tool output is never trained on."""
import pytest

import synthesize
pytestmark = pytest.mark.A3

AUTO = [7, 7, 7]
GUIDED = {"code": [5, 5], "cot": [6, 6, 6, 6]}


def rollout(mode, k=0, correct=True, calls=0, finish_reason="eos", family="mul", sampling=True, query_id="q1"):
    # 2 sampled tokens, an injected tool-output token when it ran code, a sampled closing token, EOS (sampled)
    response = [10 + k, 11] + ([99] if calls else []) + [12, 0]
    mask = [1, 1] + ([0] if calls else []) + [1, 1]
    record = {"id": f"{query_id}:{mode}:{k}", "query_id": query_id, "mode": mode, "k": k, "family": family,
              "prompt_ids": AUTO if mode == "auto" else GUIDED[mode], "response_ids": response, "sampled_mask": mask,
              "behaviour_logprobs": [-0.25 * (i + 1) if m else 0.0 for i, m in enumerate(mask)], "calls": calls,
              "correct": correct, "finish_reason": finish_reason}
    if mode != "auto":
        record["auto_prompt_ids"] = AUTO
    if sampling:
        record.update(temperature=0.5, top_p=0.9, top_k=20)
    return record


# --------------------------------------------------------------------------- autonomous_prompt_ids
def test_guided_rollouts_train_on_the_autonomous_prompt():
    """autonomous_prompt_ids: a guided rollout's training prompt is its auto_prompt_ids"""
    for mode in ("code", "cot"):
        got = synthesize.autonomous_prompt_ids(rollout(mode))
        assert got == AUTO, (f"a {mode}-guided rollout was drawn from the {mode} prompt {GUIDED[mode]}, but trains on "
                             f"the autonomous prompt {AUTO} (auto_prompt_ids); got {got}")


def test_native_rollouts_keep_their_own_prompt():
    """autonomous_prompt_ids: a autonomous (mode auto) rollout's prompt is already the autonomous one"""
    autonomous = rollout("auto")
    assert synthesize.autonomous_prompt_ids(autonomous) == AUTO
    autonomous["prompt_ids"], autonomous["auto_prompt_ids"] = [8, 8], [9]
    got = synthesize.autonomous_prompt_ids(autonomous)
    assert got == [8, 8], f"mode auto: its prompt_ids are the autonomous prompt it was drawn from, got {got}"
    bare = rollout("auto")
    bare.pop("auto_prompt_ids", None)
    assert synthesize.autonomous_prompt_ids(bare) == AUTO, "a autonomous rollout needs no auto_prompt_ids field"


# --------------------------------------------------------------------------- training_record
EXPECTED_KEYS = {"id", "query_id", "family", "method", "source_mode", "prompt_ids", "response_ids", "trainable_mask",
                 "behaviour_logprobs", "advantage", "sft", "reward", "temperature", "top_p", "top_k"}


def test_training_record_of_a_code_guided_rollout():
    """training_record: every field train.py reads, from a code-guided rollout that ran code"""
    r = rollout("code", k=2, calls=1)
    got = synthesize.training_record(r, 1.5, True)
    assert set(got) == EXPECTED_KEYS, (f"fields: missing {sorted(EXPECTED_KEYS - set(got))}, unexpected "
                                       f"{sorted(set(got) - EXPECTED_KEYS)}")
    expected = {"id": "q1:code:2", "query_id": "q1", "family": "mul", "method": "code", "source_mode": "code",
                "prompt_ids": AUTO, "response_ids": [12, 11, 99, 12, 0], "trainable_mask": [1, 1, 0, 1, 1],
                "behaviour_logprobs": [-0.25, -0.5, 0.0, -1.0, -1.25], "advantage": 1.5, "sft": True,
                "reward": 1.0, "temperature": 0.5, "top_p": 0.9, "top_k": 20}
    for key, value in expected.items():
        assert got[key] == value, f"field {key}: expected {value!r}, got {got[key]!r}"


def test_training_record_strips_the_guidance_but_keeps_the_behaviour_logprobs():
    """training_record: prompt = the autonomous prompt; behaviour log-probs = the guided rollout's, unchanged"""
    r = rollout("cot", k=1, correct=False)
    got = synthesize.training_record(r, -0.5, False)
    assert got["prompt_ids"] == AUTO, f"the CoT guidance {GUIDED['cot']} must be stripped: prompt {got['prompt_ids']}"
    assert got["behaviour_logprobs"] == r["behaviour_logprobs"], (
        "behaviour_logprobs stay those the guided prompt gave (log π_b(y|x_guided)): the M-step's ratio is "
        "off-policy on purpose")
    assert got["source_mode"] == "cot" and got["method"] == "cot"
    assert got["reward"] == 0.0 and isinstance(got["reward"], float), f"reward float(correct): {got['reward']!r}"
    assert got["advantage"] == -0.5 and got["sft"] is False
    got = synthesize.training_record(r, -0.5, True)
    assert got["sft"] is True and got["reward"] == 0.0, (
        f"sft is the argument, as given (which records join the λ term is the caller's choice, not the record's "
        f"correctness); got sft {got['sft']!r}")


def test_training_record_masks_the_tool_output():
    """training_record: trainable_mask is the rollout's sampled_mask (injected tool output is 0)"""
    r = rollout("code", calls=1)
    got = synthesize.training_record(r, 0.0, True)
    assert got["trainable_mask"] == [1, 1, 0, 1, 1], (
        f"the injected token (position 2) is tool output: never trained on; got {got['trainable_mask']}")
    assert got["response_ids"] == r["response_ids"], "the response tokens are copied as sampled (never re-tokenized)"


def test_training_record_method_is_what_the_response_did():
    """training_record: method is code when the response ran >= 1 block, whatever prompt guided it"""
    assert synthesize.training_record(rollout("code", calls=0), 0.0, False)["method"] == "cot", \
        "a code-guided rollout that ran no code is a CoT response"
    assert synthesize.training_record(rollout("auto", calls=2), 0.0, False)["method"] == "code"
    assert synthesize.training_record(rollout("cot", calls=1), 0.0, False)["method"] == "code"


def test_training_record_of_a_native_rollout():
    """training_record: a autonomous rollout keeps its prompt and is marked source_mode auto"""
    got = synthesize.training_record(rollout("auto", k=3, calls=1), 0.25, False)
    assert got["prompt_ids"] == AUTO and got["source_mode"] == "auto" and got["id"] == "q1:auto:3", got


def test_training_record_without_family_or_sampling_settings():
    """training_record: a rollout without family / temperature / top_p / top_k fields gets None for them"""
    r = rollout("code", sampling=False)
    del r["family"]
    got = synthesize.training_record(r, 0.0, True)
    for key in ("family", "temperature", "top_p", "top_k"):
        assert key in got and got[key] is None, f"{key}: None when the rollout lacks it, got {got.get(key, '<absent>')!r}"


# --------------------------------------------------------------------------- reflective_record
def test_reflective_record_by_hand():
    """reflective_record: failed attempt (EOS dropped) + hint + successful attempt; only the last is trained"""
    failed = rollout("cot", k=1, correct=False)
    success = rollout("code", k=3, calls=1)
    hint = [50, 51, 52]
    got = synthesize.reflective_record(failed, success, hint)
    context = [11, 11, 12] + hint          # the failed response without its EOS, then the hint
    assert got["id"] == "q1:reflect:q1:cot:1>q1:code:3", f"id query:reflect:failed>success, got {got['id']!r}"
    assert got["response_ids"] == context + success["response_ids"], (
        f"failed response minus its final EOS (it must not end the text), the hint, then the success: "
        f"{context + success['response_ids']}; got {got['response_ids']}")
    assert got["trainable_mask"] == [0] * 6 + [1, 1, 0, 1, 1], (
        f"the failed attempt and the hint are context (0), the success keeps its own mask; got {got['trainable_mask']}")
    assert got["behaviour_logprobs"] == [0.0] * 6 + success["behaviour_logprobs"], got["behaviour_logprobs"]
    assert got["prompt_ids"] == AUTO, "the autonomous prompt, as for every training record"
    expected = {"query_id": "q1", "family": "mul", "method": "code", "source_mode": "reflect", "advantage": 0.0,
                "sft": True, "reward": 1.0, "temperature": 0.5, "top_p": 0.9, "top_k": 20}
    for key, value in expected.items():
        assert got[key] == value, f"field {key}: expected {value!r}, got {got[key]!r}"
    assert set(got) == EXPECTED_KEYS, sorted(set(got) ^ EXPECTED_KEYS)


def test_reflective_record_keeps_a_failed_attempt_that_did_not_end_with_eos():
    """reflective_record: only an EOS-terminated failed attempt loses its last token"""
    failed, success = rollout("cot", k=1, correct=False), rollout("code", k=3, calls=1)
    copies = [list(failed["response_ids"]), list(success["response_ids"])]
    first = synthesize.reflective_record(failed, success, [50])
    again = synthesize.reflective_record(failed, success, [50])
    assert [failed["response_ids"], success["response_ids"]] == copies and again == first, (
        "reflective_record must not change the rollouts it is given (dropping the EOS from the caller's own list "
        "cuts one more token at every call)")
    for reason in ("stop", "max_calls", None):
        failed = rollout("code", k=0, correct=False, calls=1, finish_reason=reason)
        got = synthesize.reflective_record(failed, rollout("cot", k=2), [60])
        assert got["response_ids"][:len(failed["response_ids"]) + 1] == failed["response_ids"] + [60], (
            f"finish_reason {reason!r}: its last token is no EOS, so the failed response is kept whole; got "
            f"{got['response_ids']}")
    failed = rollout("code", k=0, correct=False, calls=1, finish_reason="length")
    success = rollout("cot", k=2)
    got = synthesize.reflective_record(failed, success, [60])
    assert got["response_ids"] == failed["response_ids"] + [60] + success["response_ids"], (
        f"finish_reason 'length': the failed response is kept whole; got {got['response_ids']}")
    assert got["trainable_mask"] == [0] * 6 + [1, 1, 1, 1] and got["method"] == "cot"
    assert got["id"] == "q1:reflect:q1:code:0>q1:cot:2"


def test_reflective_record_takes_query_and_settings_from_the_success():
    """reflective_record: query_id, family, method, prompt and sampling settings are the successful attempt's"""
    failed = rollout("cot", k=0, correct=False, family="chain", sampling=False)
    success = rollout("code", k=1, calls=1, family="mul")
    success.update(temperature=0.7, top_p=1.0, top_k=0)
    got = synthesize.reflective_record(failed, success, [])
    assert (got["family"], got["temperature"], got["top_p"], got["top_k"]) == ("mul", 0.7, 1.0, 0), got
    assert got["response_ids"][:3] == [10, 11, 12] and len(got["response_ids"]) == 3 + 5, "empty hint: nothing between"

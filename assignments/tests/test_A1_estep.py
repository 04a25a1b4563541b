"""A1: estimate_q, estimate_pi and reference_strategy of synthesize.py, on hand-computed examples."""
import math

import pytest

import synthesize
pytestmark = pytest.mark.A1


def rollout(mode, correct, calls=0, k=0, query_id="q"):
    return {"id": f"{query_id}:{mode}:{k}", "query_id": query_id, "mode": mode, "k": k, "correct": correct,
            "calls": calls, "response_ids": [1], "sampled_mask": [1], "behaviour_logprobs": [-0.5]}


def pool(mode, outcomes):
    """outcomes: [(correct, calls)] -> rollouts of one mode."""
    return [rollout(mode, c, n, k) for k, (c, n) in enumerate(outcomes)]


def approx(x, tol=1e-9):
    return pytest.approx(x, rel=tol, abs=tol)


# --------------------------------------------------------------------------- Q(x, c)
def test_q_is_the_mean_reward_minus_the_cost_of_each_call():
    """estimate_q: mean over the pool of (correct - code_cost * calls)"""
    code = pool("code", [(True, 1), (True, 1), (True, 2), (False, 1)])
    got = synthesize.estimate_q(code, 0.05)
    assert got == approx((3 - 0.05 * 5) / 4), (
        f"4 code rollouts, 3 correct, 5 calls in all, code_cost 0.05: Q = (3 - 0.25)/4 = 0.6875, got {got}")
    got = synthesize.estimate_q(code, 0.0)
    assert got == approx(0.75), f"the same pool at code_cost 0: Q is the plain success rate 0.75, got {got}"


def test_q_charges_per_call_not_per_rollout():
    """estimate_q: the cost is per execution (3 calls cost 3 times as much as 1)"""
    got = synthesize.estimate_q(pool("code", [(True, 3)]), 0.05)
    assert got == approx(0.85), f"one correct rollout that ran 3 code blocks, cost 0.05: 1 - 0.15 = 0.85, got {got}"
    got = synthesize.estimate_q(pool("code", [(True, 3), (True, 0)]), 0.1)
    assert got == approx((0.7 + 1.0) / 2), f"costs 0.3 and 0 on two correct rollouts: Q = 0.85, got {got}"


def test_q_of_cot_pays_nothing_and_wrong_answers_score_zero():
    """estimate_q: a CoT pool (no calls) is its success rate; a wrong rollout scores 0 minus its cost"""
    got = synthesize.estimate_q(pool("cot", [(True, 0), (False, 0), (True, 0), (True, 0)]), 0.05)
    assert got == approx(0.75), f"CoT 3 of 4 right, no calls: 0.75, got {got}"
    got = synthesize.estimate_q(pool("code", [(False, 3)]), 0.1)
    assert got == approx(-0.3), (f"one wrong rollout with 3 calls at cost 0.1 scores 0 - 0.3 = -0.3 (Q is not "
                                 f"clipped at 0: reference_strategy handles negative Q), got {got}")


def test_q_accepts_int_correctness_and_returns_a_float():
    """estimate_q: correct may be 0/1 or a bool; Q is a float"""
    got = synthesize.estimate_q(pool("cot", [(1, 0), (0, 0)]), 0.05)
    assert isinstance(got, float) and got == approx(0.5), f"rewards 1, 0 as ints: 0.5 (a float), got {got!r}"


def test_q_of_an_empty_pool_is_zero():
    """estimate_q: no rollouts of a method (e.g. an explore run without that mode) -> Q = 0.0, no error"""
    got = synthesize.estimate_q([], 0.05)
    assert got == 0.0, f"an empty pool has no evidence for the method: Q = 0.0, got {got!r}"


# --------------------------------------------------------------------------- π(code | x)
def test_pi_is_laplace_smoothed():
    """estimate_pi: (n_code + a) / (K + 2a), never 0 or 1 with a > 0"""
    never = pool("auto", [(True, 0)] * 4)
    always = pool("auto", [(True, 1)] * 4)
    got = synthesize.estimate_pi(never, 1.0)
    assert got["code"] == approx(1 / 6), f"0 of 4 autonomous rollouts coded, prior 1: (0+1)/(4+2) = 1/6, got {got}"
    assert got["cot"] == approx(5 / 6), f"π(cot) = 1 - π(code) = 5/6, got {got}"
    got = synthesize.estimate_pi(always, 1.0)
    assert got["code"] == approx(5 / 6), f"4 of 4 coded, prior 1: 5/6, got {got}"
    got = synthesize.estimate_pi(pool("auto", [(True, 1)] * 3 + [(True, 0)] * 5), 1.0)
    assert got["code"] == approx(0.4), f"3 of 8 coded, prior 1: (3+1)/(8+2) = 0.4, got {got}"


def test_pi_prior_is_a_pseudo_count_per_method():
    """estimate_pi: the prior a is added to each method's count, 2a to the total"""
    one_of_four = pool("auto", [(True, 1)] + [(False, 0)] * 3)
    got = synthesize.estimate_pi(one_of_four, 0.5)
    assert got["code"] == approx(1.5 / 5), f"1 of 4 coded, prior 0.5: (1+0.5)/(4+1) = 0.3, got {got}"
    got = synthesize.estimate_pi(one_of_four, 0.0)
    assert got == {"code": approx(0.25), "cot": approx(0.75)}, f"prior 0: the raw share 1/4, got {got}"
    got = synthesize.estimate_pi(one_of_four, 2.0)
    assert got["code"] == approx(3 / 8), f"1 of 4 coded, prior 2: (1+2)/(4+4) = 0.375, got {got}"


def test_pi_counts_rollouts_that_ran_code_not_calls_nor_correctness():
    """estimate_pi: a autonomous rollout is 'code' when it ran >= 1 block, whatever its correctness"""
    autonomous = pool("auto", [(True, 3), (False, 1), (False, 0), (True, 0)])
    got = synthesize.estimate_pi(autonomous, 1.0)
    assert got["code"] == approx(3 / 6), (
        f"calls 3, 1, 0, 0 (one of them wrong): 2 rollouts coded, (2+1)/(4+2) = 0.5 — count rollouts with "
        f"calls > 0, not calls, and not only correct ones; got {got}")


def test_pi_without_native_rollouts():
    """estimate_pi: no autonomous rollouts -> the prior alone (0.5), or ValueError when the prior is 0"""
    got = synthesize.estimate_pi([], 1.0)
    assert got["code"] == approx(0.5) and got["cot"] == approx(0.5), f"no autonomous rollouts, prior 1: 1/2, got {got}"
    with pytest.raises(ValueError):
        synthesize.estimate_pi([], 0.0)
    with pytest.raises(ValueError):
        synthesize.estimate_pi([], -1.0)
    got = synthesize.estimate_pi([], 0.25)
    assert got["code"] == approx(0.5), f"no autonomous rollouts, prior 0.25: (0 + 0.25) / (0 + 0.5) = 1/2, got {got}"


def test_pi_is_a_distribution_over_both_methods():
    """estimate_pi: returns {"code": p, "cot": 1 - p}"""
    got = synthesize.estimate_pi(pool("auto", [(True, 1), (True, 0), (True, 0)]), 1.0)
    assert set(got) == {"code", "cot"}, f"keys must be exactly code and cot, got {sorted(got)}"
    assert got["code"] + got["cot"] == approx(1.0) and got["code"] == approx(2 / 5), got


# --------------------------------------------------------------------------- s*(c | x)
def s(pi_code, q_code, q_cot, form, alpha=10.0):
    return synthesize.reference_strategy({"code": pi_code, "cot": 1 - pi_code}, {"code": q_code, "cot": q_cot}, form, alpha)


def test_posterior_is_proportional_to_pi_times_q():
    """reference_strategy posterior: s*(code) = π(code)Q(code) / (π(code)Q(code) + π(cot)Q(cot))"""
    got = s(1 / 6, 0.95, 0.25, "posterior")
    expected = (0.95 / 6) / (0.95 / 6 + 0.25 * 5 / 6)
    assert got["code"] == approx(expected), f"π(code)=1/6, Q=0.95/0.25: {expected:.6f}, got {got}"
    assert got["cot"] == approx(1 - expected), got
    got = s(0.3, 0.9, 0.6, "posterior")
    assert got["code"] == approx(0.27 / 0.69), f"π·Q = 0.27 vs 0.42: 0.27/0.69 = 0.3913, got {got}"


def test_posterior_weighs_the_prior_not_just_q():
    """reference_strategy posterior: π matters (Q(code) > Q(cot) can still favour CoT)"""
    got = s(0.1, 0.9, 0.2, "posterior")
    assert got["code"] == approx(0.09 / 0.27), f"π·Q = 0.09 vs 0.18: s*(code) = 1/3 (not Q's 0.82), got {got}"


def test_posterior_counts_negative_q_as_zero():
    """reference_strategy posterior: a cost-lowered Q below 0 weighs 0; all weights 0 -> CoT"""
    got = s(0.5, -0.1, 0.5, "posterior")
    assert got == {"code": approx(0.0), "cot": approx(1.0)}, f"Q(code) = -0.1 counts as 0: all to CoT, got {got}"
    got = s(0.5, 0.4, -0.2, "posterior")
    assert got == {"code": approx(1.0), "cot": approx(0.0)}, f"Q(cot) < 0 counts as 0: all to code, got {got}"
    got = s(0.5, 0.0, 0.0, "posterior")
    assert got == {"code": 0.0, "cot": 1.0}, f"nothing works (both weights 0): CoT, not 0/0, got {got}"
    got = s(0.5, -0.2, -0.1, "posterior")
    assert got == {"code": 0.0, "cot": 1.0}, f"both Q < 0: CoT, got {got}"


def test_tempered_is_a_logistic_of_the_score_gap():
    """reference_strategy tempered: s*(code) = exp(α πQ_code) / (exp(α πQ_code) + exp(α πQ_cot))"""
    got = s(1 / 6, 0.95, 0.25, "tempered", 10)
    gap = 0.95 / 6 - 0.25 * 5 / 6
    assert got["code"] == approx(1 / (1 + math.exp(-10 * gap))), f"gap {gap:.4f}, α 10, got {got}"
    got = s(1 / 6, 0.95, 0.0, "tempered", 10)
    assert got["code"] == approx(1 / (1 + math.exp(-0.95 * 10 / 6))), got
    got = s(0.3, 0.9, 0.6, "tempered", 3.0)
    assert got["code"] == approx(1 / (1 + math.exp(-3.0 * (0.27 - 0.42)))), f"α = 3 (not 10): got {got}"
    assert got["code"] + got["cot"] == approx(1.0)


def test_tempered_stays_finite_at_a_large_alpha():
    """reference_strategy tempered: at α = 2000 the form is all but the argmax, on either side, with no overflow
    (exp(α πQ) alone would be exp(1800))"""
    got = s(0.5, 0.9, 0.8, "tempered", 2000.0)
    assert got["code"] == approx(1.0) and got["cot"] == approx(0.0), f"code's score is higher: got {got}"
    got = s(0.5, 0.8, 0.9, "tempered", 2000.0)
    assert got["code"] == approx(0.0) and got["cot"] == approx(1.0), f"CoT's score is higher: got {got}"
    for q_code, q_cot, expected in ((0.0, 0.9, 0.0), (0.9, 0.0, 1.0)):
        got = s(0.5, q_code, q_cot, "tempered", 2000.0)
        assert got["code"] == approx(expected), (f"π = 1/2, Q = {q_code} / {q_cot}, α = 2000: α times the score gap is "
                                                 f"±900, and e^900 overflows; s*(code) = {expected}, got {got}")


def test_tempered_alpha_zero_and_equal_scores_give_one_half():
    """reference_strategy tempered: α = 0, or equal π·Q, is a coin flip of 1/2 (the tempered form has no tie rule)"""
    assert s(0.2, 0.9, 0.1, "tempered", 0.0)["code"] == approx(0.5)
    assert s(0.5, 0.7, 0.7, "tempered", 10.0)["code"] == approx(0.5)


def test_tempered_compares_negative_scores_as_they_are():
    """reference_strategy tempered: no floor at 0 (that is the posterior's rule): π·Q = -0.05 vs -0.15"""
    got = s(0.5, -0.1, -0.3, "tempered", 10.0)
    assert got["code"] == approx(1 / (1 + math.exp(-10 * 0.1))), f"gap 0.1, α 10: {1 / (1 + math.exp(-1)):.4f}, got {got}"


def test_tempered_uses_pi_times_q():
    """reference_strategy tempered: scores are π·Q, not Q"""
    got = s(0.1, 0.9, 0.2, "tempered", 10)
    assert got["code"] == approx(1 / (1 + math.exp(-10 * (0.09 - 0.18)))), got
    assert got["code"] < 0.5, f"π·Q = 0.09 < 0.18: the tempered s* leans to CoT, got {got}"


def test_argmax_picks_the_larger_pi_times_q():
    """reference_strategy argmax: all mass on argmax_c π(c)Q(c)"""
    assert s(1 / 6, 0.95, 0.0, "argmax") == {"code": 1.0, "cot": 0.0}
    assert s(1 / 6, 0.95, 0.25, "argmax") == {"code": 0.0, "cot": 1.0}, \
        "π·Q = 0.158 (code) vs 0.208 (cot): argmax is CoT"
    got = s(0.1, 0.9, 0.2, "argmax")
    assert got == {"code": 0.0, "cot": 1.0}, f"Q favours code but π·Q = 0.09 < 0.18: CoT, got {got}"
    got = s(0.5, -0.1, -0.3, "argmax")
    assert got == {"code": 1.0, "cot": 0.0}, (f"CoT-guided rollouts that ran code can make Q(cot) < 0: the scores are "
                                              f"compared as they are (-0.05 > -0.15: code), got {got}")
    got = s(0.5, 0.8000001, 0.8, "argmax")
    assert got == {"code": 1.0, "cot": 0.0}, f"π·Q = 0.40000005 > 0.4: close is not a tie, code; got {got}"


def test_argmax_ties_go_to_cot():
    """reference_strategy argmax: an exact tie of π·Q goes to CoT, never to code or a coin flip"""
    got = s(0.5, 0.8, 0.8, "argmax")
    assert got == {"code": 0.0, "cot": 1.0}, f"π·Q = 0.4 = 0.4: a tie is CoT, got {got}"
    got = s(0.5, 0.0, 0.0, "argmax")
    assert got == {"code": 0.0, "cot": 1.0}, f"nothing works (0 = 0): CoT, got {got}"
    got = synthesize.reference_strategy({"code": 0.25, "cot": 0.75}, {"code": 0.75, "cot": 0.25}, "argmax", 10.0)
    assert got == {"code": 0.0, "cot": 1.0}, f"0.25·0.75 = 0.75·0.25: a tie, CoT; got {got}"
    got = s(0.5, 0.95, 1.0, "argmax")
    assert got == {"code": 0.0, "cot": 1.0}, "both always right, code pays its cost (0.95 < 1): CoT"


def test_every_form_is_a_distribution():
    """reference_strategy: {"code": p, "cot": 1 - p} for every form"""
    for form in ("posterior", "tempered", "argmax"):
        got = synthesize.reference_strategy({"code": 0.4, "cot": 0.6}, {"code": 0.4, "cot": 0.9}, form, 3.0)
        assert set(got) == {"code", "cot"}, f"{form}: keys {sorted(got)}"
        assert got["code"] + got["cot"] == approx(1.0), f"{form}: {got} does not sum to 1"
        assert 0.0 <= got["code"] <= 1.0, f"{form}: {got}"


def test_unknown_form_is_an_error():
    """reference_strategy: an unknown form raises ValueError"""
    with pytest.raises(ValueError):
        s(0.5, 0.5, 0.5, "softmax")

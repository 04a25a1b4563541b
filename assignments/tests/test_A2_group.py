"""A2: subsample (the query's M training rollouts drawn with weights s*) and whiten (group-relative advantages)."""
import math
import random

import pytest

import synthesize
pytestmark = pytest.mark.A2


def r(mode, k, correct=True):
    return {"id": f"q:{mode}:{k}", "query_id": "q", "mode": mode, "k": k, "correct": correct, "calls": 0}


def pools(n_code=4, n_cot=4):
    return {"code": [r("code", k) for k in range(n_code)], "cot": [r("cot", k) for k in range(n_cot)]}


def ids(rollouts):
    return [x["id"] for x in rollouts]


class ScriptedRandom:
    """A random.Random stand-in: random() returns the scripted values in order; sample(population, k) returns the
    first k items (and logs the call), so the test sees exactly which draws subsample made."""

    def __init__(self, values):
        self.values, self.log = list(values), []

    def random(self):
        if not self.values:
            raise AssertionError("subsample called rng.random() more than M times (one draw per training rollout)")
        self.log.append(("random",))
        return self.values.pop(0)

    def sample(self, population, k):
        self.log.append(("sample", [x["id"] for x in population], k))
        return list(population)[:k]

    def choice(self, *args):
        raise AssertionError("subsample must draw with rng.random() (the method of each rollout) and rng.sample")

    choices = shuffle = randint = randrange = choice


# --------------------------------------------------------------------------- subsample
def test_subsample_counts_code_draws_with_one_uniform_per_rollout():
    """subsample: n_code = #{i < M : rng.random() < s*(code)}, then n_code from the code pool, M - n_code from CoT"""
    rng = ScriptedRandom([0.1, 0.9, 0.3, 0.5])
    got = synthesize.subsample(pools(), {"code": 0.4, "cot": 0.6}, 4, rng)
    assert [e for e in rng.log if e[0] == "random"] == [("random",)] * 4, \
        "M = 4 training rollouts: rng.random() exactly 4 times, one per rollout"
    samples = [e for e in rng.log if e[0] == "sample" and e[2] > 0]
    assert samples == [("sample", ids(pools()["code"]), 2), ("sample", ids(pools()["cot"]), 2)], (
        f"draws 0.1, 0.9, 0.3, 0.5 against s*(code) = 0.4: 2 are < 0.4, so rng.sample(code pool, 2) then "
        f"rng.sample(CoT pool, 2), in that order; the calls were {samples}")
    assert ids(got) == ["q:code:0", "q:code:1", "q:cot:0", "q:cot:1"], \
        f"the code draws first, then the CoT draws, each in the order rng.sample returned them; got {ids(got)}"


def test_subsample_uses_a_strict_less_than():
    """subsample: a uniform equal to s*(code) is a CoT draw (u < s*, not <=)"""
    rng = ScriptedRandom([0.25, 0.25, 0.0, 0.99])
    got = synthesize.subsample(pools(), {"code": 0.25, "cot": 0.75}, 4, rng)
    assert ids(got) == ["q:code:0", "q:cot:0", "q:cot:1", "q:cot:2"], (
        f"draws 0.25, 0.25, 0.0, 0.99 against s*(code) = 0.25: only 0.0 is < 0.25, so 1 code and 3 CoT; got "
        f"{ids(got)}")


def test_subsample_all_to_one_method():
    """subsample: s*(code) = 1 draws only code, s*(code) = 0 only CoT (still one uniform per rollout)"""
    rng = ScriptedRandom([0.99, 0.5, 0.0])
    got = synthesize.subsample(pools(), {"code": 1.0, "cot": 0.0}, 3, rng)
    assert ids(got) == ["q:code:0", "q:code:1", "q:code:2"], got
    rng = ScriptedRandom([0.0, 0.5, 0.7])
    got = synthesize.subsample(pools(), {"code": 0.0, "cot": 1.0}, 3, rng)
    assert ids(got) == ["q:cot:0", "q:cot:1", "q:cot:2"], got
    assert len([e for e in rng.log if e[0] == "random"]) == 3, \
        "even when s* is 0 or 1, draw the M uniforms: the generator must end in the same state"


def test_subsample_never_asks_a_pool_for_more_than_it_has():
    """subsample: a pool shorter than its count gives what it has (sampling is without replacement)"""
    rng = ScriptedRandom([0.0, 0.0, 0.0, 0.9])
    got = synthesize.subsample(pools(n_code=2, n_cot=4), {"code": 0.5, "cot": 0.5}, 4, rng)
    code_calls = [e for e in rng.log if e[0] == "sample" and e[1] and e[1][0].startswith("q:code")]
    assert code_calls and code_calls[0][2] == 2, f"3 code draws but a pool of 2: rng.sample(code pool, 2); {code_calls}"
    assert ids(got) == ["q:code:0", "q:code:1", "q:cot:0"], got
    rng = ScriptedRandom([0.9])
    got = synthesize.subsample({"code": [r("code", 0)], "cot": []}, {"code": 0.5, "cot": 0.5}, 1, rng)
    assert got == [], f"one CoT draw from an empty CoT pool: nothing, no error; got {ids(got)}"


def test_subsample_zero_draws():
    """subsample: M = 0 gives no rollouts"""
    assert synthesize.subsample(pools(), {"code": 0.5, "cot": 0.5}, 0, ScriptedRandom([])) == []


def test_subsample_with_a_real_generator_matches_the_reference_draws():
    """subsample: with random.Random, the same rollouts as the reference, and the generator left in the same state"""
    # (seed, s*(code), M) -> the reference's draws, and the generator's next random() after the call
    expected = {
        (0, 0.5, 4): (["q:code:3", "q:code:1", "q:cot:2", "q:cot:1"], 0.3580493746949883),
        (1, 0.3, 4): (["q:code:3", "q:code:1", "q:cot:3", "q:cot:2"], 0.37961522332372777),
        (2, 0.9, 3): (["q:code:0", "q:cot:2", "q:cot:0"], 0.7359699890685233),
        ("q:7", 0.25, 4): (["q:cot:1", "q:cot:0", "q:cot:2", "q:cot:3"], 0.03182207892971989),
        (3, 1.0, 4): (["q:code:0", "q:code:2", "q:code:3", "q:code:1"], 0.25935401432800764),
        (4, 0.0, 4): (["q:cot:0", "q:cot:3", "q:cot:1", "q:cot:2"], 0.8004523514958085),
    }
    for (seed, code, m), (draws, after) in expected.items():
        rng = random.Random(seed)
        got = synthesize.subsample(pools(), {"code": code, "cot": 1 - code}, m, rng)
        assert ids(got) == draws, (f"random.Random({seed!r}), s*(code) = {code}, M = {m}: expected {draws}, got "
                                   f"{ids(got)} (M calls of rng.random(), then rng.sample(code pool, n_code), then "
                                   f"rng.sample(CoT pool, M - n_code))")
        assert rng.random() == after, f"random.Random({seed!r}): the generator was left in another state"


def test_subsample_does_not_touch_the_pools():
    """subsample: the pools are read, not changed"""
    p = pools()
    before = {c: ids(v) for c, v in p.items()}
    synthesize.subsample(p, {"code": 0.5, "cot": 0.5}, 4, random.Random(0))
    assert {c: ids(v) for c, v in p.items()} == before


# --------------------------------------------------------------------------- whiten
def approx_list(values, tol=1e-6):
    return pytest.approx(values, rel=tol, abs=tol)


def test_whiten_one_correct_of_four():
    """whiten: A_i = (r_i - mean) / (std + eps), std the population std"""
    got = synthesize.whiten([1.0, 0.0, 0.0, 0.0], 1e-6)
    std = math.sqrt(0.1875)
    expected = [0.75 / (std + 1e-6)] + [-0.25 / (std + 1e-6)] * 3
    assert got == approx_list(expected), f"rewards 1,0,0,0: mean 0.25, std 0.433: {expected}, got {got}"


def test_whiten_uses_the_population_std():
    """whiten: divide by n, not n - 1"""
    got = synthesize.whiten([1.0, 0.0, 0.0], 0.0)
    mean, std = 1 / 3, math.sqrt(2 / 9)
    expected = [(1 - mean) / std, -mean / std, -mean / std]
    assert got == approx_list(expected), (f"rewards 1,0,0: population std sqrt(2/9) = 0.4714, A = {expected} "
                                          f"(with the sample std you would get 1.1547 first); got {got}")
    assert synthesize.whiten([1.0, 1.0, 0.0, 0.0], 0.0) == approx_list([1.0, 1.0, -1.0, -1.0])


def test_whiten_adds_eps_to_the_std():
    """whiten: eps is added to the std (not to the variance, not to the numerator)"""
    got = synthesize.whiten([1.0, 0.0], 1.0)
    assert got == approx_list([0.5 / 1.5, -0.5 / 1.5]), (
        f"rewards 1,0 with eps = 1: std 0.5, A = ±0.5/(0.5 + 1) = ±1/3; got {got}")


def test_whiten_real_valued_rewards():
    """whiten: rewards need not be 0/1"""
    got = synthesize.whiten([0.5, 1.0, 0.0, 0.25], 1e-6)
    expected = [0.16903039380408252, 1.5212735442367427, -1.1832127566285777, -0.5070911814122475]
    assert got == approx_list(expected), f"rewards 0.5, 1, 0, 0.25: {expected}, got {got}"


def test_whiten_zero_variance_groups_get_zero_advantage():
    """whiten: every reward equal -> every A = 0 (nothing to compare; eps keeps 0/0 away)"""
    for rewards in ([1.0, 1.0, 1.0, 1.0], [0.0, 0.0], [0.7] * 3, [1.0]):
        got = synthesize.whiten(rewards, 1e-6)
        assert got == approx_list([0.0] * len(rewards)), f"rewards {rewards}: all advantages 0, got {got}"
    got = synthesize.whiten([1.0, 1.0, 1.0], 1e-6)
    assert all(a == 0.0 for a in got), f"rewards 1, 1, 1: exactly 0 (r - mean is 0), got {got}"
    for rewards in ([1.0, 1.0, 1.0], [0.7, 0.7, 0.7]):
        got = synthesize.whiten(rewards, 0.0)
        assert got == [0.0] * 3, (f"eps = 0 (--adv_eps=0): rewards {rewards} are all equal, so all 0, not 0 / 0 (nor "
                                  f"float noise over float noise: the std of [0.7] * 3 computes as 1e-16); got {got}")


def test_whiten_keeps_order_and_length_and_centres():
    """whiten: one advantage per reward, in order, summing to 0"""
    rewards = [0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0]
    got = synthesize.whiten(rewards, 1e-6)
    assert len(got) == len(rewards) and all(isinstance(a, float) for a in got), got
    assert sum(got) == pytest.approx(0.0, abs=1e-9), f"advantages must sum to 0, got {sum(got)}"
    assert all((a > 0) == (x == 1.0) for a, x in zip(got, rewards)), f"positive exactly where r = 1, got {got}"
    assert synthesize.whiten([3.0, 1.0], 0.0) == approx_list([1.0, -1.0])

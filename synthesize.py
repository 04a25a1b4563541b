"""
The E-step, part 2: from explored rollouts to the M-step's training data.

explore.py drew, for every query x, K rollouts guided to code, K guided to CoT and K autonomous ones, and graded them. This file turns them into training records, query by query:

  1. π(c|x)   how often the model picks c by itself: the share of its autonomous rollouts
              that ran code, smoothed so that "never in K samples" is not "impossible";
  2. Q(x,c)   how good method c is on x: the mean reward of the rollouts guided to c, with a small
              cost per code execution, so that "as good as code" means "prefer CoT";
  3. s*(c|x)  the reference strategy: the posterior s* ∝ π·Q, which makes the bound
              log P(r=1|x) ≥ E_{c~s}[log Q(x,c)] − KL(s ‖ π) tight (README, How it works),
              or its tempered / argmax forms;
  4. draw M training rollouts for x from the guided pools with weights s*(c|x);
  5. whiten their rewards into advantages within the query's group;
  6. strip the guidance: every training prompt is the AUTONOMOUS prompt, so the model learns to
     make by itself the choice the guidance made for it. The behaviour log-probs stay those of the
     guided prompt that really produced the tokens, with the sampling settings they were drawn
     under (temperature, top_p, top_k): train.py's importance ratio is taken against them
     (off-policy on purpose, README, The M-step).

    python synthesize.py --rollouts=rollouts.jsonl --out=train.jsonl [--strategy=em|rl|sft]
           [--form=posterior|tempered|argmax] [--alpha=10] [--code_cost=0.05] [--reflect=1 --model=DIR]

Writes OUT (one training record per line: the contract with train.py), OUT.summary.json beside
it, and prints a per-family table: the model's own code share next to the reference strategy's.
"""
import math
import random
import sys
from collections import defaultdict
from dataclasses import dataclass, field

from tqdm import tqdm

import flags
from jsonl import check_fields, iter_jsonl, write_json_atomic, write_jsonl_atomic
from task import encode_continuation

# ----------------------------------------------------------------------------- hyperparameters
rollouts = ""            # explore.py's output; required
out = ""                 # training records (JSONL) for train.py; required
strategy = "em"          # em: the paper (guided pools weighted by s*); rl: RL-only ablation (autonomous
                         # rollouts, no reference strategy, no λ term: its records say sft=false);
                         # sft: SFT-only ablation (D_s*, correct only)
form = "argmax"          # posterior: s* ∝ π·Q (exact E-step); tempered: s* ∝ exp(α·π·Q) (the paper);
                         # argmax: the α = ∞ limit (paper v1), what the demo uses: the softer forms keep the
                         # model's own π where both methods succeed (docs/TASK.md)
alpha = 10.0             # inverse temperature of the tempered form; π·Q lies in [0,1], so a gap of
                         # 0.3 in π·Q is a factor e^3 ≈ 20 between the methods
code_cost = 0.05         # reward subtracted per code execution inside Q(x,code): ties go to CoT
pi_source = "samples"    # samples: π(code|x) from the autonomous rollouts; prob: from the model's probability
                         # of opening a ```python block (explore.py's p_code_open)
pi_prior = 1.0           # pseudo-count a per method: π(code|x) = (n_code + a) / (K + 2a); a = 1 is
                         # Laplace's rule of succession (0 of 4 → 1/6, 4 of 4 → 5/6)
samples_per_query = 0    # M: training rollouts per query, drawn from the guided pools with weights s*
                         # (rl: drawn at random from the autonomous group). 0: K, the size of one guided pool
                         # (more cannot be drawn without repeats); a file with no guided pools (em.sh's
                         # RL-only draws 3K autonomous rollouts, EM's budget) gets K = their number / 3
adv_eps = 1e-6           # in A = (r − mean) / (std + eps)
reflect = 0              # self-reflective examples per query (paper v1); 0 = off. Needs --model
hint_to_code = "\nThis may be wrong. Let me use python.\n"     # between a failed CoT and a code retry
hint_to_cot = "\nThis may be wrong. Let me think again.\n"     # between a failed code and a CoT retry
model = ""               # checkpoint dir whose tokenizer encodes the hints (only with --reflect)
seed = 0                 # subsampling is reproducible: one generator per (seed, query id)
# ----------------------------------------------------------------------------- end of hyperparameters

METHODS = ("code", "cot")
FORMS = ("posterior", "tempered", "argmax")
GUIDED_MODES = {"code": "code", "cot": "cot"}   # method → the explore mode whose prompt guides to it
AUTONOMOUS_MODE = "auto"
# The fields of a rollout record this file uses, and their kinds (jsonl.FIELD_KINDS): checked as each line is read.
REQUIRED = {"id": "id", "query_id": "id", "mode": "str", "response_ids": "token_ids", "sampled_mask": "mask",
            "behaviour_logprobs": "numbers", "calls": "count", "correct": "bool"}
OPTIONAL = {"k": "count", "prompt_ids": "token_ids", "auto_prompt_ids": "token_ids", "p_code_open": "probability",
            "finish_reason": "str"}
# The behaviour policy's sampling settings, copied from rollout to training record: train.py evaluates π_θ at
# the records' temperature (None: a rollout file older than these fields; train.py then needs --temperature).
SAMPLING = ("temperature", "top_p", "top_k")


# ----------------------------------------------------------------------------- reading rollouts
def read_rollouts(path):
    """Every line a rollout record from explore.py, each field of its kind; a malformed line is named by file and
    line, and a file without a rollout is refused (explore.py refuses an empty query file: no rollout is a run that
    went wrong, and an empty OUT would pass in em.sh for a finished stage)."""
    rollouts, seen = [], {}
    for lineno, record in iter_jsonl(path):
        check_fields(path, lineno, record, REQUIRED, OPTIONAL)
        n = len(record["response_ids"])
        if len(record["sampled_mask"]) != n or len(record["behaviour_logprobs"]) != n:
            raise ValueError(f"{path}:{lineno}: response_ids, sampled_mask and behaviour_logprobs "
                             f"differ in length")
        # the prompt its training record will carry (autonomous_prompt_ids)
        if record["mode"] != AUTONOMOUS_MODE and record.get("auto_prompt_ids") is None:
            raise ValueError(f"{path}:{lineno}: guided rollout without auto_prompt_ids (the autonomous "
                             f"prompt that replaces its guidance); rerun explore.py")
        if record["mode"] == AUTONOMOUS_MODE and record.get("prompt_ids") is None:
            raise ValueError(f"{path}:{lineno}: autonomous rollout without prompt_ids; rerun explore.py")
        if record["id"] in seen:
            raise ValueError(f"{path}:{lineno}: duplicate id {record['id']!r} (first on line "
                             f"{seen[record['id']]})")
        seen[record["id"]] = lineno
        rollouts.append(record)
    if not rollouts:
        raise ValueError(f"{path}: no rollouts (the file is empty)")
    return rollouts


def method_of(rollout):
    """What a response actually did: code if it ran at least one block (what every stage's code rate counts)."""
    return "code" if rollout["calls"] > 0 else "cot"


# ----------------------------------------------------------------------------- the E-step estimates
def estimate_q(pool, code_cost):
    """Q(x,c) = E_{y~π(·|x,c)}[ r(y) ] by Monte Carlo over the K rollouts guided to c, each reward
    lowered by code_cost per execution: where both methods always succeed, Q(x,code) < Q(x,cot).
    The pools are split by the guided PROMPT, so Q is the value of asking for c; a CoT-guided rollout
    that ran code anyway still counts in Q(x,cot) (and pays the cost), while method_of, π and the
    training records go by what a response actually did."""
    if not pool:
        return 0.0
    return sum(float(r["correct"]) - code_cost * r["calls"] for r in pool) / len(pool)


def estimate_pi(autonomous, prior):
    """π(code|x) = (n_code + a) / (K + 2a): the share of autonomous rollouts that ran code, with a
    pseudo-rollouts of each method added (a Beta(a,a) prior). Without it a model that never coded in
    K samples would get π(code|x) = 0, and then s* ∝ π·Q could never send x to code however good
    code is there: exploration would be for nothing."""
    if not autonomous and prior <= 0:
        raise ValueError("π(c|x) needs autonomous rollouts (mode 'auto') or --pi_prior > 0")
    n_code = sum(method_of(r) == "code" for r in autonomous)
    p_code = (n_code + prior) / (len(autonomous) + 2 * prior)
    return {"code": p_code, "cot": 1.0 - p_code}


def reference_strategy(pi, q, form, alpha):
    """s*(c|x), the reference strategy (README, How it works), as {"code": p, "cot": 1 − p}."""
    score = {c: pi[c] * q[c] for c in METHODS}
    if form == "posterior":
        # s*(c|x) ∝ π(c|x)·Q(x,c): the ELBO is tight here. A cost-lowered Q below 0 counts as 0.
        weight = {c: max(score[c], 0.0) for c in METHODS}
        total = weight["code"] + weight["cot"]
        if total == 0.0:                      # nothing works: no evidence for code, so CoT
            return {"code": 0.0, "cot": 1.0}
        return {c: weight[c] / total for c in METHODS}
    if form == "tempered":
        # s*(c|x) ∝ exp(α·π(c|x)·Q(x,c)), written as a logistic of the score gap to stay finite: the exponent is
        # made ≤ 0 on either side of the gap, so a large α gives 0 or 1, never an overflow.
        gap = alpha * (score["code"] - score["cot"])
        p_code = 1.0 / (1.0 + math.exp(-gap)) if gap >= 0 else math.exp(gap) / (1.0 + math.exp(gap))
        return {"code": p_code, "cot": 1.0 - p_code}
    if form == "argmax":
        # α → ∞: s* = 1 on argmax_c π(c|x)·Q(x,c). A tie goes to CoT, never to a coin flip; with
        # code_cost > 0 "code as good as CoT" already scores lower, this catches exact ties.
        p_code = 1.0 if score["code"] > score["cot"] else 0.0
        return {"code": p_code, "cot": 1.0 - p_code}
    raise ValueError(f"unknown form {form!r}; expected one of {', '.join(FORMS)}")


# ----------------------------------------------------------------------------- data synthesis
def subsample(pools, s_star, m, rng):
    """Draw the query's M training rollouts from the reference strategy: n_code ~ Binomial(M, s*(code|x)),
    then n_code rollouts from the code-guided pool and M − n_code from the CoT-guided pool, without
    replacement (with M ≤ K a pool never runs short). The training set is then a sample of D_s*."""
    n_code = sum(rng.random() < s_star["code"] for _ in range(m))
    counts = {"code": n_code, "cot": m - n_code}
    return [r for c in METHODS for r in rng.sample(pools[c], min(counts[c], len(pools[c])))]


def whiten(rewards, eps):
    """A_i = (r_i − mean(r)) / (std(r) + eps) within one query's group (population std). A group where
    every reward is the same gets A = 0 for all: the RL term has nothing to compare."""
    n = len(rewards)
    if max(rewards) == min(rewards):
        # also with eps = 0: the zero-variance group's A = 0, not 0 / 0 (asked of the rewards themselves: the std of
        # [0.7, 0.7, 0.7] computes as 1e-16, not 0)
        return [0.0] * n
    mean = sum(rewards) / n
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / n)
    return [(r - mean) / (std + eps) for r in rewards]


def autonomous_prompt_ids(rollout):
    """Guidance stripped: whatever prompt produced the response, the model trains on the autonomous one."""
    return rollout["prompt_ids"] if rollout["mode"] == AUTONOMOUS_MODE else rollout["auto_prompt_ids"]


def training_record(rollout, advantage, sft):
    return {
        "id": rollout["id"],
        "query_id": rollout["query_id"],
        "family": rollout.get("family"),
        "method": method_of(rollout),
        "source_mode": rollout["mode"],
        "prompt_ids": autonomous_prompt_ids(rollout),
        "response_ids": rollout["response_ids"],
        "trainable_mask": rollout["sampled_mask"],           # tool output (injected) is never trained on
        "behaviour_logprobs": rollout["behaviour_logprobs"],  # log π_b(y_t | x_guided, y_<t), kept
        "advantage": advantage,
        "sft": sft,
        "reward": float(rollout["correct"]),
        **{key: rollout.get(key) for key in SAMPLING},       # the π_b of behaviour_logprobs
    }


def reflective_record(failed, success, hint_ids):
    """Self-reflection (paper v1): a failed attempt with one method, a short hint, then a successful
    attempt with the other, as one response after the autonomous prompt. Only the successful attempt is
    trained on (the failed attempt and the hint are context, masked 0). Its behaviour log-probs are those
    of the guided rollout, which did not see this context: one more off-policy gap for the ratio."""
    failed_ids = failed["response_ids"]
    if failed.get("finish_reason") == "eos":
        failed_ids = failed_ids[:-1]                          # the failed attempt must not end the text
    context = len(failed_ids) + len(hint_ids)
    return {
        "id": f"{success['query_id']}:reflect:{failed['id']}>{success['id']}",
        "query_id": success["query_id"],
        "family": success.get("family"),
        "method": method_of(success),
        "source_mode": "reflect",
        "prompt_ids": autonomous_prompt_ids(success),
        "response_ids": failed_ids + hint_ids + success["response_ids"],
        "trainable_mask": [0] * context + success["sampled_mask"],
        "behaviour_logprobs": [0.0] * context + success["behaviour_logprobs"],
        "advantage": 0.0,
        "sft": True,
        "reward": 1.0,
        **{key: success.get(key) for key in SAMPLING},
    }


@dataclass
class QueryResult:
    """What one query contributed, for the summary."""
    query_id: str
    family: str
    autonomous_code: float | None = None     # raw share of autonomous rollouts that ran code (None: none)
    pi_code: float | None = None           # smoothed π(code|x)
    q: dict | None = None                  # Q(x,c) per method
    s_star_code: dict = field(default_factory=dict)   # s*(code|x) per form (absent: unsolved query)
    group: str = ""                        # mixed | all_correct | all_wrong | unsolved
    m: int = 0                             # M, the training rollouts the query may contribute
    records: list = field(default_factory=list)
    cut: int = 0                           # training rollouts left out because they hit the length limit


def complete(rollout):
    """Whether the rollout ended on its own (EOS, a stop string, max_calls) rather than at the length limit. A cut
    response is in neither term of L(θ): the λ term would teach a "correct" response that never stops, and the
    policy term would move the probability of a sequence that has no end. Its reward still counts in Q(x,c) and in
    its group's advantages: it is what the policy got (DAPO's overlong filtering does the same)."""
    return rollout.get("finish_reason") != "length"


def model_prior(first, autonomous, pi_source, pi_prior):
    """π(c|x) of a query: from its autonomous rollouts (estimate_pi), or the probability the model gave to opening a
    code block (explore.py's p_code_open, carried by every rollout of the query)."""
    if pi_source != "prob":
        return estimate_pi(autonomous, pi_prior)
    p_code = first.get("p_code_open")
    if p_code is None:
        raise ValueError(f"query {first['query_id']}: --pi_source=prob needs p_code_open in the rollouts")
    return {"code": p_code, "cot": 1.0 - p_code}


def default_m(pools, autonomous):
    """M = K, the size of one guided pool: the rollouts per method that explore.py drew. A file with no guided pools
    is RL-only's, which spends the same explore budget (K + K + K) on 3K autonomous rollouts: K = their number / 3. So
    both strategies train on M = K records per query, and at the same epochs on the same number of steps."""
    return max(len(pools["code"]), len(pools["cot"])) or max(1, len(autonomous) // 3)


def synthesize_query(rollouts, strategy, form, alpha, code_cost, pi_source, pi_prior, m, eps, rng,
                     reflect=0, hint_ids=None):
    """All of the E-step for one query x: its rollouts in, its training records out."""
    by_mode = defaultdict(list)
    for r in sorted(rollouts, key=lambda r: (r["mode"], r.get("k", 0))):
        by_mode[r["mode"]].append(r)
    autonomous = by_mode[AUTONOMOUS_MODE]
    pools = {c: by_mode[GUIDED_MODES[c]] for c in METHODS}
    first = rollouts[0]
    result = QueryResult(query_id=first["query_id"], family=str(first.get("family") or "none"))

    if autonomous:
        result.autonomous_code = sum(method_of(r) == "code" for r in autonomous) / len(autonomous)
    pi = model_prior(first, autonomous, pi_source, pi_prior)
    result.pi_code = pi["code"]

    solved = any(r["correct"] for c in METHODS for r in pools[c])
    if pools["code"] or pools["cot"]:
        result.q = {c: estimate_q(pools[c], code_cost) for c in METHODS}
        if solved:
            result.s_star_code = {f: reference_strategy(pi, result.q, f, alpha)["code"] for f in FORMS}

    result.m = m or default_m(pools, autonomous)
    if strategy == "rl":
        # RL-only ablation: the model's own autonomous rollouts are the group; no reference strategy.
        group = autonomous
    elif not solved:
        result.group = "unsolved"             # no guided rollout succeeded: s* has nothing to point at
        return result
    else:
        s_star = reference_strategy(pi, result.q, form, alpha)
        group = subsample(pools, s_star, result.m, rng)
    if not group:
        result.group = "unsolved"
        return result

    rewards = [float(r["correct"]) for r in group]
    if all(rewards):
        result.group = "all_correct"          # A = 0, but every sample still counts in the λ term (not in rl)
        if strategy == "rl":
            return result                     # A = 0 and no λ term: no term of L(θ) would touch them
    elif not any(rewards):
        result.group = "all_wrong"            # nothing to imitate and nothing to compare: dropped
        return result
    else:
        result.group = "mixed"
    advantages = whiten(rewards, eps)

    if strategy == "rl":
        # The advantages are whitened over the whole autonomous group (3K samples: the best baseline there is), but
        # only M of its records, drawn at random, are kept: EM trains on M per query, and the ablation must not
        # get 3x its M-step. sft=false: RL-only has no D_s*, so no λ term, whatever train.py's --sft_weight.
        kept = sorted(rng.sample(range(len(group)), min(result.m, len(group))))
        result.records = [training_record(group[i], advantages[i], False) for i in kept if complete(group[i])]
        result.cut = sum(not complete(group[i]) for i in kept)
        return result

    for rollout, advantage in zip(group, advantages):
        if not complete(rollout):
            result.cut += 1
        elif strategy == "sft":
            # SFT-only ablation: the reference strategy's correct samples, λ term only.
            if rollout["correct"]:
                result.records.append(training_record(rollout, 0.0, True))
        else:
            # em: the RL term with A, and the λ likelihood term on correct samples (y ∈ D_s*, r=1).
            result.records.append(training_record(rollout, advantage, bool(rollout["correct"])))

    if reflect:
        # The method s* prefers is the retry; a failed attempt with the other method is the context.
        target = "code" if s_star["code"] > s_star["cot"] else "cot"
        other = "cot" if target == "code" else "code"
        failures = [r for r in pools[other] if not r["correct"]]
        successes = [r for r in pools[target] if r["correct"] and complete(r)]
        pairs = [(f, s) for f in failures for s in successes]
        for failed, success in rng.sample(pairs, min(reflect, len(pairs))):
            result.records.append(reflective_record(failed, success, hint_ids[target]))
    return result


# ----------------------------------------------------------------------------- the summary
def summarize(results, strategy, form):
    """Per family: the model's own autonomous code share next to the reference strategy's, for every
    form of s*; the examples kept; the zero-variance groups."""
    families = defaultdict(list)
    for res in results:
        families[res.family].append(res)
        families["all"].append(res)

    def mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    # M per query (one value unless pools differ in size): with the queries kept, what sets the M-step's length.
    summary = {"strategy": strategy, "form": form, "samples_per_query": sorted({r.m for r in results if r.m}),
               "by_family": {}}
    for family in sorted(families, key=lambda f: (f == "all", f)):
        group = families[family]
        solved = [r for r in group if r.s_star_code]
        records = [rec for r in group for rec in r.records]
        summary["by_family"][family] = {
            "queries": len(group),
            "unguided_code_share": mean(r.autonomous_code for r in group),
            "pi_code": mean(r.pi_code for r in group),
            "q_code": mean(r.q["code"] for r in group if r.q),
            "q_cot": mean(r.q["cot"] for r in group if r.q),
            # s*'s code share: the expected share of training rollouts sent to code, mean_x s*(code|x) ...
            "strategy_code_share": {f: mean(r.s_star_code[f] for r in solved) for f in FORMS},
            # ... and the share of queries where s* prefers code.
            "queries_to_code": {f: mean(float(r.s_star_code[f] > 0.5) for r in solved) for f in FORMS},
            "examples": len(records),
            "examples_code_share": mean(float(rec["method"] == "code") for rec in records),
            "sft_examples": sum(rec["sft"] for rec in records),
            "reflect_examples": sum(rec["source_mode"] == "reflect" for rec in records),
            "cut_at_length_limit": sum(r.cut for r in group),
            "groups_mixed": sum(r.group == "mixed" for r in group),
            "groups_all_correct": sum(r.group == "all_correct" for r in group),
            "groups_all_wrong": sum(r.group == "all_wrong" for r in group),
            "queries_unsolved": sum(r.group == "unsolved" for r in group),
        }
    return summary


def format_table(summary):
    def pct(v):
        return "-" if v is None else str(round(100 * v) + 0)     # + 0: no "-0"
    m = "/".join(str(v) for v in summary["samples_per_query"]) or "-"
    lines = [f"strategy={summary['strategy']} form={summary['form']} M={m} per query. In %: own code = autonomous "
             f"rollouts that ran code; s*(code) = mean of s*(code|x) / share of queries with s*(code|x) > 1/2, over "
             f"solved queries. kept: training records, λ: those in the λ term (sft), cut: left out at the length limit",
             f"{'family':<12}{'n':>5}{'own code':>9}{'π(code)':>8}{'Q(code)':>8}{'Q(cot)':>7}   "
             f"{'s* posterior':>12}{'tempered':>10}{'argmax':>8}   {'kept':>5}{'λ':>5}{'code':>5}{'allok':>6}"
             f"{'allbad':>7}{'unsolved':>9}{'cut':>5}"]
    for family, row in summary["by_family"].items():
        share, queries = row["strategy_code_share"], row["queries_to_code"]
        forms = [f"{pct(share[f])}/{pct(queries[f])}" for f in FORMS]
        lines.append(f"{family:<12}{row['queries']:>5}{pct(row['unguided_code_share']):>9}{pct(row['pi_code']):>8}"
                     f"{pct(row['q_code']):>8}{pct(row['q_cot']):>7}   {forms[0]:>12}{forms[1]:>10}{forms[2]:>8}   "
                     f"{row['examples']:>5}{row['sft_examples']:>5}{pct(row['examples_code_share']):>5}"
                     f"{row['groups_all_correct']:>6}"
                     f"{row['groups_all_wrong']:>7}{row['queries_unsolved']:>9}{row['cut_at_length_limit']:>5}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the stage
def encode_hints(model_dir, hints):
    """The reflective hints ({target method: text}) as token ids, from the tokenizer of the model that
    will train on them."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # A hint follows a failed attempt's text, so it is encoded as the continuation of one (a SentencePiece tokenizer
    # would give a hint encoded on its own a leading space).
    context = tokenizer.encode("\\boxed{0}", add_special_tokens=False)
    hint_ids = {}
    for target, hint in hints.items():
        ids = encode_continuation(tokenizer, hint, context)
        if tokenizer.decode(context + ids) != tokenizer.decode(context) + hint:
            raise ValueError(f"the hint {hint!r} does not survive this tokenizer (characters outside its "
                             f"vocabulary?); pass another with --hint_to_{target}")
        hint_ids[target] = ids
    return hint_ids


def parse_args(argv=None):
    return flags.parse(__file__, globals(), argv, required=("rollouts", "out"),
                       choices={"strategy": ("em", "rl", "sft"), "form": FORMS, "pi_source": ("samples", "prob")})


def main(argv=None):
    args = parse_args(argv)
    config = vars(args)
    print("synthesize.py " + " ".join(f"--{k}={v!r}" if isinstance(v, str) else f"--{k}={v}"
                                      for k, v in config.items()))
    if args.reflect and not args.model:
        sys.exit("--reflect needs --model=DIR (its tokenizer encodes the hints)")
    rollouts = read_rollouts(args.rollouts)          # checked first: a bad file fails before anything else is done
    hints = {"code": args.hint_to_code, "cot": args.hint_to_cot}
    hint_ids = encode_hints(args.model, hints) if args.reflect else None

    by_query = defaultdict(list)
    for r in rollouts:
        by_query[r["query_id"]].append(r)

    results = []
    for query_id, group in tqdm(by_query.items(), desc="synthesize", unit="query"):
        rng = random.Random(f"{args.seed}:{query_id}")
        results.append(synthesize_query(group, args.strategy, args.form, args.alpha, args.code_cost,
                                        args.pi_source, args.pi_prior, args.samples_per_query,
                                        args.adv_eps, rng, args.reflect, hint_ids))

    records = [record for res in results for record in res.records]
    summary = summarize(results, args.strategy, args.form)
    # The sampling settings the rollouts were drawn under (one, unless files were mixed: train.py refuses that)
    summary["behaviour_sampling"] = [dict(zip(SAMPLING, values)) for values in
                                     sorted({tuple(r.get(key) for key in SAMPLING) for r in rollouts}, key=str)]
    summary["config"] = config
    table = format_table(summary)
    # Nothing is written until everything above has succeeded, and OUT last, under a temporary name and renamed: em.sh
    # takes an existing OUT for a finished stage. No training record (every group all wrong, say) is a result, not an
    # error: train.py then saves the model unchanged.
    write_json_atomic(args.out + ".summary.json", summary)
    write_jsonl_atomic(args.out, records)
    print(table)
    print(f"wrote {len(records)} training records to {args.out}"
          + ("" if records else " (no query gave one: train.py will save the model unchanged)"))


if __name__ == "__main__":
    main()

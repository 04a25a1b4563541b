"""
The evaluation stage: how often a model solves held-out problems, and whether it chose code well.

    python evaluate.py --model=DIR --data=FILE --mode=all --out=DIR [--n=0] [--max_new_tokens=512] ...
    python evaluate.py ... --samples=8 --temperature=0.7 [--top_p=1.0] [--seed=0]

Each problem is decoded greedily by the sampler, the code the model writes running mid-generation
in the sandbox, and the response is graded by grade.py. One prompt per mode:

    auto    autonomous: the model decides whether to write code (the behaviour the EM loop trains)
    code    guided by the prompt to solve it with code
    cot     guided by the prompt to reason in words
    all     the three, which adds selection accuracy

The paper's claims are two numbers per model: accuracy, and code rate (the share of solutions that
ran at least one code block); calls per problem, tool errors and response lengths come with them,
per mode and per family / difficulty / level / type. A third says whether the autonomous choice was
the right one: selection accuracy, against an oracle that takes CoT when CoT is correct (code costs
an execution) and code otherwise, over the problems where at least one forced mode is correct.
"auto" also reports p_code_open, the model's own probability of opening its response with code.

A greedy number is one draw of luck per problem. --samples=n with --temperature > 0 draws n
solutions per problem and mode instead, each seeded by a hash of (seed, problem id, mode, sample),
so a solution does not depend on its batch or on a resumed run. The summary then adds, per mode and
per breakdown: accuracy as the mean of per-problem accuracy with a 95% interval over problems,
pass@k (the unbiased estimator of Chen et al. 2021) and maj@k (majority vote over the extracted
answers, equivalent answers grouped by grade.is_equiv) for k = 1..n, and calls per solution.

One record per problem per mode (per sample: ids query_id:mode:sample when n > 1) in OUT/eval.jsonl,
the metrics in OUT/summary.json. Resumable: records go to eval.jsonl.partial and a rerun decodes only
what is missing; a finished eval.jsonl of other modes (or fewer samples) is extended, under the same
decoding settings only.

On n GPUs: --shard=i/n decodes the problems of index i mod n into OUT/shard<i>of<n>/ (one process per GPU, each
resumable as above), and --merge=n then joins the n finished shards into OUT as one process would have written it:

    CUDA_VISIBLE_DEVICES=i python evaluate.py ... --shard=i/n     # for i in 0..n-1, side by side (em.sh: SHARDS=n)
    python evaluate.py --out=DIR --merge=n
"""

import functools
import json
import math
import os
import sys

import types

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning, which otherwise steals the
# cores that the sandbox workers need to run the model's code.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from tqdm import tqdm

import flags
import sandbox
import task
from grade import grade, is_equiv
from jsonl import (JsonlAppender, check_prompt_fits, finalize, merge_shards, parse_shard, read_jsonl, read_queries,
                   read_shard_configs, row_seed, shard_name, shard_owners, take_shard, write_json_atomic,
                   write_jsonl_atomic)
from model import load
from sampler import code_open_probability, generate

# ----------------------------------------------------------------------------- hyperparameters
model = None             # an HF checkpoint dir, or the preset name "tiny" (random weights)
data = None              # a queries JSONL (problem/question + answer/solution/####); none: the embedded test split
mode = "all"             # auto (autonomous) | code | cot (guided) | all three, which adds selection_accuracy
out = "runs/eval"        # writes eval.jsonl, summary.json and eval_config.json here
n = 0                    # evaluate only the first n problems (0: all; the embedded split: 200)
samples = 1              # solutions per problem and mode; > 1 adds pass@k, maj@k and intervals to the summary
                         # (and needs --temperature > 0: greedy solutions would all be the same)
temperature = 0.0        # 0: greedy (the default evaluation); > 0: sampled, e.g. 0.7 with --samples=8
top_p = 1.0              # nucleus sampling when temperature > 0 (1.0: off)
seed = 0                 # with (problem id, mode, sample), determines each sampled solution
max_new_tokens = 512     # per response, injected tool output included
batch_size = 64          # rows decoded together (a row's tokens do not depend on its batch)
max_calls = 4            # code executions per response (ToRA's default)
tool_timeout = 5.0       # seconds per code execution
dtype = "auto"           # fp32 | bf16 | fp16 | auto (bf16 on a GPU, fp32 on the CPU)
device = "auto"          # cpu | cuda | auto
shard = "0/1"            # i/n: decode only the problems of index i mod n, into OUT/shard<i>of<n>/ (one process per GPU)
merge = 0                # n > 0: decode nothing, join the n finished shards of --out into OUT/eval.jsonl and summary.json
# ----------------------------------------------------------------------------- end of hyperparameters

MODE_ORDER = ("auto", "code", "cot")
BREAKDOWNS = ("family", "difficulty", "level", "type")
# What a record's tokens depend on: a run resumes, or extends, a file decoded under the same values only. A config
# written before a flag existed decoded as its default does.
DECODING = {"max_new_tokens": None, "max_calls": None, "temperature": 0.0, "top_p": 1.0, "seed": 0}
Z95 = 1.959964           # the normal quantile of a two-sided 95% interval


def record_id(query_id, mode, sample, samples):
    # n = 1 keeps the greedy ids of before, so a greedy file reads the same whatever the flags' history
    return f"{query_id}:{mode}" if samples == 1 else f"{query_id}:{mode}:{sample}"



# ----------------------------------------------------------------------------- the metrics
def _mean(values):
    values = list(values)
    return sum(values) / len(values) if values else None


def pass_at_k(n, c, k):
    """The chance that k of n solutions, c of them correct, drawn without replacement, hold a correct one:
    1 − C(n−c, k) / C(n, k), the unbiased estimator of Chen et al. 2021 (1 − (1 − c/n)^k is biased low)."""
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


@functools.lru_cache(maxsize=None)
def _equiv(a, b):
    return is_equiv(a, b)      # a problem's samples repeat their answers: each pair is graded once


def majority_votes(answers, correct):
    """Is the majority answer of the first k samples correct, for k = 1..n? A vote joins the first group whose
    first answer it is equivalent to (is_equiv: "1/2", "0.5" and "\\frac{1}{2}" are one answer), ties go to the
    group seen first, and a sample without an answer does not vote (none at all: wrong)."""
    groups, votes = [], []               # [index of the group's first answer, votes], in order of appearance
    for i, answer in enumerate(answers):
        if answer is not None:
            group = next((g for g in groups if _equiv(answer, answers[g[0]])), None)
            if group is None:
                groups.append([i, 1])
            else:
                group[1] += 1
        best = max(groups, key=lambda g: g[1], default=None)      # max keeps the first of equal counts
        votes.append(best is not None and bool(correct[best[0]]))
    return votes


def mean_interval(values):
    """The mean and its 95% interval, normal over problems: mean ± 1.96 s/√P, s the standard deviation of the
    per-problem accuracies. Over problems, not samples: a problem's n samples are not independent draws of the
    test set's difficulty. Clipped to [0, 1]; zero width when every problem scores the same (all solved, say),
    and [0, 1] with a single problem."""
    m = _mean(values)
    if len(values) < 2:
        return m, [0.0, 1.0]
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))
    half = Z95 * s / math.sqrt(len(values))
    return m, [max(0.0, m - half), min(1.0, m + half)]


def _per_problem(records):
    """{query_id: its records in sample order}: the unit that pass@k, maj@k and the intervals average over."""
    problems = {}
    for r in sorted(records, key=lambda r: r.get("sample", 0)):
        problems.setdefault(r["query_id"], []).append(r)
    return problems


def _sampled_metrics(problems):
    """The sampled fields of one group of problems (a mode, or a cell of a breakdown). maj@k votes over the first
    k samples, one subset of them, where pass@k averages over every subset of k: so maj@1 is the first sample's
    accuracy, a noisier number than pass@1 (the mean accuracy), and maj@k need not grow with k."""
    n = min(len(s) for s in problems.values())
    accuracy, interval = mean_interval([_mean(bool(r["correct"]) for r in s) for s in problems.values()])
    votes = [majority_votes([r.get("answer") for r in s], [r["correct"] for r in s]) for s in problems.values()]
    return {
        "accuracy": accuracy, "accuracy_ci95": interval, "problems": len(problems), "samples": n,
        # str keys: the summary reads back from JSON as it was written
        "pass_at_k": {str(k): _mean(pass_at_k(len(s), sum(bool(r["correct"]) for r in s), k)
                                    for s in problems.values()) for k in range(1, n + 1)},
        "maj_at_k": {str(k): _mean(v[k - 1] for v in votes) for k in range(1, n + 1)},
        "calls_per_problem": _mean(r["calls"] for s in problems.values() for r in s),    # per solution
    }


def _mode_summary(records, sampled):
    statuses = [s for r in records for s in r.get("statuses", [])]
    summary = {
        "accuracy": _mean(bool(r["correct"]) for r in records),
        "code_rate": _mean(r["calls"] >= 1 for r in records),         # solutions that ran >= 1 code block
        "calls_per_problem": _mean(r["calls"] for r in records),
        "tool_error_rate": _mean(s != "ok" for s in statuses) if statuses else 0.0,  # of the executions
        "mean_response_tokens": _mean(r.get("response_tokens", 0) for r in records),
        "n": len(records),
    }
    if sampled:
        summary.update(_sampled_metrics(_per_problem(records)))
    if any("p_code_open" in r for r in records):
        summary["p_code_open"] = _mean(r["p_code_open"] for r in records if "p_code_open" in r)
    for key in BREAKDOWNS:
        groups = {}
        for r in records:
            if r.get(key) is not None:
                groups.setdefault(str(r[key]), []).append(r)
        if groups:
            summary[f"by_{key}"] = {}
            for value, members in sorted(groups.items()):
                cell = {"accuracy": _mean(bool(r["correct"]) for r in members),
                        "code_rate": _mean(r["calls"] >= 1 for r in members), "n": len(members)}
                if sampled:
                    cell.update(_sampled_metrics(_per_problem(members)))
                if "p_code_open" in summary:
                    cell["p_code_open"] = _mean(r["p_code_open"] for r in members if "p_code_open" in r)
                summary[f"by_{key}"][value] = cell
    return summary


def selection_accuracy(auto_records, code_records, cot_records):
    """Did the autonomous run choose as an oracle would, which takes CoT when CoT is correct and code
    otherwise? Only the problems that a forced mode solves count. Returns (selection accuracy,
    problems counted, oracle accuracy, {family: selection accuracy}); an accuracy is None when
    nothing counts.
    With samples, a forced mode "is correct" on a problem when more than half of its samples are (greedy: its one
    answer), and every auto sample is scored against that oracle: a problem counts the share of its samples that
    chose as the oracle would, and the accuracy is the mean over problems."""
    forced = {m: _per_problem(records) for m, records in (("code", code_records), ("cot", cot_records))}
    right, counted, solvable, per_family = 0.0, 0, 0, {}
    for query_id, auto in _per_problem(auto_records).items():
        code, cot = forced["code"].get(query_id), forced["cot"].get(query_id)
        if code is None or cot is None:
            continue
        solvable += 1
        code_correct, cot_correct = (_mean(bool(r["correct"]) for r in s) > 0.5 for s in (code, cot))
        if not (code_correct or cot_correct):
            continue
        oracle_codes = not cot_correct      # CoT when CoT is correct (no execution cost), else code
        chose_right = _mean((r["calls"] >= 1) == oracle_codes for r in auto)
        right, counted = right + chose_right, counted + 1
        cell = per_family.setdefault(str(auto[0].get("family")), [0.0, 0])
        cell[0], cell[1] = cell[0] + chose_right, cell[1] + 1
    return (right / counted if counted else None, counted, counted / solvable if solvable else None,
            {family: family_right / family_counted for family, (family_right, family_counted) in per_family.items()})


def summarize(records):
    """{mode: metrics} for the modes present in eval records (the em.sh summary reuses this).
    With all three modes, "auto" also gets selection_accuracy (and per family), selection_n and
    oracle_accuracy (a forced method solves it: the best any choice could do). Records of several
    samples per problem (a "sample" field) add the sampled metrics."""
    by_mode = {}
    for r in records:
        by_mode.setdefault(r["mode"], []).append(r)
    sampled = any("sample" in r for r in records)
    summary = {m: _mode_summary(by_mode[m], sampled) for m in MODE_ORDER if m in by_mode}
    if all(m in by_mode for m in MODE_ORDER):
        auto = summary["auto"]
        auto["selection_accuracy"], auto["selection_n"], auto["oracle_accuracy"], per_family = selection_accuracy(
            by_mode["auto"], by_mode["code"], by_mode["cot"])
        for family, accuracy in per_family.items():
            if family in auto.get("by_family", {}):
                auto["by_family"][family]["selection_accuracy"] = accuracy
    return summary


def print_table(summary):
    pct = lambda x: "    -" if x is None else f"{100 * x:5.1f}"
    print(f"{'mode':<6}{'acc%':>7}{'code%':>7}{'calls':>7}{'toolerr%':>9}{'tokens':>8}{'n':>6}"
          f"{'p_code%':>9}{'select%':>9}")
    for m, s in summary.items():
        print(f"{m:<6}{pct(s['accuracy']):>7}{pct(s['code_rate']):>7}{s['calls_per_problem']:>7.2f}"
              f"{pct(s['tool_error_rate']):>9}{s['mean_response_tokens']:>8.1f}{s['n']:>6}"
              f"{pct(s.get('p_code_open')):>9}{pct(s.get('selection_accuracy')):>9}")
    families = sorted({f for s in summary.values() for f in s.get("by_family", {})})
    if families:
        print(f"\n{'family':<14}" + "".join(f"{m + ' acc/code%':>20}" for m in summary) + f"{'p_code%':>9}")
        for f in families:
            cells = []
            for m, s in summary.items():
                c = s.get("by_family", {}).get(f)
                cells.append(f"{pct(c['accuracy']).strip()}/{pct(c['code_rate']).strip()}" if c else "-")
            p = summary.get("auto", {}).get("by_family", {}).get(f, {}).get("p_code_open")
            print(f"{f:<14}" + "".join(f"{c:>20}" for c in cells) + f"{pct(p):>9}")


def print_sampled_table(summary):
    """The sampled metrics: per mode, accuracy with its interval, pass@k and maj@k; per family, the ends."""
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}"
    n = min(s["samples"] for s in summary.values())
    ks = [str(k) for k in range(1, n + 1)]
    print(f"\n{n} samples per problem and mode; acc% = mean per-problem accuracy, 95% normal interval over problems")
    print(f"{'mode':<6}{'acc%':>7}{'95% interval':>15}{'code%':>7}{'calls':>7}{'problems':>9}   "
          + "".join(f"{'pass@' + k:>8}" for k in ks))
    for m, s in summary.items():
        low, high = s["accuracy_ci95"]
        print(f"{m:<6}{pct(s['accuracy']):>7}{f'[{pct(low)}, {pct(high)}]':>15}{pct(s['code_rate']):>7}"
              f"{s['calls_per_problem']:>7.2f}{s['problems']:>9}   "
              + "".join(f"{pct(s['pass_at_k'].get(k)):>8}" for k in ks))
    print(f"{'':<54}" + "".join(f"{'maj@' + k:>8}" for k in ks))
    for m, s in summary.items():
        print(f"{m:<54}" + "".join(f"{pct(s['maj_at_k'].get(k)):>8}" for k in ks))
    families = sorted({f for s in summary.values() for f in s.get("by_family", {})})
    if families:
        print(f"\n{'family':<14}" + "".join(f"{m + f' acc/pass@{n}/maj@{n}/code%':>30}" for m in summary))
        for f in families:
            cells = []
            for m, s in summary.items():
                c = s.get("by_family", {}).get(f)
                cells.append("/".join(pct(v) for v in (c["accuracy"], c["pass_at_k"].get(str(n)),
                                                       c["maj_at_k"].get(str(n)), c["code_rate"])) if c else "-")
            print(f"{f:<14}" + "".join(f"{c:>30}" for c in cells))


# ----------------------------------------------------------------------------- the stage
def _decode(net, tokenizer, batch, batch_prompts, tool, args):
    """Responses to one batch of (query, mode, sample), graded: their eval records, in batch order."""
    seeds = [row_seed(args.seed, q["id"], m, j) for q, m, j in batch]
    responses = generate(net, batch_prompts, args.max_new_tokens, temperature=args.temperature,
                         top_p=args.top_p, seed=seeds, tokenizer=tokenizer, tool=tool,
                         max_calls=args.max_calls)
    # p_code_open depends on the prompt only: once per distinct auto prompt, given to each of its samples
    auto_prompts = {tuple(p): None for (_, m, _), p in zip(batch, batch_prompts) if m == "auto"}
    if auto_prompts:
        with torch.inference_mode():
            auto_prompts = dict(zip(auto_prompts, code_open_probability(net, tokenizer, list(auto_prompts))))
    for (q, m, j), prompt, response, seed in zip(batch, batch_prompts, responses, seeds):
        answer, correct = grade(response.text, q["answer"])
        record = {"id": record_id(q["id"], m, j, args.samples), "query_id": q["id"], "mode": m,
                  "problem": q["problem"], "response": response.text, "answer": answer, "gold": q["answer"],
                  "correct": correct, "calls": response.calls, "statuses": list(response.statuses),
                  "finish_reason": response.finish_reason, "response_tokens": len(response.tokens),
                  "sampled_tokens": int(sum(response.sampled_mask))}
        if args.samples > 1:
            record.update({"sample": j, "seed": seed})
        record.update({key: q[key] for key in BREAKDOWNS if q.get(key) is not None})
        if m == "auto":
            record["p_code_open"] = auto_prompts[tuple(prompt)]
        yield record


def check_resumable(out, args):
    """Records are resumed or extended only under the decoding settings that produced them: otherwise one file,
    and its summary, would mix two distributions. The seed matters only when sampling."""
    config_path = os.path.join(out, "eval_config.json")
    if not os.path.exists(config_path):
        return
    with open(config_path) as f:
        previous = json.load(f)
    keys = [key for key in DECODING if key != "seed" or args.temperature > 0]
    changed = [f"--{key} {previous.get(key, DECODING[key])!r} -> {getattr(args, key)!r}" for key in keys
               if previous.get(key, DECODING[key]) != getattr(args, key)]
    if changed:
        sys.exit(f"evaluate.py: {out} holds records decoded with other settings ({'; '.join(changed)}): use "
                 f"another --out, the same settings, or delete it")


def read_problems(args):
    """The run's problems: --data (or the embedded test split), its first --n."""
    queries = read_queries(args.data) if args.data else task.make_problems(args.n or 200, "test")
    return queries[:args.n] if args.n else queries


def solution_rows(queries, args):
    """(problem, mode, sample) of every solution of the run, mode by mode."""
    modes = list(MODE_ORDER) if args.mode == "all" else [args.mode]
    return [(q, m, j) for m in modes for q in queries for j in range(args.samples)]


def encode_prompts(tokenizer, rows, context):
    """{(problem id, mode): the prompt's token ids} of the run's rows, each checked against the model's context as
    soon as it is encoded (jsonl.check_prompt_fits): an oversized problem stops the run there, named by its id and
    line, before any forward pass (explore.encode_prompts says why it is tokenized, not bounded by its length)."""
    prompts = {}
    for q, m, _ in rows:
        if (q["id"], m) not in prompts:
            prompts[q["id"], m] = task.encode_prompt(tokenizer, q["problem"], m)
            check_prompt_fits(q, m, prompts[q["id"], m], context)
    return prompts


def evaluate(args):
    shard = parse_shard(args.shard)
    if shard[1] > 1:             # a dir of its own: a shard resumes, and extends, like a whole run
        args.out = os.path.join(args.out, shard_name(shard))
    # read and checked first (an empty file, a duplicate id): a bad input fails before anything is written
    rows = solution_rows(take_shard(read_problems(args), shard), args)
    wanted = {record_id(q["id"], m, j, args.samples) for q, m, j in rows}

    final = os.path.join(args.out, "eval.jsonl")
    partial = final + ".partial"
    if os.path.exists(final) or os.path.exists(partial):
        check_resumable(args.out, args)
    complete = os.path.exists(final) and wanted <= {str(r["id"]) for r in read_jsonl(final)}
    if not complete:
        on_gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        device = "cuda" if on_gpu else "cpu"
        dtype = args.dtype if args.dtype != "auto" else ("bf16" if on_gpu else "fp32")
        net, tokenizer = load(args.model, dtype=dtype, device=device)
        # Every prompt of the run, checked before anything is written (and before a finished file is reopened)
        prompts = encode_prompts(tokenizer, rows, net.config.max_position_embeddings)
        if os.path.exists(final):
            os.replace(final, partial)   # a complete run of other modes: extend it
        os.makedirs(args.out, exist_ok=True)
        write_json_atomic(os.path.join(args.out, "eval_config.json"), vars(args))
        tool = lambda responses: sandbox.tool(responses, timeout=args.tool_timeout)
        appender = JsonlAppender(partial)
        todo = [(q, m, j) for q, m, j in rows if record_id(q["id"], m, j, args.samples) not in appender.done_ids]
        # Similar lengths batched together: less padding (a row's tokens do not depend on its batch). The sort is
        # stable, so a problem's samples stay side by side and share one prefill.
        todo.sort(key=lambda row: (MODE_ORDER.index(row[1]), len(prompts[row[0]["id"], row[1]])))
        progress = tqdm(total=len(todo), desc=f"evaluate {args.mode}", unit="solution")
        for start in range(0, len(todo), args.batch_size):
            batch = todo[start:start + args.batch_size]
            batch_prompts = [prompts[q["id"], m] for q, m, _ in batch]
            for record in _decode(net, tokenizer, batch, batch_prompts, tool, args):
                appender.write(record)
            progress.update(len(batch))
        progress.close()
        appender.close()
        finalize(partial, final)
    records = [r for r in read_jsonl(final) if str(r["id"]) in wanted]
    summary = summarize(records)
    write_json_atomic(os.path.join(args.out, "summary.json"), summary)
    print_table(summary)
    if args.samples > 1:
        print_sampled_table(summary)
    print(f"wrote {final} and {os.path.join(args.out, 'summary.json')}")
    return summary


def merge_run(out, n):
    """Join the n finished shards of OUT into OUT/eval.jsonl, eval_config.json and summary.json, as one process
    would have written them (the records problem by problem, not in its length-sorted batch order)."""
    shards = [os.path.join(out, shard_name((i, n))) for i in range(n)]
    config = read_shard_configs([os.path.join(shard, "eval_config.json") for shard in shards])
    args = types.SimpleNamespace(**config)
    queries = read_problems(args)
    owner = shard_owners(queries, n, [(q["id"], record_id(q["id"], m, j, args.samples))
                                      for q, m, j in solution_rows(queries, args)])
    records = merge_shards([os.path.join(shard, "eval.jsonl") for shard in shards], owner)
    summary = summarize(records)
    write_json_atomic(os.path.join(out, "eval_config.json"), {**config, "out": out, "shard": "0/1"})
    write_jsonl_atomic(os.path.join(out, "eval.jsonl"), records)
    write_json_atomic(os.path.join(out, "summary.json"), summary)    # last: em.sh's mark of a finished stage
    print_table(summary)
    if args.samples > 1:
        print_sampled_table(summary)
    print(f"merged {n} shards: {len(records)} records to {os.path.join(out, 'eval.jsonl')}")
    return summary


def main(argv=None):
    args = flags.parse(__file__, globals(), argv, choices={
        "mode": ("auto", "code", "cot", "all"), "dtype": ("auto", "fp32", "bf16", "fp16"),
        "device": ("auto", "cpu", "cuda")})
    if args.merge:
        return merge_run(args.out, args.merge)
    if not args.model:
        sys.exit("evaluate.py: --model is required")
    if args.samples < 1:
        sys.exit("evaluate.py: --samples must be >= 1")
    if args.samples > 1 and args.temperature <= 0:
        sys.exit("evaluate.py: --samples > 1 needs --temperature > 0 (greedy solutions would all be the same)")
    print("evaluate.py: " + " ".join(f"{k}={v}" for k, v in vars(args).items()))
    return evaluate(args)


if __name__ == "__main__":
    main()

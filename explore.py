"""
The E-step, part 1: self-exploration.

The model cannot learn when to code from its own autonomous samples alone: a model that seldom codes
unprompted seldom finds out where code would have helped. So for every query x we draw rollouts of
three kinds (README, How it works):

    K guided to code   y ~ π(·|x, code)   the samples behind Q(x, code) = E[r(y)]
    K guided to CoT    y ~ π(·|x, cot)    the samples behind Q(x, cot)
    K autonomous           y ~ π(·|x)         the samples behind π(c|x), the model's own propensity

Each rollout is generated with the sandbox as the tool (code runs mid-generation), graded against
the gold answer, and written as one JSONL record; synthesize.py turns them into training data. Each
record names the distribution its tokens were drawn from (temperature, top_p, top_k): its behaviour
log-probs are log-probs under that distribution, and train.py evaluates π_θ at the same temperature.

    python explore.py --model=DIR --queries=FILE --out=rollouts.jsonl [--k=4] [--modes=code,cot,auto]
           [--temperature=1.0] [--top_p=1.0] [--top_k=0] [--dtype=auto] [--batch_size=384] [--seed=0] ...

Resumable: records go to OUT.partial, one flushed line each; a rerun skips the ids already there
and draws only the missing (query_id, mode, k). Each row's seed is a hash of (--seed, query id,
mode, k), and a row's tokens depend only on its prompt and its seed, so a rerun draws exactly the
rollouts the killed run would have. Complete, the file is renamed to OUT; the hyperparameters are in
OUT.config.json and the per-mode summary in OUT.summary.json.

On n GPUs: one process per GPU, each drawing the queries of index i mod n into OUT.shard<i>of<n> (resumable
the same way), then a merge that checks every shard finished and writes OUT as one process would have:

    CUDA_VISIBLE_DEVICES=i python explore.py ... --shard=i/n      # for i in 0..n-1, side by side (em.sh: SHARDS=n)
    python explore.py --out=rollouts.jsonl --merge=n
"""
import functools
import json
import os
import sys
import time

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning, which otherwise steals the
# cores that the sandbox workers need (their code executions run beside the sampler on the same CPUs).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from tqdm import tqdm

import flags
import sandbox
import task
from grade import grade
from jsonl import (JsonlAppender, check_prompt_fits, finalize, merge_shards, parse_shard, read_jsonl, read_queries,
                   read_shard_configs, row_seed, shard_name, shard_owners, take_shard, write_json_atomic,
                   write_jsonl_atomic)
from model import DTYPES, load
from sampler import code_open_probability, generate

# ----------------------------------------------------------------------------- hyperparameters
model = ""                 # HF checkpoint dir (or 'tiny' for a random preset); required
queries = ""               # JSONL queries (problem/question + answer/solution); required
out = ""                   # rollouts JSONL; required
k = 4                      # rollouts per query per mode (paper: 5 in v1, 8 in v3)
modes = "code,cot,auto"    # guided to code, guided to CoT, autonomous
temperature = 1.0          # sampling temperature; stored in every record, train.py evaluates π_θ at it
top_p = 1.0                # nucleus sampling (1.0: off); the behaviour log-probs are those of the distribution
                           # sampled from, softmax(logits / T) renormalised over the kept tokens
top_k = 0                  # top-k sampling (0: off); likewise
max_new_tokens = 192       # per rollout, injected tool output included (the embedded task's solutions are < 100)
max_calls = 4              # code executions per rollout; then a notice, then the row ends
batch_size = 384           # rows per generate call: all modes of batch_size / (3K) queries at once
seed = 0                   # with (query id, mode, k), determines each rollout
n = 0                      # use only the first n queries (0: all)
tool_timeout = 5.0         # seconds per code execution
tool_memory_mb = 1024      # address-space limit per code execution
tool_workers = 0           # concurrent code executions (0: the sandbox's default)
tool_cache = 1             # run each distinct program once per explore run (see cached_tool)
p_code_open = 1            # also record the model's probability of opening a ```python block unprompted
dtype = "auto"             # auto | fp32 | bf16 | fp16; auto: bf16 on CUDA, fp32 on the CPU, as evaluate.py, and
                           # as train.py computes on CUDA (bf16 autocast), so that ρ ≈ 1 at θ = θ_b
device = "auto"            # auto: cuda when available, else cpu
threads = 0                # torch threads (0: torch's default)
shard = "0/1"              # i/n: draw only the queries of index i mod n, into OUT.shard<i>of<n> (one process per GPU)
merge = 0                  # n > 0: draw nothing, join the n finished shards of --out into OUT and OUT.summary.json
# ----------------------------------------------------------------------------- end of hyperparameters

COPIED_FIELDS = ("family", "difficulty", "level", "type")


# ----------------------------------------------------------------------------- the rows to draw
def rollout_id(query_id, mode, k):
    return f"{query_id}:{mode}:{k}"


def pending_rows(queries, modes, k, done_ids):
    """(query, mode, k) still to draw, query by query so one generate batch holds all modes of its queries."""
    return [(query, mode, j) for query in queries for mode in modes for j in range(k)
            if rollout_id(query["id"], mode, j) not in done_ids]


def chunks(items, size):
    for start in range(0, len(items), size):
        yield items[start:start + size]


# ----------------------------------------------------------------------------- the tool
def cached_tool(tool_timeout, tool_memory_mb, tool_workers):
    """sandbox.tool, remembering each program's (output, status) for the rest of the run. The K rollouts of a
    query often write the same program (and its autonomous rollouts too): each distinct program then runs once.
    The program is all the cells replayed for the last one, so a hit is the same computation; only code that
    reads a clock or an unseeded RNG could differ between two runs. A sandbox failure is never remembered."""
    memo, counts = {}, {"executed": 0, "remembered": 0}

    def tool(responses):
        programs = [sandbox.program_for_cells(sandbox.extract_cells(text)) for text in responses]
        first_asker = {}
        for text, program in zip(responses, programs):
            if program not in memo:
                first_asker.setdefault(program, text)
        fresh = dict(zip(first_asker, sandbox.tool(list(first_asker.values()), timeout=tool_timeout,
                                                   memory_mb=tool_memory_mb, workers=tool_workers)))
        memo.update({p: result for p, result in fresh.items() if result[1] != "sandbox_error"})
        counts["executed"] += len(fresh)
        counts["remembered"] += len(programs) - len(fresh)
        return [fresh.get(p) or memo[p] for p in programs]

    tool.counts = counts
    return tool


# ----------------------------------------------------------------------------- one batch of rollouts
def explore_batch(model, tokenizer, rows, prompt_ids, args, tool, p_code_open=None):
    """Generate, grade and build the records of one batch of rows. p_code_open: {query id: the model's probability
    of opening a code block unprompted}, or None."""
    samples = generate(
        model, [prompt_ids[(query["id"], mode)] for query, mode, _ in rows], args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        seed=[row_seed(args.seed, query["id"], mode, j) for query, mode, j in rows],
        tokenizer=tokenizer, tool=tool, max_calls=args.max_calls)   # EOS: the model's own (config + generation_config)
    records = []
    for (query, mode, j), sample in zip(rows, samples):
        answer, correct = grade(sample.text, query["answer"])   # r(y) ∈ {0, 1}
        record = {"id": rollout_id(query["id"], mode, j), "query_id": query["id"], "mode": mode, "k": j}
        record.update({f: query[f] for f in COPIED_FIELDS if f in query})
        record.update({
            "gold": query["answer"],
            "prompt": task.make_prompt(tokenizer, query["problem"], mode),
            "prompt_ids": prompt_ids[(query["id"], mode)],
            "auto_prompt_ids": prompt_ids[(query["id"], "auto")],   # what synthesize.py trains on
            "response": sample.text,
            "response_ids": sample.tokens,
            "sampled_mask": sample.sampled_mask,
            "behaviour_logprobs": sample.logprobs,
            "calls": sample.calls,
            "statuses": sample.statuses,
            "answer": answer,
            "correct": bool(correct),
            "finish_reason": sample.finish_reason,
            "seed": row_seed(args.seed, query["id"], mode, j),
            # The behaviour policy π_b: the distribution behaviour_logprobs are taken under. train.py evaluates
            # π_θ at this temperature and refuses records of another one.
            "temperature": args.temperature,
            "top_p": args.top_p,
            "top_k": args.top_k,
        })
        if p_code_open:
            record["p_code_open"] = p_code_open[query["id"]]
        records.append(record)
    return records


# ----------------------------------------------------------------------------- the summary
def summarize(records, modes):
    """Per mode: accuracy, code rate (rollouts that ran ≥ 1 block), tool error rate (executions whose status
    is not ok), and the groups (a query's K rollouts of one mode) where every rollout got the same reward:
    the ones that give the RL term nothing to compare."""
    summary = {}
    for mode in modes:
        rows = [r for r in records if r["mode"] == mode]
        if not rows:
            continue
        groups = {}
        for r in rows:
            groups.setdefault(r["query_id"], []).append(r["correct"])
        statuses = [s for r in rows for s in r["statuses"]]
        summary[mode] = {
            "rollouts": len(rows),
            "accuracy": sum(r["correct"] for r in rows) / len(rows),
            "code_rate": sum(r["calls"] > 0 for r in rows) / len(rows),
            "calls_per_rollout": len(statuses) / len(rows),
            "tool_error_rate": sum(s != "ok" for s in statuses) / len(statuses) if statuses else 0.0,
            "groups": len(groups),
            "groups_all_correct": sum(all(g) for g in groups.values()),
            "groups_all_wrong": sum(not any(g) for g in groups.values()),
            "mean_response_tokens": sum(len(r["response_ids"]) for r in rows) / len(rows),
            "finish_reasons": {f: sum(r["finish_reason"] == f for r in rows)
                               for f in sorted({r["finish_reason"] for r in rows})},
        }
    return summary


def format_summary(summary):
    lines = []
    for mode, s in summary.items():
        lines.append(f"{mode:>5}: accuracy {s['accuracy']:6.1%}  code rate {s['code_rate']:6.1%}  "
                     f"tool errors {s['tool_error_rate']:6.1%}  same-reward groups {s['groups_all_correct']} "
                     f"all correct + {s['groups_all_wrong']} all wrong of {s['groups']}  "
                     f"({s['rollouts']} rollouts, {s['mean_response_tokens']:.0f} tokens each)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the stage
SAMPLING_KEYS = ("model", "queries", "k", "modes", "temperature", "top_p", "top_k", "max_new_tokens", "max_calls",
                 "seed", "dtype")


def check_resumable(out, config):
    """A partial file is resumed only under the settings that drew it: otherwise one file would mix rollouts of
    two distributions (and a resumed run would no longer equal an uninterrupted one)."""
    previous_path = out + ".config.json"
    if not (os.path.exists(out + ".partial") and os.path.exists(previous_path)):
        return
    with open(previous_path) as f:
        previous = json.load(f)
    changed = [f"--{key} {previous.get(key)!r} -> {config[key]!r}" for key in SAMPLING_KEYS
               if previous.get(key) != config[key]]
    if changed:
        sys.exit(f"{out}.partial was drawn with other settings ({'; '.join(changed)}): rerun with the same ones, "
                 f"or delete it to start over")


def parse_args(argv=None):
    args = flags.parse(__file__, globals(), argv, choices={"dtype": ("auto", "fp32", "bf16", "fp16")})
    missing = [f"--{key}" for key in (("out",) if args.merge else ("model", "queries", "out")) if not getattr(args, key)]
    if missing:
        sys.exit(f"explore.py: {', '.join(missing)} required")
    parse_shard(args.shard)    # a malformed --shard is refused before anything loads
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for mode in args.modes:
        if mode not in task.MODES:
            sys.exit(f"explore.py: --modes: {mode!r} is not one of {', '.join(task.MODES)}")
    if args.temperature <= 0:
        sys.exit("explore.py: --temperature must be > 0: exploration samples (greedy rollouts would all be the same)")
    # Resolved before the config is written: a partial file drawn in bf16 on a GPU is then never resumed in
    # fp32 on a CPU (check_resumable compares the resolved dtype).
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype == "auto":
        args.dtype = "bf16" if args.device.startswith("cuda") else "fp32"
    return args


def first_queries(path, n):
    """The queries of the file at path, the first n of them (0: all)."""
    queries = read_queries(path)
    return queries[:n] if n else queries


def encode_prompts(tokenizer, queries, modes, context):
    """{(query id, mode): the prompt's token ids} for every query in every mode, each checked against the model's
    context as soon as it is encoded (jsonl.check_prompt_fits): an oversized query stops the run there, named by its
    id and line, after one tokenization of it. The prompt's characters are no safe bound on its tokens (the tiny
    tokenizer drops the characters outside its vocabulary, a normaliser can drop others), so it is tokenized."""
    prompt_ids = {}
    for query in queries:
        for mode in modes:
            ids = task.encode_prompt(tokenizer, query["problem"], mode)
            check_prompt_fits(query, mode, ids, context)
            prompt_ids[(query["id"], mode)] = ids
    return prompt_ids


def merge_run(out, n):
    """Join the n finished shards of OUT into OUT, OUT.config.json and OUT.summary.json: what one process would have
    written, rollout by rollout in query order."""
    if os.path.exists(out):
        print(f"{out} is complete; nothing to do (delete it to merge again)")
        return
    shards = [f"{out}.{shard_name((i, n))}" for i in range(n)]
    config = read_shard_configs([shard + ".config.json" for shard in shards])
    queries, modes = first_queries(config["queries"], config["n"]), config["modes"].split(",")
    owner = shard_owners(queries, n, [(q["id"], rollout_id(q["id"], mode, j))
                                      for q, mode, j in pending_rows(queries, modes, config["k"], set())])
    records = merge_shards(shards, owner)
    summary = summarize(records, modes)
    shard_summaries = []
    for shard in shards:
        with open(shard + ".summary.json") as f:
            shard_summaries.append(json.load(f))
    executions = [s["tool_executions_this_run"] for s in shard_summaries]
    write_json_atomic(out + ".summary.json", {
        **summary,
        "seconds_this_run": max(s["seconds_this_run"] for s in shard_summaries),   # side by side: the slowest
        # each shard keeps its own memo: their executions add up
        "tool_executions_this_run": None if None in executions else {key: sum(e[key] for e in executions)
                                                                      for key in executions[0]}})
    write_json_atomic(out + ".config.json", {**config, "out": out, "shard": "0/1"})
    write_jsonl_atomic(out, records)        # last: a complete OUT means the stage is done
    print(format_summary(summary))
    print(f"merged {n} shards: {len(records)} rollouts to {out}")


def main(argv=None):
    args = parse_args(argv)
    if args.merge:
        return merge_run(args.out, args.merge)
    shard = parse_shard(args.shard)
    if shard[1] > 1:           # a file of its own (and its own .partial, .config.json): a shard resumes like a run
        args.out = f"{args.out}.{shard_name(shard)}"
    config = {**vars(args), "modes": ",".join(args.modes)}
    print("explore.py " + " ".join(f"--{key}={value}" for key, value in config.items()))
    if os.path.exists(args.out):
        print(f"{args.out} is complete; nothing to do (delete it to explore again)")
        return
    check_resumable(args.out, config)
    if args.threads:
        torch.set_num_threads(args.threads)

    # The input is read and checked before anything is written or drawn: an empty file or a duplicate id is refused
    # here, and a prompt too long for the model right after it is encoded, before any forward pass.
    queries = take_shard(first_queries(args.queries, args.n), shard)
    net, tokenizer = load(args.model, dtype=DTYPES[args.dtype], device=args.device)
    # The prompts of every query in every mode, and always the autonomous one: it replaces the guidance
    # in training (synthesize.py), so every record carries it.
    prompt_ids = encode_prompts(tokenizer, queries, list(dict.fromkeys([*args.modes, "auto"])),
                                net.config.max_position_embeddings)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_json_atomic(args.out + ".config.json", config)
    if args.tool_cache:
        tool = cached_tool(args.tool_timeout, args.tool_memory_mb, args.tool_workers or None)
    else:
        tool = functools.partial(sandbox.tool, timeout=args.tool_timeout, memory_mb=args.tool_memory_mb,
                                 workers=args.tool_workers or None)

    partial = args.out + ".partial"
    start = time.time()
    with JsonlAppender(partial) as out:
        rows = pending_rows(queries, args.modes, args.k, out.done_ids)
        print(f"{len(queries)} queries × {len(args.modes)} modes × K={args.k}: {len(rows)} rollouts to draw"
              + (f" ({len(out.done_ids)} already in {partial})" if out.done_ids else ""))
        with tqdm(total=len(rows), desc="explore", unit="rollout") as bar:
            for batch in chunks(rows, args.batch_size):
                p_code_open = None
                if args.p_code_open:
                    # Deterministic given the model and the prompt, so a resumed run recomputes the same value.
                    query_ids = list(dict.fromkeys(query["id"] for query, _, _ in batch))
                    probs = code_open_probability(net, tokenizer, [prompt_ids[(q, "auto")] for q in query_ids])
                    p_code_open = dict(zip(query_ids, probs))
                for record in explore_batch(net, tokenizer, batch, prompt_ids, args, tool, p_code_open):
                    out.write(record)
                bar.update(len(batch))
    elapsed = time.time() - start

    records = read_jsonl(partial)
    summary = summarize(records, args.modes)
    executions = getattr(tool, "counts", None)
    write_json_atomic(args.out + ".summary.json",
                           {**summary, "seconds_this_run": elapsed, "tool_executions_this_run": executions})
    finalize(partial, args.out)
    print(format_summary(summary))
    if executions:
        print(f"tool: {executions['executed']} programs executed, {executions['remembered']} calls answered "
              f"from the run's memo")
    print(f"wrote {len(records)} rollouts to {args.out} in {elapsed:.0f} s")


if __name__ == "__main__":
    main()

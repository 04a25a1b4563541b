"""
The evaluation stage: how often a model solves held-out problems, and whether it chose code well.

    python evaluate.py --model=DIR --data=FILE --mode=all --out=DIR [--n=0] [--max_new_tokens=512] ...

Each problem is decoded greedily by the sampler, the code the model writes running mid-generation
in the sandbox, and the response is graded by grade.py. One prompt per mode:

    auto    unguided: the model decides whether to write code (the behaviour the EM loop trains)
    code    guided by the prompt to solve it with code
    cot     guided by the prompt to reason in words
    all     the three, which adds selection accuracy

The paper's claims are two numbers per model: accuracy, and code rate (the share of solutions that
ran at least one code block); calls per problem, tool errors and response lengths come with them,
per mode and per family / difficulty / level / type. A third says whether the unguided choice was
the right one: selection accuracy, against an oracle that takes CoT when CoT is correct (code costs
an execution) and code otherwise, over the problems where at least one forced mode is correct.
"auto" also reports p_code_open, the model's own probability of opening its response with code.

One record per problem per mode in OUT/eval.jsonl, the metrics in OUT/summary.json. Resumable:
records go to eval.jsonl.partial and a rerun decodes only what is missing; a finished eval.jsonl of
other modes is extended.
"""

import os

import flags
from grade import grade

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning, which otherwise steals the
# cores that the sandbox workers need to run the model's code.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# ----------------------------------------------------------------------------- hyperparameters
model = None             # an HF checkpoint dir, or the preset name "tiny" (random weights)
data = None              # a queries JSONL (problem/question + answer/solution/####); none: the embedded test split
mode = "all"             # auto (unguided) | code | cot (guided) | all three, which adds selection_accuracy
out = "runs/eval"        # writes eval.jsonl, summary.json and eval_config.json here
n = 0                    # evaluate only the first n problems (0: all; the embedded split: 200)
max_new_tokens = 512     # per response, injected tool output included
batch_size = 64          # rows decoded together (greedy rows do not depend on their batch)
max_calls = 4            # code executions per response (ToRA's default)
tool_timeout = 5.0       # seconds per code execution
dtype = "auto"           # fp32 | bf16 | fp16 | auto (bf16 on a GPU, fp32 on the CPU)
device = "auto"          # cpu | cuda | auto
# ----------------------------------------------------------------------------- end of hyperparameters

MODE_ORDER = ("auto", "code", "cot")
CODE_OPEN = "```python"      # "the response starts with a code block"
BREAKDOWNS = ("family", "difficulty", "level", "type")


def code_open_probability(net, prompts, open_ids):
    """π(code | x) as the model states it: the probability that the response to each prompt starts
    with the tokens of "```python", by teacher forcing: exp(Σ_j log p(open_j | prompt, open_<j)).
    Right padding is harmless (causal attention), and only the len(open_ids) positions that predict
    the block's tokens go through the output matrix."""
    import torch
    if not prompts:
        return []
    rows = [list(p) + list(open_ids) for p in prompts]
    width = max(len(r) for r in rows)
    device = net.lm_head.weight.device
    ids = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
    with torch.inference_mode():
        hidden = net(ids, return_hidden=True)                                     # [B, T, D]
        positions = torch.tensor([[len(p) - 1 + j for j in range(len(open_ids))] for p in prompts], device=device)
        picked = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))  # [B, L, D]
        logprobs = torch.log_softmax((picked @ net.lm_head.weight.T).float(), dim=-1)   # [B, L, V]
        targets = torch.tensor(open_ids, device=device).expand(len(prompts), -1)
        return logprobs.gather(-1, targets[..., None]).squeeze(-1).sum(-1).exp().tolist()


def _mean(values):
    values = list(values)
    return sum(values) / len(values) if values else None


def _mode_summary(records):
    statuses = [s for r in records for s in r.get("statuses", [])]
    summary = {
        "accuracy": _mean(bool(r["correct"]) for r in records),
        "code_rate": _mean(r["calls"] >= 1 for r in records),         # solutions that ran >= 1 code block
        "calls_per_problem": _mean(r["calls"] for r in records),
        "tool_error_rate": _mean(s != "ok" for s in statuses) if statuses else 0.0,  # of the executions
        "mean_response_tokens": _mean(r.get("response_tokens", 0) for r in records),
        "n": len(records),
    }
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
                if "p_code_open" in summary:
                    cell["p_code_open"] = _mean(r["p_code_open"] for r in members if "p_code_open" in r)
                summary[f"by_{key}"][value] = cell
    return summary


def selection_accuracy(auto_records, code_records, cot_records):
    """Did the unguided run choose as an oracle would, which takes CoT when CoT is correct and code
    otherwise? Only the problems that a forced mode solves count. Returns (selection accuracy,
    problems counted, oracle accuracy, {family: selection accuracy}); an accuracy is None when
    nothing counts."""
    forced = {m: {r["query_id"]: r for r in records} for m, records in (("code", code_records), ("cot", cot_records))}
    right, counted, solvable, per_family = 0, 0, 0, {}
    for r in auto_records:
        code, cot = forced["code"].get(r["query_id"]), forced["cot"].get(r["query_id"])
        if code is None or cot is None:
            continue
        solvable += 1
        if not (code["correct"] or cot["correct"]):
            continue
        oracle_codes = not cot["correct"]      # CoT when CoT is correct (no execution cost), else code
        chose_right = (r["calls"] >= 1) == oracle_codes
        right, counted = right + chose_right, counted + 1
        cell = per_family.setdefault(str(r.get("family")), [0, 0])
        cell[0], cell[1] = cell[0] + chose_right, cell[1] + 1
    return (right / counted if counted else None, counted, counted / solvable if solvable else None,
            {family: family_right / family_counted for family, (family_right, family_counted) in per_family.items()})


def summarize(records):
    """{mode: metrics} for the modes present in eval records (the em.sh summary reuses this).
    With all three modes, "auto" also gets selection_accuracy (and per family), selection_n and
    oracle_accuracy (a forced method solves it: the best any choice could do)."""
    by_mode = {}
    for r in records:
        by_mode.setdefault(r["mode"], []).append(r)
    summary = {m: _mode_summary(by_mode[m]) for m in MODE_ORDER if m in by_mode}
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



def _decode(net, tokenizer, batch, batch_prompts, open_ids, tool, args):
    """Greedy responses to one batch of (query, mode), graded: their eval records, in batch order."""
    import torch
    import model as model_lib
    samples = model_lib.generate(net, batch_prompts, args.max_new_tokens, temperature=0,
                                 tokenizer=tokenizer, tool=tool, max_calls=args.max_calls)
    p_code = [None] * len(batch)
    auto_rows = [i for i, (_, m) in enumerate(batch) if m == "auto"]
    if auto_rows:
        with torch.inference_mode():
            for i, p in zip(auto_rows, code_open_probability(
                    net, [batch_prompts[i] for i in auto_rows], open_ids)):
                p_code[i] = p
    for (q, m), sample, p in zip(batch, samples, p_code):
        answer, correct = grade(sample.text, q["answer"])
        record = {"id": f"{q['id']}:{m}", "query_id": q["id"], "mode": m, "problem": q["problem"],
                  "response": sample.text, "answer": answer, "gold": q["answer"], "correct": correct,
                  "calls": sample.calls, "statuses": list(sample.statuses),
                  "finish_reason": sample.finish_reason, "response_tokens": len(sample.tokens),
                  "sampled_tokens": int(sum(sample.sampled_mask))}
        record.update({key: q[key] for key in BREAKDOWNS if q.get(key) is not None})
        if p is not None:
            record["p_code_open"] = p
        yield record


def evaluate(args):
    # Imported here, not at the top: `import evaluate` stays free of torch. The _lib names keep the
    # modules apart from the defaults above.
    import torch
    from tqdm import tqdm
    import data as data_lib
    import model as model_lib
    import sandbox

    os.makedirs(args.out, exist_ok=True)
    if args.data:
        queries = data_lib.read_queries(args.data)
    else:
        queries = data_lib.make_problems(args.n or 200, "test")
    queries = queries[:args.n] if args.n else queries
    modes = list(MODE_ORDER) if args.mode == "all" else [args.mode]
    wanted = {f"{q['id']}:{m}" for q in queries for m in modes}

    final = os.path.join(args.out, "eval.jsonl")
    partial = final + ".partial"
    if os.path.exists(final):
        if wanted <= {str(r["id"]) for r in data_lib.read_jsonl(final)}:
            todo = []
        else:
            os.replace(final, partial)   # a complete run of other modes: extend it
    if not os.path.exists(final):
        data_lib.write_json_atomic(os.path.join(args.out, "eval_config.json"), vars(args))
        on_gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        device = "cuda" if on_gpu else "cpu"
        dtype = args.dtype if args.dtype != "auto" else ("bf16" if on_gpu else "fp32")
        net, tokenizer = model_lib.load(args.model, dtype=dtype, device=device)
        open_ids = tokenizer.encode(CODE_OPEN, add_special_tokens=False)
        tool = lambda responses: sandbox.tool(responses, timeout=args.tool_timeout)
        appender = data_lib.JsonlAppender(partial)
        todo = [(q, m) for m in modes for q in queries if f"{q['id']}:{m}" not in appender.done_ids]
        prompts = {(q["id"], m): data_lib.encode_prompt(tokenizer, q["problem"], m) for q, m in todo}
        # Similar lengths batched together: less padding; greedy rows do not depend on their batch.
        todo.sort(key=lambda qm: (MODE_ORDER.index(qm[1]), len(prompts[qm[0]["id"], qm[1]])))
        progress = tqdm(total=len(todo), desc=f"evaluate {args.mode}", unit="problem")
        for start in range(0, len(todo), args.batch_size):
            batch = todo[start:start + args.batch_size]
            batch_prompts = [prompts[q["id"], m] for q, m in batch]
            for record in _decode(net, tokenizer, batch, batch_prompts, open_ids, tool, args):
                appender.write(record)
            progress.update(len(batch))
        progress.close()
        appender.close()
        data_lib.finalize(partial, final)
    records = [r for r in data_lib.read_jsonl(final) if str(r["id"]) in wanted]
    summary = summarize(records)
    data_lib.write_json_atomic(os.path.join(args.out, "summary.json"), summary)
    print_table(summary)
    print(f"wrote {final} and {os.path.join(args.out, 'summary.json')}")
    return summary


def main(argv=None):
    args = flags.parse(__file__, globals(), argv, required=("model",), choices={
        "mode": ("auto", "code", "cot", "all"), "dtype": ("auto", "fp32", "bf16", "fp16"),
        "device": ("auto", "cpu", "cuda")})
    print("evaluate.py: " + " ".join(f"{k}={v}" for k, v in vars(args).items()))
    return evaluate(args)


if __name__ == "__main__":
    main()

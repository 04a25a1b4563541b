"""em.sh's whole iteration on checkpoints in the formats real ones come in (issue 27, item 2), in seconds: a Qwen2
network with a Qwen2.5-style byte-level BPE tokenizer and its ChatML template (EOS <|im_end|>, a second EOS
<|endoftext|> in generation_config.json, the vocabulary padded past the tokenizer, tied embeddings, the template in
tokenizer_config.json), and a Llama network with a SentencePiece-style tokenizer (Metaspace "▁", byte fallback, no
newline piece) and TinyLlama's chat template, whose prompt holds the EOS </s> itself (untied, no PAD token, the template
in chat_template.jinja). Both are built here from config (tests/realformat.py) and fitted for a few dozen steps to the
teacher's solutions of the run's own problems, so that the iteration sees what it sees on a real model: code blocks with
tool calls, rows that end at EOS and rows cut at the length limit, correct and wrong rollouts.

The two em.sh runs go side by side (one core each, each stage one thread); each test then checks one boundary of both:
  prompts        rollouts carry their mode's chat prompt: the template's text with the mode's instruction, the ids
                 transformers' own apply_chat_template gives
  records        train.jsonl carries the autonomous prompt's ids and the sampler's tokens, mask and behaviour log-probs
  ratio          at θ = θ_b the trainer's log-probs (train.py's own functions; and an independent transformers forward)
                 equal the sampler's on every trainable token of every rollout under the prompt it was sampled with:
                 ρ = 1, tool output masked, the trigger and the injected output where the sampler put them
  EOS            a row that ended at EOS ends with an EOS id and is trained on it
  checkpoint     the M-step's checkpoint reloads in transformers with model.load's logits, its template intact
  summaries      every stage's summary has its fields
and two places that encode a fixed text where it continues other text (explore's and evaluate's p_code_open,
synthesize's reflective hints), which a SentencePiece tokenizer would otherwise give a leading space.
"""
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
import transformers

import model
import sandbox
import synthesize
import task
import train
from realformat import (QWEN_TEMPLATE, TINYLLAMA_TEMPLATE, fit, hf_config, llama_tokenizer, qwen_tokenizer,
                        random_model, teacher_sequences)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STYLES = ("qwen", "llama")
TEMPERATURE = 0.5                  # em.sh's default exploration temperature
K, N_QUERIES, N_TEST = 2, 3, 2


def chat_text(style, mode, problem):
    """The prompt each template renders, written out by hand: what decoding a rollout's prompt ids must give."""
    instruction = task.INSTRUCTIONS[mode]
    if style == "qwen":
        return (f"<|im_start|>system\n{instruction}<|im_end|>\n<|im_start|>user\n{problem}<|im_end|>\n"
                f"<|im_start|>assistant\n")
    return f"<|system|>\n{instruction}</s>\n<|user|>\n{problem}</s>\n<|assistant|>\n"


def build_checkpoint(style, root):
    """A random checkpoint dir of `style`, fitted to the teacher's solutions of the run's queries and test problems,
    and those two files. Returns (model dir, tokenizer, the EOS ids the model stops at)."""
    queries = task.make_problems(N_QUERIES, "train", seed=11)
    test = task.make_problems(N_TEST, "test", seed=0)
    if style == "qwen":
        tokenizer = qwen_tokenizer()
        # Qwen pads its embedding past the tokenizer (151936 rows for 151665 tokens): rows no text maps to
        config = hf_config("qwen2", tokenizer, vocab_size=(len(tokenizer) + 63) // 64 * 64)
        steps = 70
    else:
        tokenizer = llama_tokenizer()
        config = hf_config("llama", tokenizer)
        steps = 60
    hf = random_model(config, seed=0)
    fit(hf, teacher_sequences(tokenizer, queries + test, tokenizer.eos_token_id), steps,
        pad_id=tokenizer.pad_token_id or 0)
    eos = [tokenizer.eos_token_id]
    if style == "qwen":   # Qwen2.5-Instruct: config.json <|im_end|>, generation_config.json [<|im_end|>, <|endoftext|>]
        eos.append(tokenizer.convert_tokens_to_ids("<|endoftext|>"))
        hf.generation_config.eos_token_id = eos
    path = root / "model"
    hf.save_pretrained(path)
    tokenizer.save_pretrained(path)
    if style == "qwen":   # as Qwen2.5 checkpoints ship it: the template inside tokenizer_config.json
        config_path = path / "tokenizer_config.json"
        tokenizer_config = json.loads(config_path.read_text())
        tokenizer_config["chat_template"] = (path / "chat_template.jinja").read_text()
        config_path.write_text(json.dumps(tokenizer_config, indent=2))
        (path / "chat_template.jinja").unlink()
    for name, records in (("queries", queries), ("test", test)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path), tokenizer, set(eos)


def em_env(root, model_dir):
    return {**os.environ, "PYTHON": sys.executable, "RUNS": str(root / "runs"), "NAME": "real", "MODEL": model_dir,
            "QUERIES": str(root / "queries.jsonl"), "TEST": str(root / "test.jsonl"), "ITERS": "1",
            "N_QUERIES": str(N_QUERIES), "N_TEST": str(N_TEST), "K": str(K), "MAX_NEW_TOKENS": "48", "EPOCHS": "1",
            "TEMPERATURE": str(TEMPERATURE), "TRAIN_ARGS": "--batch_size=8", "EVALUATE_ARGS": "",
            "EXPLORE_ARGS": "--tool_workers=1", "CPU_PROCS": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "CUDA_VISIBLE_DEVICES": ""}   # the CPU's fp32 path everywhere (on a GPU explore.py would sample in bf16)


class Run:
    def __init__(self, style, root, model_dir, tokenizer, eos):
        self.style, self.root, self.model_dir, self.tokenizer, self.eos = style, root, model_dir, tokenizer, eos
        self.dir = root / "runs" / "real"
        self.iter = self.dir / "iter_1"
        self.queries = {q["id"]: q for q in read_jsonl(root / "queries.jsonl")}
        self.rollouts = read_jsonl(self.iter / "rollouts.jsonl")
        self.records = read_jsonl(self.iter / "train.jsonl")
        self.by_id = {r["id"]: r for r in self.rollouts}

    def chat_ids(self, mode, problem):
        messages = [{"role": "system", "content": task.INSTRUCTIONS[mode]}, {"role": "user", "content": problem}]
        return self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both checkpoints built, and both em.sh runs going side by side (the first starts while the second builds)."""
    started = {}
    try:
        for style in STYLES:
            root = tmp_path_factory.mktemp(style)
            model_dir, tokenizer, eos = build_checkpoint(style, root)
            with open(root / "em.log", "w") as log:   # its own session: the stages are stopped with it on a failure
                process = subprocess.Popen(["bash", os.path.join(REPO, "em.sh")], env=em_env(root, model_dir),
                                           stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            started[style] = (process, root, model_dir, tokenizer, eos)
        results = {}
        for style, (process, root, model_dir, tokenizer, eos) in started.items():
            process.wait(timeout=400)
            assert process.returncode == 0, f"em.sh ({style}) failed:\n{(root / 'em.log').read_text()[-6000:]}"
            results[style] = Run(style, root, model_dir, tokenizer, eos)
        return results
    finally:
        for process, *_ in started.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@pytest.fixture(params=STYLES)
def run(runs, request):
    return runs[request.param]


def test_rollouts_carry_their_modes_chat_prompts(run):
    assert len(run.rollouts) == N_QUERIES * 3 * K
    assert {(r["query_id"], r["mode"], r["k"]) for r in run.rollouts} == {
        (q, m, k) for q in run.queries for m in task.MODES for k in range(K)}
    for r in run.rollouts:
        problem = run.queries[r["query_id"]]["problem"]
        text = chat_text(run.style, r["mode"], problem)
        # the ids are transformers' own for this chat, and decode to the template's text with the mode's instruction
        assert r["prompt_ids"] == run.chat_ids(r["mode"], problem), r["id"]
        assert run.tokenizer.decode(r["prompt_ids"]) == text == r["prompt"], r["id"]
        assert [m for m in task.MODES if task.INSTRUCTIONS[m] in r["prompt"]] == [r["mode"]]
        assert r["auto_prompt_ids"] == run.chat_ids("auto", problem)
        assert run.tokenizer.decode(r["auto_prompt_ids"]) == chat_text(run.style, "auto", problem)
        assert r["temperature"] == TEMPERATURE and (r["top_p"], r["top_k"]) == (1.0, 0)
        n = len(r["response_ids"])
        assert len(r["sampled_mask"]) == len(r["behaviour_logprobs"]) == n > 0
    if run.style == "llama":   # TinyLlama's template ends every turn with </s>: the EOS id is in the prompt itself
        assert all(r["prompt_ids"].count(run.tokenizer.eos_token_id) == 2 for r in run.rollouts)


def test_training_records_carry_the_autonomous_prompt_and_the_samplers_logprobs(run):
    assert run.records, "synthesize.py wrote no training record: the fitted model solved nothing"
    for record in run.records:
        rollout = run.by_id[record["id"]]
        problem = run.queries[record["query_id"]]["problem"]
        assert record["source_mode"] == rollout["mode"] and record["source_mode"] in ("code", "cot")
        # the guidance stripped: the autonomous chat prompt, whatever prompt sampled the response
        assert record["prompt_ids"] == run.chat_ids("auto", problem) == rollout["auto_prompt_ids"]
        assert run.tokenizer.decode(record["prompt_ids"]) == chat_text(run.style, "auto", problem)
        assert record["prompt_ids"] != rollout["prompt_ids"]
        # the sampler's tokens, mask and behaviour log-probs, untouched, with the π_b they were drawn under
        assert record["response_ids"] == rollout["response_ids"]
        assert record["trainable_mask"] == rollout["sampled_mask"]
        assert record["behaviour_logprobs"] == rollout["behaviour_logprobs"]
        assert (record["temperature"], record["top_p"], record["top_k"]) == (TEMPERATURE, 1.0, 0)


def injected_spans(mask):
    """(start, end) of each run of injected tokens (mask 0)."""
    spans, start = [], None
    for i, m in enumerate(mask + [1]):
        if m == 0 and start is None:
            start = i
        elif m == 1 and start is not None:
            spans.append((start, i))
            start = None
    return spans


def test_tool_calls_inject_the_tools_output_after_the_trigger(run):
    """Every injected span follows a sampled token that completed the trigger and decodes to exactly
    tool_injection(output) (cut short only where the row reached the length limit), output the tool's for that text;
    one span per call, and one more for the notice past max_calls."""
    called = [r for r in run.rollouts if r["calls"]]
    assert called, "no rollout called the tool"
    asked = []
    for r in called:
        ids, spans = r["response_ids"], injected_spans(r["sampled_mask"])
        assert len(spans) - r["calls"] in (0, 1) and len(r["statuses"]) == r["calls"], r["id"]
        for i, (start, end) in enumerate(spans):
            before, through = run.tokenizer.decode(ids[:start]), run.tokenizer.decode(ids[:end])
            assert r["sampled_mask"][start - 1] == 1 and before.rstrip("\n").endswith(task.TOOL_TRIGGER), r["id"]
            assert through.startswith(before)
            injected = through[len(before):]
            cut = end == len(ids) and r["finish_reason"] == "length"
            after_newline = before.endswith("\n")
            if i < r["calls"]:
                asked.append((before, injected, after_newline, cut, r["statuses"][i]))
            else:
                notice = task.tool_injection(task.MAX_CALLS_NOTICE, after_newline)
                assert notice.startswith(injected) if cut else injected == notice, r["id"]
            if not cut:
                assert injected.startswith("" if after_newline else "\n") and injected.endswith("\n```\n"), r["id"]
    # the outputs are the tool's: the same programs run again give them (where both runs ran cleanly)
    again = sandbox.tool([before for before, *_ in asked])
    for (before, injected, after_newline, cut, status), (output, status_again) in zip(asked, again):
        if status == status_again == "ok":
            expected = task.tool_injection(output, after_newline)
            assert expected.startswith(injected) if cut else injected == expected, before


def trainer_logprobs(net, records, pad_id, prompt_of=None):
    """train.py's log π_θ of the records' trainable tokens (its example / collate / token_logprobs), and the
    behaviour log-probs at the same tokens, both [N]."""
    examples = [train.example(prompt_of(r) if prompt_of else r["prompt_ids"], r["response_ids"], r["trainable_mask"],
                              r["behaviour_logprobs"], r["advantage"], r["sft"]) for r in records]
    batch = train.collate(examples, pad_id, "cpu")
    with torch.no_grad():
        logprobs, _ = train.token_logprobs(net, net.lm_head.weight, batch, TEMPERATURE)
    trainable = batch["trainable"][:, 1:]
    assert int(trainable.sum()) == sum(sum(r["trainable_mask"]) for r in records)
    return logprobs, batch["behaviour_logprobs"][:, 1:][trainable], batch


def sampled_records(run):
    """Every rollout as a training record under the prompt it was sampled with (π_b's own context), with the
    autonomous ones as synthesize.py writes them (its training_record; em.sh's EM trains on the guided pools, the
    RL-only ablation on these) and the records of train.jsonl that came from the autonomous prompt. The guided
    code rollouts are the ones that call the tool for certain: how often a few autonomous rollouts of a model
    fitted for seconds call it depends on the last bits of the fit, which differ between CPUs."""
    guided = [{**synthesize.training_record(r, 1.0, True), "prompt_ids": r["prompt_ids"]}
              for r in run.rollouts if r["mode"] != "auto"]
    autonomous = [synthesize.training_record(r, 1.0, True) for r in run.rollouts if r["mode"] == "auto"]
    return guided + autonomous + [r for r in run.records if r["source_mode"] == "auto"]


def test_on_policy_ratio_is_one_at_theta_b(run):
    """θ = θ_b (the checkpoint explore.py sampled with): the trainer's π_θ of every trainable token of every rollout,
    under the prompt it was sampled with, is the sampler's π_b, so ρ = 1, KL = 0 and nothing is clipped; tool output
    is left out and the tokens after it line up. An independent forward by transformers gives the same log-probs."""
    records = sampled_records(run)
    assert any(r["trainable_mask"].count(0) for r in records), "no rollout called the tool"
    assert any(run.by_id[r["id"]]["finish_reason"] == "eos" for r in records), "no rollout ended at EOS"
    assert {r["source_mode"] for r in records} == set(task.MODES)
    net, tokenizer = model.load(run.model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    logprobs, behaviour, _ = trainer_logprobs(net, records, pad_id)
    assert (logprobs - behaviour).abs().max() < 1e-4
    n = logprobs.numel()
    _, stats = train.m_step_loss(logprobs, behaviour, torch.ones(n), torch.ones(n, dtype=torch.bool), n)
    assert stats["ratio"] / n == pytest.approx(1.0, abs=1e-5) and stats["kl"] / n < 1e-8 and stats["clipped"] == 0

    hf = transformers.AutoModelForCausalLM.from_pretrained(run.model_dir, dtype=torch.float32).eval()
    for r in records:
        ids = torch.tensor([r["prompt_ids"] + r["response_ids"]])
        with torch.no_grad():
            reference = torch.log_softmax(hf(ids).logits[0, :-1].float() / TEMPERATURE, -1)
        start = len(r["prompt_ids"])
        for t, (token, sampled, logprob) in enumerate(zip(r["response_ids"], r["trainable_mask"],
                                                          r["behaviour_logprobs"])):
            if sampled:
                assert reference[start + t - 1, token].item() == pytest.approx(logprob, abs=1e-4), (r["id"], t)
            else:
                assert logprob == 0.0


def test_guided_records_logprobs_are_those_of_their_guided_prompt(run):
    """The records of train.jsonl were sampled under a guided prompt: their behaviour log-probs are the trainer's
    under that prompt (ρ = 1 there), not under the autonomous prompt they are trained on (off-policy on purpose)."""
    net, tokenizer = model.load(run.model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    guided, behaviour, _ = trainer_logprobs(net, run.records, pad_id, lambda r: run.by_id[r["id"]]["prompt_ids"])
    assert (guided - behaviour).abs().max() < 1e-4
    stripped, _, _ = trainer_logprobs(net, run.records, pad_id)
    assert (stripped - behaviour).abs().max() > 1e-3


def test_eos_ends_rows_and_is_trained_on(run):
    eos_rows = [r for r in run.rollouts if r["finish_reason"] == "eos"]
    assert eos_rows, "no rollout ended at EOS"
    net, _ = model.load(run.model_dir)
    configured = net.config.eos_token_id
    assert set([configured] if isinstance(configured, int) else configured) == run.eos
    for r in run.rollouts:
        ends_at_eos = r["response_ids"][-1] in run.eos and r["sampled_mask"][-1] == 1
        assert ends_at_eos == (r["finish_reason"] == "eos"), r["id"]
        assert all(t not in run.eos for t, m in zip(r["response_ids"][:-1], r["sampled_mask"]) if m), r["id"]
        if ends_at_eos:
            assert r["behaviour_logprobs"][-1] < 0
            assert r["response"] == run.tokenizer.decode(r["response_ids"][:-1])   # the text leaves the EOS out
    assert {r["finish_reason"] for r in run.rollouts} <= {"eos", "length", "max_calls"}
    # the records keep the EOS, trainable, and train.py trains on it: a trainable target of its batch
    ending = [r for r in run.records if run.by_id[r["id"]]["finish_reason"] == "eos" and (r["advantage"] or r["sft"])]
    assert ending, "no training record of a row that ended at EOS"
    examples = train.record_examples(ending, "rl")
    assert len(examples) == len(ending)
    batch = train.collate(examples, 0, "cpu")
    for i, (record, example) in enumerate(zip(ending, examples)):
        assert record["response_ids"][-1] in run.eos and record["trainable_mask"][-1] == 1
        last = len(example["input_ids"]) - 1
        assert example["input_ids"][last] in run.eos and bool(batch["trainable"][i, last])


def test_the_m_step_checkpoint_reloads_in_transformers(run):
    out = str(run.iter / "model")
    assert json.load(open(os.path.join(out, "train_config.json")))["temperature"] == TEMPERATURE
    ours, tokenizer = model.load(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    record = (run.records or run.rollouts)[0]
    ids = torch.tensor([record["prompt_ids"] + record["response_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)
    original = transformers.AutoConfig.from_pretrained(run.model_dir)
    assert (hf.config.vocab_size, hf.config.tie_word_embeddings) == (original.vocab_size, original.tie_word_embeddings)
    eos = transformers.GenerationConfig.from_pretrained(out).eos_token_id
    assert set([eos] if isinstance(eos, int) else eos) == run.eos
    # the chat template survives the save, and the saved tokenizer makes the same prompts
    saved = transformers.AutoTokenizer.from_pretrained(out)
    assert saved.chat_template == (QWEN_TEMPLATE if run.style == "qwen" else TINYLLAMA_TEMPLATE)
    assert tokenizer.chat_template == saved.chat_template
    problem = next(iter(run.queries.values()))["problem"]
    for mode in task.MODES:
        assert task.encode_prompt(saved, problem, mode) == task.encode_prompt(run.tokenizer, problem, mode)
    assert (saved.eos_token, saved.pad_token, len(saved)) == (run.tokenizer.eos_token, run.tokenizer.pad_token,
                                                               len(run.tokenizer))


def code_open_reference(hf, tokenizer, prompt_ids):
    """π(code | x) by transformers: the probability that the response starts with "```python" written as the model
    writes it after the prompt (as task.tokenize_response and the sampler's injections write text: a continuation)."""
    opening = task.encode_continuation(tokenizer, task.CODE_OPEN, prompt_ids)
    assert tokenizer.decode(prompt_ids + opening) == tokenizer.decode(prompt_ids) + task.CODE_OPEN
    ids = torch.tensor([prompt_ids + opening])
    with torch.no_grad():
        logprobs = torch.log_softmax(hf(ids).logits[0].float(), -1)
    start = len(prompt_ids)
    return math.exp(sum(logprobs[start + j - 1, token].item() for j, token in enumerate(opening)))


def test_p_code_open_is_the_probability_of_the_models_code_opening(run):
    hf = transformers.AutoModelForCausalLM.from_pretrained(run.model_dir, dtype=torch.float32).eval()
    for r in run.rollouts:
        expected = code_open_reference(hf, run.tokenizer, r["auto_prompt_ids"])
        assert r["p_code_open"] == pytest.approx(expected, rel=1e-3, abs=1e-6), r["id"]
    evaluated = [e for e in read_jsonl(run.dir / "iter_0" / "eval" / "eval.jsonl") if e["mode"] == "auto"]
    assert evaluated
    for e in evaluated:
        prompt = task.encode_prompt(run.tokenizer, e["problem"], "auto")
        assert e["p_code_open"] == pytest.approx(code_open_reference(hf, run.tokenizer, prompt), rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("style", ["qwen", "llama"])
def test_reflective_hints_continue_the_failed_attempt(tmp_path, style):
    """--reflect puts a hint's ids between a failed attempt and the retry: they must read as the hint's text there."""
    tokenizer = qwen_tokenizer() if style == "qwen" else llama_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    hints = {"code": synthesize.hint_to_code, "cot": synthesize.hint_to_cot}
    hint_ids = synthesize.encode_hints(str(tmp_path), hints)
    record = task.make_problems(1, "train", seed=3)[0]
    prompt = task.encode_prompt(tokenizer, record["problem"], "auto")
    failed, _ = task.tokenize_response(tokenizer, task.teacher_solution(record, "cot"), prompt)
    for target, hint in hints.items():
        context = prompt + failed
        assert tokenizer.decode(context + hint_ids[target]) == tokenizer.decode(context) + hint, target


EXPLORE_FIELDS = ("rollouts", "accuracy", "code_rate", "calls_per_rollout", "tool_error_rate", "groups",
                  "groups_all_correct", "groups_all_wrong", "mean_response_tokens", "finish_reasons")
SYNTHESIZE_FIELDS = ("queries", "unguided_code_share", "pi_code", "q_code", "q_cot", "strategy_code_share",
                     "queries_to_code", "examples", "examples_code_share", "sft_examples", "reflect_examples",
                     "groups_mixed", "groups_all_correct", "groups_all_wrong", "queries_unsolved")
EVAL_FIELDS = ("accuracy", "code_rate", "calls_per_problem", "tool_error_rate", "mean_response_tokens", "n",
               "by_family", "by_difficulty")


def test_every_summary_has_its_fields(run):
    explore = json.load(open(run.iter / "rollouts.jsonl.summary.json"))
    for mode in task.MODES:
        assert all(field in explore[mode] for field in EXPLORE_FIELDS), mode
        assert explore[mode]["rollouts"] == N_QUERIES * K == sum(explore[mode]["finish_reasons"].values())
    assert "seconds_this_run" in explore and "tool_executions_this_run" in explore

    synthesized = json.load(open(run.iter / "train.jsonl.summary.json"))
    assert (synthesized["strategy"], synthesized["form"]) == ("em", "argmax") and synthesized["samples_per_query"]
    assert synthesized["behaviour_sampling"] == [{"temperature": TEMPERATURE, "top_p": 1.0, "top_k": 0}]
    assert "config" in synthesized and "all" in synthesized["by_family"]
    for family, row in synthesized["by_family"].items():
        assert all(field in row for field in SYNTHESIZE_FIELDS), family
    assert synthesized["by_family"]["all"]["examples"] == len(run.records)

    evaluations = [json.load(open(run.dir / f"iter_{i}" / "eval" / "summary.json")) for i in (0, 1)]
    for summary in evaluations:
        for mode in task.MODES:
            assert all(field in summary[mode] for field in EVAL_FIELDS), mode
            assert summary[mode]["n"] == N_TEST
        for field in ("selection_accuracy", "selection_n", "oracle_accuracy", "p_code_open"):
            assert field in summary["auto"], field
    rows = json.load(open(run.dir / "summary.json"))
    assert [row["iteration"] for row in rows] == [0, 1]
    for row, summary in zip(rows, evaluations):
        assert all(row[key] == value for key, value in summary.items())   # the row is its evaluation's summary
    assert (run.dir / "report.html").exists() and (run.dir / "report.md").exists()

"""train.py: the M-step loss on hand-computed tokens (the dual clip too), the masks, the behaviour temperature
taken from the records, over-long records dropped, and short real runs (SFT and RL; on-policy ρ = 1 on the CPU
in fp32 and, on CUDA, in bf16)."""
import json
import math
import os
import types

import pytest
import torch

import train
from model import load, save
from sampler import generate
from task import encode_prompt, make_problems, teacher_solution, tokenize_response, tool_injection


def test_m_step_loss_by_hand():
    # (π_θ, π_b, A, sft) per token; ε = 0.2, λ = 0.5
    tokens = [(0.5, 0.25, 1.0, False),     # r = 2,   A > 0: clipped at 1.2, no gradient (moved far enough)
              (0.125, 0.25, 1.0, False),   # r = 0.5, A > 0: min picks r·A = 0.5, gradient r·A (not yet moved)
              (0.5, 0.25, -1.0, False),    # r = 2,   A < 0: min picks r·A = −2, gradient r·A (wrong way)
              (0.125, 0.25, -1.0, False),  # r = 0.5, A < 0: clipped at −0.8, no gradient
              (0.55, 0.5, 2.0, False),     # r = 1.1 inside the range: 2.2, gradient 2.2
              (0.3, 0.3, 0.0, False),      # A = 0, not sft: nothing
              (0.4, 0.4, 0.0, True)]       # the λ term alone: λ·log 0.4, gradient λ
    p, b, a, s = zip(*tokens)
    logprobs = torch.tensor(p).log().requires_grad_()
    loss, stats = train.m_step_loss(logprobs, torch.tensor(b).log(), torch.tensor(a), torch.tensor(s),
                                    n_tokens=7, clip_eps=0.2, sft_weight=0.5)
    expected = -(1.2 + 0.5 - 2.0 - 0.8 + 2.2 + 0.0 + 0.5 * math.log(0.4)) / 7
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert logprobs.grad.tolist() == pytest.approx([-g / 7 for g in (0, 0.5, -2.0, 0, 2.2, 0, 0.5)], abs=1e-6)
    ratios = [2, 0.5, 2, 0.5, 1.1, 1, 1]
    assert stats["clipped"] == 4 and stats["tokens"] == 7
    assert stats["ratio"] == pytest.approx(sum(ratios), rel=1e-5)
    assert stats["kl"] == pytest.approx(sum(r - 1 - math.log(r) for r in ratios), rel=1e-5)


def test_dual_clip_by_hand():
    # (ρ, A) per token; ε = 0.2, c = 3. π_b = 0.1 each, so π_θ = 0.1·ρ.
    tokens = [(5.0, -1.0),    # min(−5, −1.2) = −5, dual clip: max(−5, −3) = −3, no gradient
              (2.0, -1.0),    # min(−2, −1.2) = −2 > −3: the dual clip does not bind, gradient ρ·A = −2
              (0.5, -1.0),    # min(−0.5, −0.8) = −0.8 (clipped), the dual clip does not bind, no gradient
              (5.0, 1.0),     # A > 0: min(5, 1.2) = 1.2, never dual-clipped, no gradient
              (4.0, -0.5)]    # min(−2, −0.6) = −2 < 3·(−0.5) = −1.5: held at −1.5, no gradient
    rho, a = zip(*tokens)
    behaviour = torch.full((5,), 0.1).log()
    logprobs = (torch.tensor(rho) * 0.1).log().requires_grad_()
    sft = torch.zeros(5, dtype=torch.bool)
    loss, stats = train.m_step_loss(logprobs, behaviour, torch.tensor(a), sft, n_tokens=5, dual_clip=3.0)
    assert loss.item() == pytest.approx(-(-3.0 - 2.0 - 0.8 + 1.2 - 1.5) / 5, rel=1e-5)
    loss.backward()
    assert logprobs.grad.tolist() == pytest.approx([0, 2.0 / 5, 0, 0, 0], abs=1e-6)   # d(−ρA/5)/d log π_θ
    assert stats["dual_clipped"] == 2
    off, stats = train.m_step_loss(logprobs, behaviour, torch.tensor(a), sft, n_tokens=5, dual_clip=0.0)
    assert off.item() == pytest.approx(-(-5.0 - 2.0 - 0.8 + 1.2 - 2.0) / 5, rel=1e-5)   # PPO's min alone
    assert stats["dual_clipped"] == 0
    with pytest.raises(SystemExit, match="dual_clip"):
        train.parse_args(["--dual_clip=1.1"])                                  # would cut inside [1−ε, 1+ε]


def test_normalised_by_the_steps_token_count():
    # Two micro-batches normalised by the step's total equal one batch of both.
    lp, bl, a, s = torch.randn(6) - 1, torch.randn(6) - 1, torch.randn(6), torch.rand(6) > 0.5
    whole, _ = train.m_step_loss(lp, bl, a, s, 6)
    half1, _ = train.m_step_loss(lp[:2], bl[:2], a[:2], s[:2], 6)
    half2, _ = train.m_step_loss(lp[2:], bl[2:], a[2:], s[2:], 6)
    assert (half1 + half2).item() == pytest.approx(whole.item(), rel=1e-5)


@pytest.fixture(scope="module")
def tiny():
    return load("tiny", seed=0)


def test_token_logprobs_are_the_trainable_tokens_only(tiny):
    model, _ = tiny
    torch.manual_seed(0)
    batch = [train.example([5, 6, 7], [10, 11, 12, 13, 14], [1, 0, 0, 1, 1], [0.0] * 5, 1.0, False),
             train.example([5, 6], [20, 21, 22], [1, 1, 1], [0.0] * 3, 1.0, False)]
    tensors = train.collate(batch, pad_id=1, device="cpu")
    logprobs, entropy = train.token_logprobs(model, model.lm_head.weight, tensors, temperature=0.7)
    with torch.no_grad():
        naive = torch.log_softmax(model(tensors["input_ids"]) / 0.7, -1)
    # token i of the sequence is predicted at position i−1; prompt, injected and padding are left out
    positions = [(0, 3), (0, 6), (0, 7), (1, 2), (1, 3), (1, 4)]
    expected = [naive[r, t - 1, tensors["input_ids"][r, t]].item() for r, t in positions]
    assert logprobs.tolist() == pytest.approx(expected, abs=1e-5)
    expected_entropy = [-(naive[r, t - 1].exp() * naive[r, t - 1]).sum().item() for r, t in positions]
    assert entropy.tolist() == pytest.approx(expected_entropy, abs=1e-4)


def test_a_batch_cut_into_length_pieces_gives_the_gradient_of_the_whole_batch():
    # The reference: the batch as one padded tensor. by_length reorders and cuts it; the RL loss (ratio, clip,
    # λ term) is one sum over the step's tokens, so the gradient must not move.
    model, _ = load("tiny", seed=0)
    rng = torch.Generator().manual_seed(0)
    batch = []
    for i, (prompt, response) in enumerate([(9, 40), (12, 7), (5, 61), (20, 15), (8, 33)]):
        ids = torch.randint(2, 98, (prompt + response,), generator=rng).tolist()
        batch.append(train.example(ids[:prompt], ids[prompt:], [1] * response,
                                   (-torch.rand(response, generator=rng)).tolist(), (-1) ** i * 0.5, i % 2 == 0))
    pieces = train.by_length(batch, 2)
    assert [len(p) for p in pieces] == [3, 2]
    assert [len(e["input_ids"]) for p in pieces for e in p] == sorted(len(e["input_ids"]) for e in batch)
    args = train.parse_args(["--mode=rl", "--data=unused.jsonl"])
    args.temperature = 1.0
    grads = []
    for micro_batches in ([batch], pieces):
        tensors = [train.collate(b, 1, "cpu") for b in micro_batches]
        n_tokens = torch.tensor(float(sum(t["trainable"][:, 1:].sum() for t in tensors)))
        model.zero_grad()
        train.accumulate_gradients(model, model.lm_head.weight, tensors, n_tokens, args, 0.2, 1.0, 3.0,
                                   False, 1, torch.autocast("cpu", enabled=False))
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_warmstart_examples_mask_prompt_and_tool_output(tiny):
    _, tokenizer = tiny
    args = train.parse_args(["--n_train=12", "--mode_weights=1,0,1", "--auto_code_frac=1", "--habit_code_frac=1",
                             "--drill_frac=0"])
    examples = train.warmstart_examples(tokenizer, args)
    problems = make_problems(12, "train", seed=0)
    for record, e in zip(problems, examples):  # every example is a code solution here
        ids, trainable = e["input_ids"], e["trainable"]
        prompt_length = len(ids) - len(tokenize_response(tokenizer, teacher_solution(record, "code"))[0]) - 1
        assert ids[:prompt_length] in (encode_prompt(tokenizer, record["problem"], m) for m in ("code", "auto"))
        assert trainable[:prompt_length] == [0] * prompt_length
        assert ids[-1] == tokenizer.eos_token_id and trainable[-1] == 1   # the EOS is trained
        masked = tokenizer.decode([t for t, m in zip(ids[prompt_length:], trainable[prompt_length:]) if not m])
        assert masked == tool_injection(str(eval(record["expression"])))   # exactly the injected output
    args = train.parse_args(["--n_train=12", "--mode_weights=0,0,1", "--auto_code_frac=0", "--habit_code_frac=0",
                             "--drill_frac=0"])
    for e in train.warmstart_examples(tokenizer, args):
        assert "```python" not in tokenizer.decode(e["input_ids"]) and "Solve." in tokenizer.decode(e["input_ids"])


def test_warmstart_drills_are_trained_on_every_token(tiny):
    _, tokenizer = tiny
    args = train.parse_args(["--n_train=30", "--drill_frac=0.25"])
    examples = train.warmstart_examples(tokenizer, args)
    problems, drills = examples[:30], examples[30:]
    assert len(drills) == 10                                  # 10 of 40 examples: a quarter
    for e in drills:                                          # no prompt, no EOS: lines of one-digit steps
        text = tokenizer.decode(e["input_ids"])
        assert e["trainable"] == [1] * len(e["input_ids"]) and "\\boxed" not in text and "=" in text
        assert all(line.count("=") == 1 for line in text.split("\n"))
    assert all(e["trainable"][0] == 0 for e in problems)    # a problem starts with its (untrained) prompt


def test_record_examples_keep_what_the_loss_uses():
    records = [dict(id=str(i), prompt_ids=[3, 4], response_ids=[5, 6], trainable_mask=[1, 0],
                    behaviour_logprobs=[-0.5, 0.0], advantage=a, sft=s) for i, (a, s) in
               enumerate([(0.0, True), (0.0, False), (1.5, False), (-1.0, True)])]
    rl = train.record_examples(records, "rl")
    assert [(e["advantage"], e["sft"]) for e in rl] == [(0.0, True), (1.5, False), (-1.0, True)]
    assert rl[0]["trainable"] == [0, 0, 1, 0] and rl[0]["behaviour_logprobs"] == [0.0, 0.0, -0.5, 0.0]
    sft = train.record_examples(records, "sft")
    assert [(e["advantage"], e["sft"]) for e in sft] == [(0.0, True), (0.0, True)]


def test_the_ratio_uses_the_records_temperature_and_refuses_another():
    def lines(*temperatures):
        return [(i + 1, {"id": str(i), "temperature": t, "top_p": 1.0, "top_k": 0}) for i, t in enumerate(temperatures)]
    assert train.behaviour_policy("t.jsonl", lines(0.5, 0.5), 0.0) == \
        (0.5, {"temperature": [0.5], "top_p": [1.0], "top_k": [0]})     # 0: the records' own
    assert train.behaviour_policy("t.jsonl", lines(0.5, 0.5), 0.5)[0] == 0.5   # em.sh passes the same T: accepted
    with pytest.raises(SystemExit, match=r"t\.jsonl:1: .*temperature 0\.5.*--temperature=1\.0"):
        train.behaviour_policy("t.jsonl", lines(0.5, 0.5), 1.0)
    with pytest.raises(SystemExit, match=r"t\.jsonl: .*different temperatures: 0\.5 \(line 1\), 1\.0 \(line 3\)"):
        train.behaviour_policy("t.jsonl", lines(0.5, 0.5, 1.0), 0.0)
    with pytest.raises(SystemExit, match=r"t\.jsonl: .*different temperatures"):
        train.behaviour_policy("t.jsonl", lines(0.5, 1.0), 0.5)
    # records older than the field: only an explicit --temperature says what they were sampled at
    assert train.behaviour_policy("t.jsonl", lines(None), 0.7)[0] == 0.7
    with pytest.raises(SystemExit, match=r"t\.jsonl:1: .*without its sampling temperature"):
        train.behaviour_policy("t.jsonl", lines(None), 0.0)
    assert train.parse_args([]).temperature == 0.0                    # the warm start then uses T = 1


def test_records_longer_than_max_len_are_dropped_and_counted(tmp_path, capsys):
    path = tmp_path / "train.jsonl"
    lengths = [6, 10, 11, 30]                                          # prompt 3 + response; max_len 10
    with open(path, "w") as f:
        for i, n in enumerate(lengths):
            f.write(json.dumps(dict(id=str(i), prompt_ids=[3, 4, 5], response_ids=[6] * (n - 3),
                                    trainable_mask=[1] * (n - 3), behaviour_logprobs=[-1.0] * (n - 3),
                                    advantage=1.0, sft=True, temperature=1.0, top_p=1.0, top_k=0)) + "\n")
    out = tmp_path / "out"
    train.main(["--device=cpu", "--mode=sft", f"--data={path}", "--max_len=10", "--epochs=1", "--batch_size=2",
                "--log_every=100", f"--out={out}"])
    assert "dropped 2 of 4 examples longer than 10 tokens" in capsys.readouterr().out
    config = json.load(open(out / "train_config.json"))
    assert config["dropped_too_long"] == 2 and config["examples"] == 2 and config["temperature"] == 1.0
    assert len(open(out / "train_log.jsonl").readlines()) == 1          # 2 examples, batch 2: one step


def test_sft_steps_reduce_the_loss_and_the_checkpoint_round_trips(tmp_path):
    out = str(tmp_path / "warmstart")
    model, log = train.main(["--device=cpu", "--steps=16", "--n_train=128", "--batch_size=8", "--log_every=100",
                             "--check_n=0", f"--out={out}"])
    first, last = sum(e["loss"] for e in log[:4]) / 4, sum(e["loss"] for e in log[-4:]) / 4
    assert last < first - 0.5
    assert json.load(open(os.path.join(out, "train_config.json")))["steps"] == 16
    assert len(open(os.path.join(out, "train_log.jsonl")).readlines()) == 16
    loaded, _ = load(out)
    ids = torch.tensor([[40, 41, 42, 43, 3, 4]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids), model.eval()(ids), atol=1e-5)


def on_policy_log(tmp_path, sampler, tokenizer, init, temperature, device, temperature_flag):
    """The trainer's first step on the sampler's own rollouts, written as explore.py and synthesize.py write them."""
    prompts = [encode_prompt(tokenizer, r["problem"], "auto") for r in make_problems(6, "train")]
    samples = generate(sampler, prompts, max_new_tokens=24, temperature=temperature, seed=1, tokenizer=tokenizer)
    path = tmp_path / "train.jsonl"
    with open(path, "w") as f:
        for i, (prompt, sample) in enumerate(zip(prompts, samples)):
            f.write(json.dumps(dict(id=str(i), prompt_ids=prompt, response_ids=sample.tokens,
                                    trainable_mask=sample.sampled_mask, behaviour_logprobs=sample.logprobs,
                                    advantage=1.0 if i % 2 else -1.0, sft=bool(i % 3 == 0),
                                    temperature=temperature, top_p=1.0, top_k=0)) + "\n")
    flag = [f"--temperature={temperature}"] if temperature_flag else []   # else the records' own
    _, log = train.main([f"--device={device}", "--mode=rl", f"--init={init}", f"--data={path}", "--epochs=1",
                         "--batch_size=6", "--log_every=100", f"--out={tmp_path / 'out'}", *flag])
    assert os.path.exists(tmp_path / "out" / "model.safetensors")
    assert json.load(open(tmp_path / "out" / "train_config.json"))["temperature"] == temperature
    return log


@pytest.mark.parametrize("temperature, temperature_flag", [(1.0, True), (0.7, False)])
def test_rl_on_policy_ratio_is_one(tmp_path, tiny, temperature, temperature_flag):
    # Rollouts of the sampler scored by the trainer: the same policy, so ρ = 1 and KL = 0 at the first
    # step. This pins the off-by-one of the shift, the masks and the temperature against model.generate,
    # and (at 0.7, no flag) that the trainer takes π_b's temperature from the records.
    model, tokenizer = tiny
    init = str(tmp_path / "init")
    save(model, tokenizer, init)
    log = on_policy_log(tmp_path, model, tokenizer, init, temperature, "cpu", temperature_flag)
    assert log[0]["ratio"] == pytest.approx(1.0, abs=1e-4)
    assert log[0]["kl"] == pytest.approx(0.0, abs=1e-6) and log[0]["clipped"] == 0


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs CUDA: the bf16 sampler against the bf16-autocast trainer")
def test_rl_on_policy_ratio_is_one_in_bf16_on_cuda(tmp_path, tiny):
    # explore.py's default on CUDA: the sampler holds bf16 weights; train.py keeps fp32 master weights under bf16
    # autocast. The two compute the same policy only up to bf16 rounding: this measures the gap that leaves
    # (the tolerances are a first guess, not a measurement: loosen them with the numbers it prints if need be).
    model, tokenizer = tiny
    init = str(tmp_path / "init")
    save(model, tokenizer, init)
    sampler, _ = load(init, dtype="bf16", device="cuda")
    log = on_policy_log(tmp_path, sampler, tokenizer, init, 0.7, "cuda", False)
    print(f"bf16 on-policy step 0: ratio {log[0]['ratio']:.6f} kl {log[0]['kl']:.2e} clipped {log[0]['clipped']:.4f}")
    assert log[0]["ratio"] == pytest.approx(1.0, abs=2e-2)
    assert log[0]["kl"] < 1e-3 and log[0]["clipped"] < 0.01


def test_a_short_run_still_warms_up():
    """Hand-checked schedule values: a one-step M-step takes a tenth of the peak (its warmup is warmup_steps long, not
    3% of one step), a long warm start warms up over 3% of its steps, and both end on the cosine's floor."""
    peak = 1e-4
    assert train.learning_rate(0, 1, peak, 0.03, 0.1, 10) == pytest.approx(1e-5)
    assert [train.learning_rate(s, 40, peak, 0.03, 0.1, 10) for s in (0, 4, 9)] == pytest.approx([1e-5, 5e-5, 1e-4])
    assert train.learning_rate(39, 40, peak, 0.03, 0.1, 10) == pytest.approx(1e-5)
    assert train.learning_rate(0, 3600, 4e-3, 0.03, 0.1, 10) == pytest.approx(4e-3 / 108)
    assert train.learning_rate(107, 3600, 4e-3, 0.03, 0.1, 10) == pytest.approx(4e-3)


def test_the_warm_start_check_scores_each_family_under_the_method_em_needs(monkeypatch):
    """The check poses mul and chain with the code prompt and the other families with the CoT one, on problems no
    training example poses, and scores greedy answers per family: here a stand-in model that answers with the
    teacher's solution in the prompt's style, except on mul_add where it answers 0."""
    args = train.parse_args(["--n_train=50", "--check_n=3", "--seed=4"])
    tokenizer = load("tiny")[1]
    check = train.warmstart_check(train.check_problems(args), tokenizer)
    trained = {r["problem"] for r in make_problems(50, "train", seed=4)}
    posed = []

    def teacher(net, prompts, max_new_tokens, **kwargs):
        samples = []
        for ids in prompts:
            text = tokenizer.decode(ids)
            record = next(r for r in make_problems(60, "train", seed=4 + 10_000) if text.startswith(r["problem"]))
            style = "code" if text.endswith("Use code.\n") else "cot"
            posed.append((record["family"], style, record["problem"] in trained))
            answer = teacher_solution(record, style) if record["family"] != "mul_add" else "\\boxed{0}"
            samples.append(types.SimpleNamespace(text=answer))
        return samples

    monkeypatch.setattr(train, "generate", teacher)
    accuracy = check(None)
    assert accuracy == {"cot:add_sub": 1.0, "cot:mul_add": 0.0, "cot:last_digit": 1.0, "code:mul": 1.0,
                        "code:chain": 1.0}
    assert sorted({(f, s) for f, s, _ in posed}) == sorted([("add_sub", "cot"), ("mul_add", "cot"),
                                                             ("last_digit", "cot"), ("mul", "code"), ("chain", "code")])
    assert len(posed) == 15 and not any(seen for _, _, seen in posed)


@pytest.mark.parametrize("script, kept", [(["met"], 0), (["cot", "met"], 1), (["far", "code", "far"], 1),
                                          (["code", "far", "far"], 0)])
def test_a_warm_start_that_misses_its_check_is_repaired(tmp_path, monkeypatch, capsys, script, kept):
    """A 4-step schedule checked at its end (scripted answers), with up to two 3-step repairs. Met at once, it is the
    run without a check, weight for weight. Missed, a repair schedule follows, warmed up again to repair_lr, on the
    problems of seed + 1000 per repair with the missed cells named, and the check's problems left out, until a check
    is met. Where every check misses, the state closest to the thresholds (80% code, 90% CoT) is kept, and the miss is
    said in capitals and in train_config.json."""
    answers = {"met": {"cot:add_sub": 0.9, "code:mul": 0.8},
               "cot": {"cot:add_sub": 0.875, "code:mul": 1.0},      # 2.5 points short
               "code": {"cot:add_sub": 1.0, "code:mul": 0.775},     # 2.5 points short
               "far": {"cot:add_sub": 0.85, "code:mul": 0.75}}      # 5 + 5 points short
    checked, drawn = [], []

    def scripted_check(problems, tokenizer):
        def check(model):
            checked.append({k: v.clone() for k, v in model.state_dict().items()})
            return answers[script[len(checked) - 1]]
        return check

    real_examples = train.warmstart_examples

    def examples(tokenizer, args, repairing=(), held_out=()):
        drawn.append((args.seed, set(repairing), set(held_out)))
        return real_examples(tokenizer, args, repairing, held_out)

    common = ["--device=cpu", "--steps=4", "--warmup_steps=1", "--warmup_frac=0", "--n_train=32", "--batch_size=2",
              "--log_every=100", "--repair_steps=3", "--repair_lr=1e-3", "--seed=5", "--restarts=0"]
    reference = train.main([*common, "--check_n=0", f"--out={tmp_path / 'reference'}"])[0]
    monkeypatch.setattr(train, "warmstart_check", scripted_check)
    monkeypatch.setattr(train, "warmstart_examples", examples)
    out = tmp_path / "warmstart"
    model, log = train.main([*common, "--repairs=2", f"--out={out}"])

    repairs = len(script) - 1
    assert len(checked) == len(script) and len(log) == 4 + 3 * repairs
    assert [e["lr"] for e in log] == pytest.approx([4e-3, 4e-3, 2.2e-3, 4e-4] + [1e-3, 1e-3, 1e-4] * repairs)
    for key, value in reference.state_dict().items():   # the first schedule is the check-free run
        assert torch.equal(checked[0][key], value), key
    for before, after in zip(checked, checked[1:]):       # each repair trains
        assert any(not torch.equal(before[key], after[key]) for key in before)
    check_problems = {r["problem"] for r in train.check_problems(train.parse_args(common))}
    assert drawn == [(5, set(), set())] + [(5 + 1000 * k, set(train.check_misses(answers[script[k - 1]], 0.8, 0.9)),
                                            check_problems) for k in range(1, 1 + repairs)]
    assert all(torch.equal(value, checked[kept][key]) for key, value in model.state_dict().items())
    saved = load(str(out))[0].state_dict()
    assert all(torch.equal(value, checked[kept][key]) for key, value in saved.items())
    config = json.load(open(out / "train_config.json"))
    assert config["steps_run"] == len(log) and config["repairs_run"] == repairs and config["restarts_run"] == 0
    assert config["check"] == answers[script[kept]] and config["kept_after_step"] == 4 + 3 * kept
    missed = "THE WARM START MISSED ITS THRESHOLDS" in capsys.readouterr().out
    assert missed == (script[kept] != "met") and bool(config["check_misses"]) == missed


@pytest.mark.parametrize("code_midway, restarted", [({"mul": 0.025, "chain": 0.0}, True),
                                                     ({"mul": 0.0, "chain": 0.05}, False)])
def test_a_warm_start_not_yet_copying_at_two_thirds_starts_again(tmp_path, monkeypatch, capsys, code_midway,
                                                                  restarted):
    """A 4-step schedule, checked at step 3 (scripted answers): forced code under 5% on mul and chain, it stops there
    and the warm start of seed + 1000 runs instead, weight for weight the check-free run of that seed, with no
    check at step 3 (no restart is left); 5% on one family, it runs on, the check-free run of its own seed."""
    answers = [{"cot:add_sub": 1.0, **{f"code:{f}": a for f, a in code_midway.items()}},
               {"cot:add_sub": 1.0, "code:mul": 1.0, "code:chain": 1.0}]
    checked = []

    def scripted_check(problems, tokenizer):
        def check(model):
            checked.append({k: v.clone() for k, v in model.state_dict().items()})
            return answers[len(checked) - 1]
        return check

    common = ["--device=cpu", "--steps=4", "--warmup_steps=1", "--warmup_frac=0", "--n_train=32", "--batch_size=2",
              "--log_every=100"]
    seed = 1005 if restarted else 5
    reference = train.main([*common, f"--seed={seed}", "--check_n=0", f"--out={tmp_path / 'reference'}"])[0]
    monkeypatch.setattr(train, "warmstart_check", scripted_check)
    out = tmp_path / "warmstart"
    model, log = train.main([*common, "--seed=5", "--restarts=1", f"--out={out}"])

    assert len(checked) == 2 and len(log) == (3 + 4 if restarted else 4)
    assert [e["lr"] for e in log] == pytest.approx([4e-3, 4e-3, 2.2e-3] * restarted + [4e-3, 4e-3, 2.2e-3, 4e-4])
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    config = json.load(open(out / "train_config.json"))
    assert config["seed_run"] == seed and config["restarts_run"] == int(restarted) and config["repairs_run"] == 0
    assert ("has not begun" in capsys.readouterr().out) == restarted


def test_a_repair_poses_the_cells_it_repairs_more_often_and_never_the_checks_problems(tiny):
    """Counted from the decoded examples: every problem of the draw but the held-out ones is posed, once, or
    1 + repair_weight times where its family and the solution's method are a cell being repaired."""
    _, tokenizer = tiny
    args = train.parse_args(["--n_train=100", "--drill_frac=0", "--repair_weight=3", "--seed=7"])
    records = {r["problem"]: r for r in make_problems(100, "train", seed=7)}
    assert len(records) == 100
    held_out = set(list(records)[:20])
    repairing = {"code:chain": 0.0, "cot:add_sub": 0.5}
    posed = {}
    for e in train.warmstart_examples(tokenizer, args, repairing, held_out):
        text = tokenizer.decode(e["input_ids"])
        problem = next(p for p in records if text.startswith(p))
        key = ("code" if "```python" in text else "cot", problem)
        posed[key] = posed.get(key, 0) + 1
    assert sorted(p for _, p in posed) == sorted(set(records) - held_out)
    assert {n for (_, p), n in posed.items() if records[p]["family"] not in ("chain", "add_sub")} == {1}
    for (style, problem), n in posed.items():
        assert n == (4 if f"{style}:{records[problem]['family']}" in repairing else 1), (style, problem)
    assert {n for n in posed.values()} == {1, 4}

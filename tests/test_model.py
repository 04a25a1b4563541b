"""model.py against references: transformers for the network and greedy decoding, a cache-free loop for the sampler,
and a scripted model for the tool path. Random tiny checkpoints are built from config and saved locally (no downloads)."""
import time

import pytest
import torch
import transformers

import model as M

VOCAB = 98  # the tiny tokenizer's size, so its tokenizer can be saved beside any test checkpoint

CONFIGS = {
    "llama_gqa_untied": (transformers.LlamaConfig, dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "llama_mha_tied_bias": (transformers.LlamaConfig, dict(num_key_value_heads=4, tie_word_embeddings=True,
                                                           attention_bias=True, mlp_bias=True)),
    "qwen2_gqa_bias_tied": (transformers.Qwen2Config, dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "qwen2_mha_untied": (transformers.Qwen2Config, dict(num_key_value_heads=4, tie_word_embeddings=False)),
    "llama3_rope": (transformers.LlamaConfig, dict(num_key_value_heads=2, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    "qwen2_yarn": (transformers.Qwen2Config, dict(num_key_value_heads=2, rope_parameters=dict(
        rope_type="yarn", rope_theta=1e6, factor=4.0, original_max_position_embeddings=16))),
    "llama_linear_head_dim": (transformers.LlamaConfig, dict(num_key_value_heads=2, head_dim=16, rope_parameters=dict(
        rope_type="linear", rope_theta=10000.0, factor=2.0))),
}


def make_checkpoint(path, name, seed=0, initializer_range=0.02):
    cls, kwargs = CONFIGS[name]
    config = cls(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=64, initializer_range=initializer_range, eos_token_id=0, pad_token_id=1,
                 bos_token_id=None, **kwargs)
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    hf.save_pretrained(path)
    M.tiny_tokenizer().save_pretrained(path)
    return hf


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {name: (str(root / name), make_checkpoint(str(root / name), name)) for name in CONFIGS}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_and_hidden_match_transformers(checkpoints, name):
    path, hf = checkpoints[name]
    model, _ = M.load(path)
    ids = torch.randint(0, VOCAB, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = hf(ids, output_hidden_states=True)
        torch.testing.assert_close(model(ids), reference.logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(ids, return_hidden=True), reference.hidden_states[-1], atol=1e-5, rtol=1e-5)
    assert (model.lm_head.weight is model.embed_tokens.weight) == hf.config.tie_word_embeddings


@pytest.mark.parametrize("name", ["llama_gqa_untied", "qwen2_gqa_bias_tied", "llama3_rope"])
def test_save_then_transformers_loads_identical_logits(checkpoints, tmp_path, name):
    model, tokenizer = M.load(checkpoints[name][0])
    M.save(model, tokenizer, str(tmp_path / "out"))
    M.save(model, tokenizer, str(tmp_path / "out"))  # overwriting an existing dir is atomic too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    ours_again, _ = M.load(str(tmp_path / "out"))
    ids = torch.randint(0, VOCAB, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(ours_again(ids), model(ids), atol=0, rtol=0)


def test_tiny_preset_and_its_tokenizer(tmp_path):
    model, tokenizer = M.load("tiny", seed=3)
    again, _ = M.load("tiny", seed=3)
    assert torch.equal(model.embed_tokens.weight, again.embed_tokens.weight)
    assert model.config.vocab_size == len(tokenizer) == 98 and model.lm_head.weight is model.embed_tokens.weight
    assert 0.4e6 < sum(p.numel() for p in model.parameters()) < 0.5e6
    text = "Q: 12 + 5 = ?\n```python\nprint(12 + 5)\n```\n```output\n17\n```\n\\boxed{17}"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == len(text) and tokenizer.decode(ids) == text
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<|pad|>"
    assert tokenizer.chat_template is None
    M.save(model, tokenizer, str(tmp_path / "tiny"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "tiny")).eval()
    saved_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tiny"))
    assert saved_tokenizer.encode(text, add_special_tokens=False) == ids and saved_tokenizer.padding_side == "right"
    x = torch.tensor([ids[:50]])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), atol=1e-6, rtol=1e-6)


def test_clear_errors(tmp_path, checkpoints):
    with pytest.raises(FileNotFoundError, match="neither a checkpoint dir"):
        M.load(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        M.load(str(tmp_path / "empty"))
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB)
    transformers.GPT2LMHeadModel(config).save_pretrained(str(tmp_path / "gpt2"))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*not supported"):
        M.load(str(tmp_path / "gpt2"))
    model, tokenizer = M.load(checkpoints["llama_gqa_untied"][0])
    with pytest.raises(ValueError, match="longer than the model's context of 64"):
        M.generate(model, [[2] * 10, [3] * 65], 5)
    with pytest.raises(ValueError, match="rope_scaling type 'longrope' is not supported"):
        M.rope_inverse_frequencies(M.Config(rope_scaling={"rope_type": "longrope"}))
    assert M.generate(model, [], 5) == []


def prompts_of_different_lengths(n=5):
    g = torch.Generator().manual_seed(7)
    return [torch.randint(2, VOCAB, (int(length),), generator=g).tolist() for length in torch.randint(1, 12, (n,), generator=g)]


# cache_block=3: the sampler's KV cache grows (and is copied) many times during the run
@pytest.mark.parametrize("cache_block", [M.CACHE_BLOCK, 3])
def test_greedy_generation_matches_transformers(tmp_path, monkeypatch, cache_block):
    monkeypatch.setattr(M, "CACHE_BLOCK", cache_block)
    # initializer_range 0.2 makes logits peaked, so float rounding between two implementations cannot flip an argmax
    hf = make_checkpoint(str(tmp_path / "ck"), "qwen2_gqa_bias_tied", seed=2, initializer_range=0.2)
    model, _ = M.load(str(tmp_path / "ck"))
    prompts = prompts_of_different_lengths()
    new = 24
    ours = M.generate(model, prompts, new, temperature=0, eos_token_id=[])
    width = max(map(len, prompts))
    input_ids = torch.tensor([[1] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    reference = hf.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=new, min_new_tokens=new,
                            do_sample=False, pad_token_id=1)
    for sample, row in zip(ours, reference[:, width:].tolist()):
        assert sample.tokens == row and sample.finish_reason == "length" and sample.sampled_mask == [1] * new


@pytest.mark.parametrize("cache_block", [M.CACHE_BLOCK, 3])
def test_cached_equals_cache_free_and_logprobs(checkpoints, monkeypatch, cache_block):
    monkeypatch.setattr(M, "CACHE_BLOCK", cache_block)
    model, _ = M.load(checkpoints["llama_gqa_untied"][0])
    distinct = prompts_of_different_lengths()
    prompts = distinct[:3] + distinct[:2] + distinct[3:] + [distinct[0]]  # repeats share one prefill
    samples = M.generate(model, prompts, 20, temperature=0, eos_token_id=[])
    reference = M.generate_reference(model, prompts, 20, temperature=0)
    for prompt, sample, (ids, logprobs) in zip(prompts, samples, reference):
        assert sample.tokens == ids[len(prompt):]
        assert sample.logprobs == pytest.approx(logprobs, abs=1e-4)


def test_sampled_generation_matches_the_reference(monkeypatch):
    """Seeded top-k / top-p sampling with EOS and the context end: generate() (packed prefill, shared prompts, a cache
    that grows, slots compacted as rows end) draws exactly what a full forward per token draws."""
    monkeypatch.setattr(M, "CACHE_BLOCK", 3)  # the long prompt would otherwise start with the whole context's room
    model, _ = M.tiny(seed=1)
    long_prompt = (list(range(2, 98)) * 4)[:375]  # 9 tokens short of the context
    prompts = prompts_of_different_lengths(5) * 2 + [long_prompt]
    seeds = list(range(20, 20 + len(prompts)))
    eos = list(range(2, 10))   # 8 of the 98 tokens end a row: most rows stop before 40 tokens
    kwargs = dict(temperature=0.8, top_k=20, top_p=0.9)
    samples = M.generate(model, prompts, 40, seed=seeds, eos_token_id=eos, **kwargs)
    reference = M.generate_reference(model, prompts, 40, seeds=seeds, eos=eos, **kwargs)
    for prompt, sample, (ids, logprobs) in zip(prompts, samples, reference):
        assert sample.tokens == ids[len(prompt):]
        assert sample.logprobs == pytest.approx(logprobs, abs=1e-4)
    assert {s.finish_reason for s in samples} == {"eos", "length"}
    assert len(samples[-1].tokens) == 9 and samples[-1].finish_reason == "length"


def test_packed_prefill_matches_forward_and_fills_the_cache(checkpoints):
    """prefill() runs prompts back to back without padding; every prompt must come out as if it ran alone."""
    model, _ = M.load(checkpoints["qwen2_gqa_bias_tied"][0])
    prompts = prompts_of_different_lengths(6)
    c = model.config
    shape = (c.num_hidden_layers, len(prompts), c.num_key_value_heads, max(map(len, prompts)), c.head_dim)
    cache = (torch.zeros(shape), torch.zeros(shape))
    with torch.no_grad():
        last = model.prefill(prompts, cache)
        for i, prompt in enumerate(prompts):
            alone = model(torch.tensor([prompt]), return_hidden=True)[0, -1]
            assert torch.allclose(last[i], alone, atol=1e-5)
            # the cached keys of the last layer, recomputed from that layer's input in a plain forward
            x = model.embed_tokens(torch.tensor([prompt]))
            cos, sin = model.rope_tables(len(prompt), x.dtype)
            for layer in model.layers[:-1]:
                x = layer(x, cos[:len(prompt)], sin[:len(prompt)])
            attention = model.layers[-1].self_attn
            qkv = attention.qkv_proj(model.layers[-1].input_layernorm(x))
            k = qkv[..., attention.q_size:attention.q_size + attention.kv_size].view(1, len(prompt), -1, c.head_dim)
            k = M.apply_rope(k.transpose(1, 2), cos[:len(prompt)], sin[:len(prompt)])[0]
            assert torch.allclose(cache[0][-1, i, :, :len(prompt)], k, atol=1e-5)
            assert not cache[0][:, i, :, len(prompt):].any()  # nothing written past the prompt


def test_sampled_logprobs_are_under_tempered_softmax(checkpoints):
    model, _ = M.load(checkpoints["llama_gqa_untied"][0])
    prompt = [5, 6, 7]
    sample = M.generate(model, [prompt], 6, temperature=0.7, top_k=5, seed=3, eos_token_id=[])[0]
    ids = prompt + sample.tokens
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0, len(prompt) - 1:-1]
    expected = torch.log_softmax(logits / 0.7, -1).gather(1, torch.tensor(sample.tokens)[:, None])[:, 0]
    assert sample.logprobs == pytest.approx(expected.tolist(), abs=1e-4)
    top5 = logits.topk(5, dim=-1).indices
    assert all(t in row for t, row in zip(sample.tokens, top5.tolist()))


def test_seeded_sampling_reproducible_and_independent_of_batch(checkpoints):
    model, _ = M.load(checkpoints["qwen2_mha_untied"][0])
    prompts = prompts_of_different_lengths(6)
    kwargs = dict(temperature=1.0, top_p=0.9, eos_token_id=[])
    batch = M.generate(model, prompts, 16, seed=[10, 11, 12, 13, 14, 15], **kwargs)
    again = M.generate(model, prompts, 16, seed=[10, 11, 12, 13, 14, 15], **kwargs)
    assert [s.tokens for s in batch] == [s.tokens for s in again]
    alone = M.generate(model, [prompts[3]], 16, seed=[13], **kwargs)[0]
    reordered = M.generate(model, [prompts[5], prompts[3]], 16, seed=[15, 13], **kwargs)
    assert alone.tokens == batch[3].tokens == reordered[1].tokens and reordered[0].tokens == batch[5].tokens
    unseeded = [tuple(M.generate(model, [prompts[0]] * 4, 16, **kwargs)[i].tokens) for i in range(4)]
    assert len(set(unseeded)) > 1  # the same prompt, different draws
    same_seed_twice = M.generate(model, [prompts[0], prompts[0]], 16, seed=[7, 7], **kwargs)
    assert same_seed_twice[0].tokens == same_seed_twice[1].tokens


def test_eos_stops_a_row_and_others_continue(checkpoints):
    model, tokenizer = M.load(checkpoints["llama_gqa_untied"][0])
    prompts = prompts_of_different_lengths(3)
    free = M.generate(model, prompts, 12, temperature=0, eos_token_id=[])
    eos = free[1].tokens[3]
    samples = M.generate(model, prompts, 12, temperature=0, eos_token_id=eos, tokenizer=tokenizer)
    first = free[1].tokens.index(eos)
    assert samples[1].tokens == free[1].tokens[:first + 1] and samples[1].finish_reason == "eos"
    assert samples[1].text == tokenizer.decode(free[1].tokens[:first])
    stop = tokenizer.decode(free[0].tokens[4:6])
    stopped = M.generate(model, prompts, 12, temperature=0, eos_token_id=[], tokenizer=tokenizer, stop_strings=[stop])[0]
    assert stopped.finish_reason == "stop" and stopped.text.endswith(stop) and len(stopped.tokens) <= 6


# ---- the tool path, on a scripted model: the token at position p+1 is SCRIPT[p+1] whatever came before, so any prefix
# of the script is a prompt and the expected response (injections included) is the rest of the script.

class ScriptedModel(M.Transformer):
    def __init__(self, script_ids):
        super().__init__(M.Config(vocab_size=VOCAB, hidden_size=VOCAB, num_attention_heads=2, num_key_value_heads=2,
                                  num_hidden_layers=1, intermediate_size=8, max_position_embeddings=len(script_ids) + 2,
                                  tie_word_embeddings=False, eos_token_id=0))
        self.script = torch.tensor(script_ids + [0, 0])
        self.lm_head.weight.data = 20 * torch.eye(VOCAB)

    def prefill(self, prompts, cache):
        return torch.nn.functional.one_hot(self.script[[len(p) for p in prompts]], VOCAB).float()

    def step(self, input_ids, cache, positions):
        return torch.nn.functional.one_hot(self.script[positions[:, None] + 1], VOCAB).float()


PROMPT = "Q: 6*7?\n"
CALL = "```python\nprint(6*7)\n```\n```output"


def scripted(tokenizer, parts):
    text = "".join(parts)
    return ScriptedModel(tokenizer.encode(text, add_special_tokens=False)), text


def test_tool_calls_inject_forced_tokens_then_max_calls():
    _, tokenizer = M.load("tiny")
    injected = M.tool_injection("42")
    notice = M.tool_injection(M.MAX_CALLS_NOTICE)
    model, text = scripted(tokenizer, [PROMPT, CALL, injected, "again", CALL, injected, "once more", CALL, notice,
                                       "and", CALL, "never reached"])
    seen = []

    def tool(responses):
        seen.extend(responses)
        return [("42", "ok") for _ in responses]

    prompt = tokenizer.encode(PROMPT)
    sample = M.generate(model, [prompt], 500, temperature=0, tokenizer=tokenizer, tool=tool, max_calls=2)[0]
    expected = text[len(PROMPT):text.index("never reached")]
    assert sample.text == expected and sample.finish_reason == "max_calls"
    assert sample.calls == 2 and sample.statuses == ["ok", "ok"]
    assert len(seen) == 2 and all(r.endswith(M.TOOL_TRIGGER) for r in seen) and seen[0] == CALL
    # the mask: 0 exactly on the injected characters (one token per character in the tiny tokenizer)
    mask = [1] * len(expected)
    start = 0
    for piece in (injected, injected, notice):
        start = expected.index(piece, start)
        mask[start:start + len(piece)] = [0] * len(piece)
        start += len(piece)
    assert sample.sampled_mask == mask
    assert all(lp == 0.0 for lp, m in zip(sample.logprobs, mask) if m == 0)
    assert all(lp < 0.0 for lp, m in zip(sample.logprobs, mask) if m == 1)


def test_tool_output_is_injected_and_other_rows_keep_decoding():
    _, tokenizer = M.load("tiny")
    # the script holds a placeholder of the same length as the real output: what is injected must be the tool's output
    model, text = scripted(tokenizer, [PROMPT, CALL, M.tool_injection("??"), "done" * 20])
    steps = []
    original_step = model.step
    model.step = lambda *args, **kwargs: steps.append(1) or original_step(*args, **kwargs)
    progress_while_waiting = []

    def tool(responses):
        # hold the call until the sampler has run 15 more decode steps for the other row (never, if it waited for us)
        before, deadline = len(steps), time.time() + 10
        while len(steps) < before + 15 and time.time() < deadline:
            time.sleep(0.005)
        progress_while_waiting.append(len(steps) - before)
        return [("42", "ok")] * len(responses)

    other_row = tokenizer.encode(text[:len(PROMPT) + len(CALL) + 10])  # starts past the call: never calls
    samples = M.generate(model, [tokenizer.encode(PROMPT), other_row], 70, temperature=0, tokenizer=tokenizer, tool=tool)
    assert progress_while_waiting[0] >= 15
    assert samples[0].text.startswith(CALL + M.tool_injection("42")) and samples[0].calls == 1
    assert samples[0].statuses == ["ok"] and samples[0].finish_reason == "length"
    assert samples[1].calls == 0 and samples[1].finish_reason == "length" and len(samples[1].tokens) == 70


def test_tool_callback_that_raises_is_reported():
    _, tokenizer = M.load("tiny")
    model, _ = scripted(tokenizer, [PROMPT, CALL, "rest of the text"])

    def broken(responses):
        raise OSError("sandbox is gone")

    with pytest.raises(RuntimeError, match="tool callback raised OSError: sandbox is gone"):
        M.generate(model, [tokenizer.encode(PROMPT)] * 3, 60, temperature=0, tokenizer=tokenizer, tool=broken)


def test_context_end_finishes_with_length():
    _, tokenizer = M.load("tiny")
    model, text = scripted(tokenizer, [PROMPT, "x" * 20])
    context = model.config.max_position_embeddings
    sample = M.generate(model, [tokenizer.encode(PROMPT)], 1000, temperature=0, tokenizer=tokenizer, eos_token_id=[])[0]
    assert sample.finish_reason == "length" and len(PROMPT) + len(sample.tokens) == context


def test_gumbel_sampling_follows_the_truncated_tempered_softmax():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0]).repeat(20000, 1)
    seeds, positions = torch.arange(20000), torch.full((20000,), 3)
    for temperature, top_k, top_p in [(1.0, 0, 1.0), (0.5, 3, 1.0), (1.0, 0, 0.7)]:
        tokens, logprobs = M.choose_tokens(logits, temperature, top_k, top_p, seeds, positions)
        probs = torch.softmax(logits[0] / temperature, -1)
        assert torch.allclose(logprobs, probs.log()[tokens])  # behaviour log-prob: before truncation
        if top_k:
            probs[top_k:] = 0
        if top_p < 1:
            probs[(probs.cumsum(0) - probs) >= top_p] = 0  # 2.0 alone has 0.53 < 0.7, so {2.0, 1.0} is kept
        expected = probs / probs.sum()
        observed = torch.bincount(tokens, minlength=5).float() / 20000
        assert torch.allclose(observed, expected, atol=0.015), (temperature, top_k, top_p, observed, expected)


def test_sharded_checkpoint_and_bf16(checkpoints, tmp_path):
    path, hf = checkpoints["qwen2_gqa_bias_tied"]
    hf.save_pretrained(str(tmp_path / "sharded"), max_shard_size="20KB")
    M.tiny_tokenizer().save_pretrained(str(tmp_path / "sharded"))
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    model, _ = M.load(str(tmp_path / "sharded"))
    ids = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)
        half, _ = M.load(path, dtype="bf16")
        assert half.embed_tokens.weight.dtype == torch.bfloat16
        torch.testing.assert_close(half(ids).float(), hf(ids).logits, atol=0.05, rtol=0.05)
    assert len(M.generate(half, [[3, 4, 5]], 4, temperature=0.8, seed=1)[0].tokens) == 4


def test_training_after_sampling_in_the_same_process():
    # The sampler runs under inference_mode; nothing it caches (e.g. RoPE tables) may poison a later backward.
    net, _ = M.load("tiny", seed=0)
    M.generate(net, [[5, 6, 7]], 2, temperature=0)
    net(torch.tensor([[5, 6, 7, 8]])).sum().backward()
    assert net.embed_tokens.weight.grad is not None

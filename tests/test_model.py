"""model.py against references: transformers for the network and greedy decoding, a cache-free loop for the sampler,
and a scripted model for the tool path. Random tiny checkpoints are built from config and saved locally (no downloads)."""
import time

import pytest
import torch
import transformers

import model
import sampler
import task
VOCAB = model.TINY_CONFIG["vocab_size"]  # the tiny tokenizer's size, so its tokenizer can be saved beside any test checkpoint

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
    task.tiny_tokenizer().save_pretrained(path)
    return hf


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {name: (str(root / name), make_checkpoint(str(root / name), name)) for name in CONFIGS}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_and_hidden_match_transformers(checkpoints, name):
    path, hf = checkpoints[name]
    net, _ = model.load(path)
    ids = torch.randint(0, VOCAB, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = hf(ids, output_hidden_states=True)
        torch.testing.assert_close(net(ids), reference.logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(net(ids, return_hidden=True), reference.hidden_states[-1], atol=1e-5, rtol=1e-5)
    assert (net.lm_head.weight is net.embed_tokens.weight) == hf.config.tie_word_embeddings


@pytest.mark.parametrize("name", ["llama_gqa_untied", "qwen2_gqa_bias_tied", "llama3_rope"])
def test_save_then_transformers_loads_identical_logits(checkpoints, tmp_path, name):
    net, tokenizer = model.load(checkpoints[name][0])
    model.save(net, tokenizer, str(tmp_path / "out"))
    model.save(net, tokenizer, str(tmp_path / "out"))  # overwriting an existing dir is atomic too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    ours_again, _ = model.load(str(tmp_path / "out"))
    ids = torch.randint(0, VOCAB, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, net(ids), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(ours_again(ids), net(ids), atol=0, rtol=0)


def test_tiny_preset_and_its_tokenizer(tmp_path):
    net, tokenizer = model.load("tiny", seed=3)
    again, _ = model.load("tiny", seed=3)
    assert torch.equal(net.embed_tokens.weight, again.embed_tokens.weight)
    assert net.config.vocab_size == len(tokenizer) == 197 and net.lm_head.weight is net.embed_tokens.weight
    assert 0.4e6 < sum(p.numel() for p in net.parameters()) < 0.5e6
    text = "Q: 12 + 5 = ?\n```python\nprint(12 + 5)\n```\n```output\n17\n```\n\\boxed{17}"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert [tokenizer.decode([i]) for i in ids] == [
        "Q", ":", " ", "1", "2", " ", "+", " ", "5", " ", "=", " ", "?", "\n", "```python", "\nprint(", "1", "2", " ", "+",
        " ", "5", ")\n```\n", "```output", "\n", "1", "7", "\n```\n", "\\boxed{", "1", "7", "}"]
    assert tokenizer.decode(ids) == text
    # The model's text and the tool output encoded apart give the same tokens as the whole text: no piece crosses
    # the cut after the trigger. Characters outside the vocabulary are dropped.
    cut = text.index("```output") + len("```output")
    assert tokenizer.encode(text[:cut], add_special_tokens=False) + tokenizer.encode(
        text[cut:], add_special_tokens=False) == ids
    assert tokenizer.decode(tokenizer.encode("\tA total\u00e9", add_special_tokens=False)) == "A total"
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<|pad|>"
    assert tokenizer.chat_template is None
    model.save(net, tokenizer, str(tmp_path / "tiny"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "tiny")).eval()
    saved_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tiny"))
    assert saved_tokenizer.encode(text, add_special_tokens=False) == ids and saved_tokenizer.padding_side == "right"
    x = torch.tensor([ids[:50]])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, net(x), atol=1e-6, rtol=1e-6)


def test_clear_errors(tmp_path, checkpoints):
    with pytest.raises(FileNotFoundError, match="neither a checkpoint dir"):
        model.load(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        model.load(str(tmp_path / "empty"))
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB)
    transformers.GPT2LMHeadModel(config).save_pretrained(str(tmp_path / "gpt2"))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*not supported"):
        model.load(str(tmp_path / "gpt2"))
    net, tokenizer = model.load(checkpoints["llama_gqa_untied"][0])
    with pytest.raises(ValueError, match="longer than the model's context of 64"):
        sampler.generate(net, [[2] * 10, [3] * 65], 5)
    with pytest.raises(ValueError, match="rope_scaling type 'longrope' is not supported"):
        model.rope_inverse_frequencies(model.Config(rope_scaling={"rope_type": "longrope"}))
    assert sampler.generate(net, [], 5) == []


def prompts_of_different_lengths(n=5):
    g = torch.Generator().manual_seed(7)
    return [torch.randint(2, VOCAB, (int(length),), generator=g).tolist() for length in torch.randint(1, 12, (n,), generator=g)]


# cache_block=3: the sampler's KV cache grows (and is copied) many times during the run
@pytest.mark.parametrize("cache_block", [sampler.CACHE_BLOCK, 3])
def test_greedy_generation_matches_transformers(tmp_path, monkeypatch, cache_block):
    monkeypatch.setattr(sampler, "CACHE_BLOCK", cache_block)
    # initializer_range 0.2 makes logits peaked, so float rounding between two implementations cannot flip an argmax
    hf = make_checkpoint(str(tmp_path / "ck"), "qwen2_gqa_bias_tied", seed=2, initializer_range=0.2)
    net, _ = model.load(str(tmp_path / "ck"))
    prompts = prompts_of_different_lengths()
    new = 24
    ours = sampler.generate(net, prompts, new, temperature=0, eos_token_id=[])
    width = max(map(len, prompts))
    input_ids = torch.tensor([[1] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    reference = hf.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=new, min_new_tokens=new,
                            do_sample=False, pad_token_id=1)
    for sample, row in zip(ours, reference[:, width:].tolist()):
        assert sample.tokens == row and sample.finish_reason == "length" and sample.sampled_mask == [1] * new


@pytest.mark.parametrize("cache_block", [sampler.CACHE_BLOCK, 3])
def test_cached_equals_cache_free_and_logprobs(checkpoints, monkeypatch, cache_block):
    monkeypatch.setattr(sampler, "CACHE_BLOCK", cache_block)
    net, _ = model.load(checkpoints["llama_gqa_untied"][0])
    distinct = prompts_of_different_lengths()
    prompts = distinct[:3] + distinct[:2] + distinct[3:] + [distinct[0]]  # repeats share one prefill
    samples = sampler.generate(net, prompts, 20, temperature=0, eos_token_id=[])
    reference = sampler.generate_reference(net, prompts, 20, temperature=0)
    for prompt, sample, (ids, logprobs) in zip(prompts, samples, reference):
        assert sample.tokens == ids[len(prompt):]
        assert sample.logprobs == pytest.approx(logprobs, abs=1e-4)


def test_sampled_generation_matches_the_reference(monkeypatch):
    """Seeded top-k / top-p sampling with EOS and the context end: generate() (packed prefill, shared prompts, a cache
    that grows, slots compacted as rows end) draws exactly what a full forward per token draws."""
    monkeypatch.setattr(sampler, "CACHE_BLOCK", 3)  # the long prompt would otherwise start with the whole context's room
    net, _ = model.tiny(seed=1)
    long_prompt = (list(range(2, 98)) * 4)[:375]  # 9 tokens short of the context
    prompts = prompts_of_different_lengths(5) * 2 + [long_prompt]
    seeds = list(range(20, 20 + len(prompts)))
    eos = list(range(2, 20))   # 18 of the 197 tokens end a row: most rows stop before 40 tokens
    kwargs = dict(temperature=0.8, top_k=20, top_p=0.9)
    samples = sampler.generate(net, prompts, 40, seed=seeds, eos_token_id=eos, **kwargs)
    reference = sampler.generate_reference(net, prompts, 40, seeds=seeds, eos=eos, **kwargs)
    for prompt, sample, (ids, logprobs) in zip(prompts, samples, reference):
        assert sample.tokens == ids[len(prompt):]
        assert sample.logprobs == pytest.approx(logprobs, abs=1e-4)
    assert {s.finish_reason for s in samples} == {"eos", "length"}
    assert len(samples[-1].tokens) == 9 and samples[-1].finish_reason == "length"


def test_packed_prefill_matches_forward_and_fills_the_cache(checkpoints):
    """prefill() runs prompts back to back without padding; every prompt must come out as if it ran alone."""
    net, _ = model.load(checkpoints["qwen2_gqa_bias_tied"][0])
    prompts = prompts_of_different_lengths(6)
    c = net.config
    shape = (c.num_hidden_layers, len(prompts), c.num_key_value_heads, max(map(len, prompts)), c.head_dim)
    cache = (torch.zeros(shape), torch.zeros(shape))
    with torch.no_grad():
        last = net.prefill(prompts, cache)
        for i, prompt in enumerate(prompts):
            alone = net(torch.tensor([prompt]), return_hidden=True)[0, -1]
            assert torch.allclose(last[i], alone, atol=1e-5)
            # the cached keys of the last layer, recomputed from that layer's input in a plain forward
            x = net.embed_tokens(torch.tensor([prompt]))
            cos, sin = net.rope_tables(len(prompt), x.dtype)
            for layer in net.layers[:-1]:
                x = layer(x, cos[:len(prompt)], sin[:len(prompt)])
            attention = net.layers[-1].self_attn
            qkv = attention.qkv_proj(net.layers[-1].input_layernorm(x))
            k = qkv[..., attention.q_size:attention.q_size + attention.kv_size].view(1, len(prompt), -1, c.head_dim)
            k = model.apply_rope(k.transpose(1, 2), cos[:len(prompt)], sin[:len(prompt)])[0]
            assert torch.allclose(cache[0][-1, i, :, :len(prompt)], k, atol=1e-5)
            assert not cache[0][:, i, :, len(prompt):].any()  # nothing written past the prompt


def test_sampled_logprobs_are_under_the_truncated_tempered_softmax(checkpoints):
    net, _ = model.load(checkpoints["llama_gqa_untied"][0])
    prompt = [5, 6, 7]
    sample = sampler.generate(net, [prompt], 6, temperature=0.7, top_k=5, seed=3, eos_token_id=[])[0]
    ids = prompt + sample.tokens
    with torch.no_grad():
        logits = net(torch.tensor([ids]))[0, len(prompt) - 1:-1]
    kept = (logits / 0.7).masked_fill(logits < logits.topk(5, dim=-1).values[:, -1:], float("-inf"))
    expected = torch.log_softmax(kept, -1).gather(1, torch.tensor(sample.tokens)[:, None])[:, 0]
    assert sample.logprobs == pytest.approx(expected.tolist(), abs=1e-4)
    top5 = logits.topk(5, dim=-1).indices
    assert all(t in row for t, row in zip(sample.tokens, top5.tolist()))


def test_seeded_sampling_reproducible_and_independent_of_batch(checkpoints):
    net, _ = model.load(checkpoints["qwen2_mha_untied"][0])
    prompts = prompts_of_different_lengths(6)
    kwargs = dict(temperature=1.0, top_p=0.9, eos_token_id=[])
    batch = sampler.generate(net, prompts, 16, seed=[10, 11, 12, 13, 14, 15], **kwargs)
    again = sampler.generate(net, prompts, 16, seed=[10, 11, 12, 13, 14, 15], **kwargs)
    assert [s.tokens for s in batch] == [s.tokens for s in again]
    alone = sampler.generate(net, [prompts[3]], 16, seed=[13], **kwargs)[0]
    reordered = sampler.generate(net, [prompts[5], prompts[3]], 16, seed=[15, 13], **kwargs)
    assert alone.tokens == batch[3].tokens == reordered[1].tokens and reordered[0].tokens == batch[5].tokens
    unseeded = [tuple(sampler.generate(net, [prompts[0]] * 4, 16, **kwargs)[i].tokens) for i in range(4)]
    assert len(set(unseeded)) > 1  # the same prompt, different draws
    same_seed_twice = sampler.generate(net, [prompts[0], prompts[0]], 16, seed=[7, 7], **kwargs)
    assert same_seed_twice[0].tokens == same_seed_twice[1].tokens


def test_eos_stops_a_row_and_others_continue(checkpoints):
    net, tokenizer = model.load(checkpoints["llama_gqa_untied"][0])
    prompts = prompts_of_different_lengths(3)
    free = sampler.generate(net, prompts, 12, temperature=0, eos_token_id=[])
    eos = free[1].tokens[3]
    samples = sampler.generate(net, prompts, 12, temperature=0, eos_token_id=eos, tokenizer=tokenizer)
    first = free[1].tokens.index(eos)
    assert samples[1].tokens == free[1].tokens[:first + 1] and samples[1].finish_reason == "eos"
    assert samples[1].text == tokenizer.decode(free[1].tokens[:first])
    stop = tokenizer.decode(free[0].tokens[4:6])
    stopped = sampler.generate(net, prompts, 12, temperature=0, eos_token_id=[], tokenizer=tokenizer, stop_strings=[stop])[0]
    assert stopped.finish_reason == "stop" and stopped.text.endswith(stop) and len(stopped.tokens) <= 6


# ---- the tool path, on a scripted model: the token at position p+1 is SCRIPT[p+1] whatever came before, so any prefix
# of the script is a prompt and the expected response (injections included) is the rest of the script.

class ScriptedModel(model.Transformer):
    def __init__(self, script_ids, vocab_size=VOCAB):
        vocab_size += -vocab_size % 4  # the width is the vocabulary: two heads of an even size
        super().__init__(model.Config(vocab_size=vocab_size, hidden_size=vocab_size, num_attention_heads=2,
                                  num_key_value_heads=2, num_hidden_layers=1, intermediate_size=8,
                                  max_position_embeddings=len(script_ids) + 2, tie_word_embeddings=False,
                                  eos_token_id=0))
        self.script = torch.tensor(script_ids + [0, 0])
        self.lm_head.weight.data = 20 * torch.eye(vocab_size)

    def prefill(self, prompts, cache):
        return torch.nn.functional.one_hot(self.script[[len(p) for p in prompts]], self.config.vocab_size).float()

    def step(self, input_ids, cache, positions):
        return torch.nn.functional.one_hot(self.script[positions[:, None] + 1], self.config.vocab_size).float()


PROMPT = "Q: 6*7?\n"
CALL = "```python\nprint(6*7)\n```\n```output"


def scripted(tokenizer, parts):
    text = "".join(parts)
    return ScriptedModel(tokenizer.encode(text, add_special_tokens=False)), text


def test_tool_calls_inject_forced_tokens_then_max_calls():
    _, tokenizer = model.load("tiny")
    injected = task.tool_injection("42")
    notice = task.tool_injection(task.MAX_CALLS_NOTICE)
    # the response as (part, 1 = written by the model / 0 = injected); each part is whole tokens of the tiny tokenizer
    parts = [(CALL, 1), (injected, 0), ("again", 1), (CALL, 1), (injected, 0), ("once more", 1), (CALL, 1), (notice, 0),
             ("and", 1), (CALL, 1)]
    net, text = scripted(tokenizer, [PROMPT] + [part for part, _ in parts] + ["never reached"])
    seen = []

    def tool(responses):
        seen.extend(responses)
        return [("42", "ok") for _ in responses]

    prompt = tokenizer.encode(PROMPT)
    sample = sampler.generate(net, [prompt], 500, temperature=0, tokenizer=tokenizer, tool=tool, max_calls=2)[0]
    expected = text[len(PROMPT):text.index("never reached")]
    assert sample.text == expected and sample.finish_reason == "max_calls"
    assert sample.calls == 2 and sample.statuses == ["ok", "ok"]
    assert len(seen) == 2 and all(r.endswith(task.TOOL_TRIGGER) for r in seen) and seen[0] == CALL
    # the mask: 0 exactly on the injected tokens
    assert "".join(part for part, _ in parts) == expected
    mask = [flag for part, flag in parts for _ in tokenizer.encode(part, add_special_tokens=False)]
    assert sample.sampled_mask == mask
    assert all(lp == 0.0 for lp, m in zip(sample.logprobs, mask) if m == 0)
    assert all(lp < 0.0 for lp, m in zip(sample.logprobs, mask) if m == 1)


def test_tool_output_is_injected_and_other_rows_keep_decoding():
    _, tokenizer = model.load("tiny")
    # the script holds a placeholder of the same length as the real output: what is injected must be the tool's output
    net, text = scripted(tokenizer, [PROMPT, CALL, task.tool_injection("??"), "done" * 20])
    steps = []
    original_step = net.step
    net.step = lambda *args, **kwargs: steps.append(1) or original_step(*args, **kwargs)
    progress_while_waiting = []

    def tool(responses):
        # hold the call until the sampler has run 15 more decode steps for the other row (never, if it waited for us)
        before, deadline = len(steps), time.time() + 10
        while len(steps) < before + 15 and time.time() < deadline:
            time.sleep(0.005)
        progress_while_waiting.append(len(steps) - before)
        return [("42", "ok")] * len(responses)

    other_row = tokenizer.encode(text[:len(PROMPT) + len(CALL) + 10])  # starts past the call: never calls
    samples = sampler.generate(net, [tokenizer.encode(PROMPT), other_row], 70, temperature=0, tokenizer=tokenizer, tool=tool)
    assert progress_while_waiting[0] >= 15
    assert samples[0].text.startswith(CALL + task.tool_injection("42")) and samples[0].calls == 1
    assert samples[0].statuses == ["ok"] and samples[0].finish_reason == "length"
    assert samples[1].calls == 0 and samples[1].finish_reason == "length" and len(samples[1].tokens) == 70


def test_tool_callback_that_raises_is_reported():
    _, tokenizer = model.load("tiny")
    net, _ = scripted(tokenizer, [PROMPT, CALL, "rest of the text"])

    def broken(responses):
        raise OSError("sandbox is gone")

    with pytest.raises(RuntimeError, match="tool callback raised OSError: sandbox is gone"):
        sampler.generate(net, [tokenizer.encode(PROMPT)] * 3, 60, temperature=0, tokenizer=tokenizer, tool=broken)


def test_context_end_finishes_with_length():
    _, tokenizer = model.load("tiny")
    net, text = scripted(tokenizer, [PROMPT, "x" * 20])
    context = net.config.max_position_embeddings
    sample = sampler.generate(net, [tokenizer.encode(PROMPT)], 1000, temperature=0, tokenizer=tokenizer, eos_token_id=[])[0]
    assert sample.finish_reason == "length" and len(PROMPT) + len(sample.tokens) == context


def test_gumbel_sampling_follows_the_truncated_tempered_softmax():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0]).repeat(20000, 1)
    seeds, positions = torch.arange(20000), torch.full((20000,), 3)
    for temperature, top_k, top_p in [(1.0, 0, 1.0), (0.5, 3, 1.0), (1.0, 0, 0.7)]:
        tokens, logprobs = sampler.choose_tokens(logits, temperature, top_k, top_p, seeds, positions)
        probs = torch.softmax(logits[0] / temperature, -1)
        if top_k:
            probs[top_k:] = 0
        if top_p < 1:
            probs[(probs.cumsum(0) - probs) >= top_p] = 0  # 2.0 alone has 0.53 < 0.7, so {2.0, 1.0} is kept
        expected = probs / probs.sum()
        assert torch.allclose(logprobs, expected.log()[tokens])  # behaviour log-prob: of what was sampled from
        observed = torch.bincount(tokens, minlength=5).float() / 20000
        assert torch.allclose(observed, expected, atol=0.015), (temperature, top_k, top_p, observed, expected)


def test_sharded_checkpoint_and_bf16(checkpoints, tmp_path):
    path, hf = checkpoints["qwen2_gqa_bias_tied"]
    hf.save_pretrained(str(tmp_path / "sharded"), max_shard_size="20KB")
    task.tiny_tokenizer().save_pretrained(str(tmp_path / "sharded"))
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    net, _ = model.load(str(tmp_path / "sharded"))
    ids = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(net(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)
        half, _ = model.load(path, dtype="bf16")
        assert half.embed_tokens.weight.dtype == torch.bfloat16
        torch.testing.assert_close(half(ids).float(), hf(ids).logits, atol=0.05, rtol=0.05)
    assert len(sampler.generate(half, [[3, 4, 5]], 4, temperature=0.8, seed=1)[0].tokens) == 4


def test_training_after_sampling_in_the_same_process():
    # The sampler runs under inference_mode; nothing it caches (e.g. RoPE tables) may poison a later backward.
    net, _ = model.load("tiny", seed=0)
    sampler.generate(net, [[5, 6, 7]], 2, temperature=0)
    net(torch.tensor([[5, 6, 7, 8]])).sum().backward()
    assert net.embed_tokens.weight.grad is not None


# ---- the tool path with subword tokenizers like those of real checkpoints, built here from a vocabulary and merges (no
# download): SentencePiece-style ones (Llama 2) add a "▁" prefix to text encoded on its own; byte-level BPE ones
# (Qwen2) have pieces that carry the newlines after "output".

def chain_merges(alphabet, words):
    """vocab {token: id} and BPE merges that build each word left to right from the alphabet."""
    tokens, merges = list(alphabet), []
    for word in words:
        built = word[0]
        for piece in word[1:]:
            if built + piece not in tokens:
                tokens.append(built + piece)
                merges.append((built, piece))
            built += piece
    return {token: i for i, token in enumerate(tokens)}, merges


SP_SPECIALS = ["</s>", "<unk>", "<s>"]  # EOS first: id 0, the scripted model's EOS
SP_ALPHABET = SP_SPECIALS + [f"<0x{b:02X}>" for b in range(256)] + ["▁"] + [chr(c) for c in range(33, 127)]
SP_WORDS = ["```", "output", "outputs", "python", "print", "Check", "The", "▁answer", "▁is", "▁4"]


def sentencepiece_tokenizer(style):
    """No newline in the vocabulary: it is the byte-fallback token <0x0A>, as in Llama 2."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    if style == "llama":  # what transformers builds for Llama: Metaspace, prepend_scheme "first"
        vocab, merges = chain_merges(SP_ALPHABET, SP_WORDS)
        return transformers.LlamaTokenizerFast(vocab=vocab, merges=merges, add_prefix_space=True)
    if style == "llama_legacy":  # the tokenizer.json of Llama 2 checkpoints: a Prepend("▁") normalizer
        vocab, merges = chain_merges(SP_ALPHABET, SP_WORDS)
        backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=True, unk_token="<unk>"))
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                             decoders.Strip(" ", 1, 0)])
    else:  # Unigram, prepend_scheme "always"; after its piece "output\n" the injection is "42\n```\n", alone "▁4"...
        pieces = SP_ALPHABET + [w for w in SP_WORDS + ["output\n"] if w not in SP_ALPHABET]
        backend = Tokenizer(models.Unigram([(p, -1.0 if len(p) > 1 and p not in SP_ALPHABET else -10.0)
                                            for p in pieces], unk_id=1, byte_fallback=True))
        backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
        backend.decoder = decoders.Sequence([decoders.Metaspace(prepend_scheme="always"), decoders.ByteFallback(),
                                             decoders.Fuse()])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>",
                                                clean_up_tokenization_spaces=False)


def byte_level_tokenizer(style):
    """Byte-level BPE with pieces "output\n" and "output\n\n". Qwen2's own pre-tokenizer splits "output" from the
    newlines, so its encode never makes them, but a model can still sample them; a plain ByteLevel one merges them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    to_unicode = bytes_to_unicode()
    words = ["```", "output\n\n", "output\n", "outputs", "\n\n", "```\n", "python", "print", "Check", " is", " answer"]
    alphabet = ["<|endoftext|>"] + [to_unicode[b] for b in range(256)]
    vocab, merges = chain_merges(alphabet, [[to_unicode[b] for b in w.encode()] for w in words])
    if style == "qwen2":
        return transformers.Qwen2TokenizerFast(vocab=vocab, merges=merges)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>",
                                                clean_up_tokenization_spaces=False)


def run_script(tokenizer, segments, outputs):
    """segments: (token ids, injected) pairs, the prompt first; the scripted model writes the others in turn, and
    generate() must inject the injected ones itself, token for token. outputs: the tool's, call after call. Returns
    the sample and the texts the tool was called with."""
    script = [t for ids, _ in segments for t in ids]
    net = ScriptedModel(script, vocab_size=len(tokenizer))
    seen = []

    def tool(responses):
        seen.extend(responses)
        return [(outputs[len(seen) - len(responses) + i], "ok") for i in range(len(responses))]

    sample = sampler.generate(net, [segments[0][0]], 500, temperature=0, tokenizer=tokenizer, tool=tool, eos_token_id=0)[0]
    response = segments[1:]
    assert sample.tokens == [t for ids, _ in response for t in ids] + [0]
    assert sample.sampled_mask == [int(not injected) for ids, injected in response for _ in ids] + [1]
    assert sample.finish_reason == "eos" and sample.calls == len(outputs)
    # one call per trigger, each with the text up to its injection
    before = [[t for ids, _ in response[:i] for t in ids] for i, (_, injected) in enumerate(response) if injected]
    assert seen == [tokenizer.decode(ids) for ids in before]
    return sample, seen


@pytest.mark.parametrize("style", ["llama", "llama_legacy", "unigram_always"])
def test_tool_injection_with_a_sentencepiece_tokenizer_has_no_prefix_space(style):
    """The model's tokens are those of the whole text; the injection must be exactly its tokens in that text, not
    the "▁"-prefixed ones of the injection encoded alone (the model would read "```output \\n42")."""
    tokenizer = sentencepiece_tokenizer(style)
    alone = tokenizer.encode(task.tool_injection("42"), add_special_tokens=False)
    assert tokenizer.decode(tokenizer.encode("```output", add_special_tokens=False) + alone) == "```output \n42\n```\n"
    # with a piece "output\n" the model writes the newline, and the injection leaves it out
    newline = "\n" if style == "unigram_always" else ""
    pieces = [(PROMPT, False), (CALL + newline, False), (task.tool_injection("42", bool(newline)), True),
              ("Check:\n" + CALL + newline, False), (task.tool_injection("42", bool(newline)), True),
              ("The answer is 42.", False)]
    text = "".join(p for p, _ in pieces)
    ids = tokenizer.encode(text, add_special_tokens=False)
    cuts = [sum(len(p) for p, _ in pieces[:i]) for i in range(len(pieces) + 1)]
    bounds = [next(k for k in range(len(ids) + 1) if tokenizer.decode(ids[:k]) == text[:cut]) for cut in cuts]
    segments = [(ids[a:b], injected) for (a, b), (_, injected) in zip(zip(bounds, bounds[1:]), pieces)]
    if newline:
        assert tokenizer.convert_ids_to_tokens(segments[1][0][-1]) == "output\n"
    sample, seen = run_script(tokenizer, segments, ["42", "42"])
    assert sample.text == text[len(PROMPT):] and seen[0] == CALL + newline


@pytest.mark.parametrize("style", ["qwen2", "byte_level"])
def test_tool_trigger_with_newlines_in_its_token(style):
    """"output\\n\\n" completes the trigger as "output" does; the injection then adds no newline of its own. A trigger
    in injected text, or "```outputs", calls nothing."""
    tokenizer = byte_level_tokenizer(style)

    def net(text, *pieces):  # the model's text, then pieces it samples as single tokens
        return tokenizer.encode(text, add_special_tokens=False) + tokenizer.convert_tokens_to_ids(list(pieces)), False

    def injected(output, after_newline):
        return tokenizer.encode(task.tool_injection(output, after_newline), add_special_tokens=False), True

    segments = [net(PROMPT), net("```python\nprint(6*7)\n```\n", "```", "outputĊĊ"), injected("42", True),
                net("Check:\n```python\nprint(7*6)\n```\n", "```", "outputĊ"), injected("42", True),
                net("```python\nprint(1)\n```\n", "```", "output"), injected("```output", False),
                net("No ", "```", "outputs"), net(" here. The answer is 42.")]
    sample, seen = run_script(tokenizer, segments, ["42", "42", "```output"])
    expected = ("```python\nprint(6*7)\n```\n```output\n\n42\n```\n"
                "Check:\n```python\nprint(7*6)\n```\n```output\n42\n```\n"
                "```python\nprint(1)\n```\n```output\n```output\n```\n"
                "No ```outputs here. The answer is 42.")
    assert sample.text == expected
    assert [s.rstrip("\n").endswith(task.TOOL_TRIGGER) for s in seen] == [True] * 3
    assert [len(s) - len(s.rstrip("\n")) for s in seen] == [2, 1, 0]


def test_a_trigger_fires_at_the_token_that_completes_it_and_only_then():
    """Injected text never calls the tool, nor does a sampled newline after it: only a sampled token that completes
    the trigger does."""
    tokenizer = byte_level_tokenizer("byte_level")
    rules = sampler._Rules(eos=set(), max_new_tokens=100, context=1000, tokenizer=tokenizer, stop_strings=[], has_tool=True,
                     max_calls=4)
    row = sampler._Row(prompt_length=1, seed=0)
    token = tokenizer.convert_tokens_to_ids
    assert not row.add_token(token("```"), False, 0.0, rules) and not row.add_token(token("output"), False, 0.0, rules)
    assert not row.add_token(token("Ċ"), True, -1.0, rules)  # after an injected trigger, a sampled newline is no call
    assert not row.add_token(token("```"), True, -1.0, rules)
    assert row.add_token(token("outputĊĊ"), True, -1.0, rules)


def test_truncated_sampling_logprobs_are_renormalised_over_the_kept_tokens():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0]).repeat(400, 1)
    seeds, positions = torch.arange(400), torch.full((400,), 5)
    temperature = 0.8
    p = torch.softmax(logits[0].double() / temperature, -1)  # by hand: descending, as the logits are
    for top_k, top_p, kept in [(2, 1.0, 2), (0, 0.85, 3), (0, 0.7, 2)]:
        # p = 0.647, 0.185, 0.099, ...: top_p 0.85 keeps three (0.83 before the third < 0.85, 0.93 before the fourth),
        # 0.7 keeps two (0.65 before the second, 0.83 before the third)
        tokens, logprobs = sampler.choose_tokens(logits, temperature, top_k, top_p, seeds, positions)
        assert set(tokens.tolist()) == set(range(kept))  # all the kept tokens drawn, no other
        expected = (p[tokens] / p[:kept].sum()).log()
        assert torch.allclose(logprobs.double(), expected, atol=1e-6), (top_k, top_p)
    # nothing truncated: exactly today's log_softmax, bit for bit; greedy: log_softmax of the raw logits
    for top_k, top_p in [(0, 1.0), (5, 1.0), (0, 0.9999999)]:
        tokens, logprobs = sampler.choose_tokens(logits, temperature, top_k, top_p, seeds, positions)
        assert torch.equal(logprobs, torch.log_softmax(logits / temperature, -1).gather(1, tokens[:, None])[:, 0])
    tokens, logprobs = sampler.choose_tokens(logits, 0, 2, 0.5, seeds, positions)
    assert (tokens == 0).all() and torch.equal(logprobs, torch.log_softmax(logits, -1)[:, 0])


# ---- the static-slot decode path (StaticDecoder): fixed buffers, steps on buckets of slots padded past the live rows,
# sampling and the EOS / length checks inside the step. On a GPU it is the default and replays CUDA graphs; the CPU
# runs the same code eagerly when asked (static_slots=True), which is how these tests drive it.

def assert_same_samples(ours, expected, atol=1e-5):
    for a, b in zip(ours, expected, strict=True):
        assert (a.tokens, a.sampled_mask, a.text, a.calls, a.statuses, a.finish_reason) == (
            b.tokens, b.sampled_mask, b.text, b.calls, b.statuses, b.finish_reason)
        assert a.logprobs == pytest.approx(b.logprobs, abs=atol)


@pytest.fixture
def static_steps(monkeypatch):
    """Records (rows decoding, bucket, staged positions) of every static step, and checks the device's done flag of
    each slot against what _Row.add_token then decided on the host: finished by EOS or length, or not."""
    steps, step, add_tokens = [], sampler.StaticDecoder.step, sampler._Slots.add_tokens
    last = {}

    def recorded_step(self, slots, n):
        result = step(self, slots, n)
        b = sampler.decode_bucket(n)
        steps.append((n, b, self.inputs[:b, 1].tolist()))
        last[id(slots)] = (self, list(slots.row_of[:n]))
        return result

    def checked_add_tokens(self, tokens, logprobs, rules):
        asking = add_tokens(self, tokens, logprobs, rules)
        if id(self) in last:
            decoder, rows = last.pop(id(self))
            ended = [self.rows[r].finish_reason in ("eos", "length") for r in rows]
            assert decoder.done.tolist() == ended
        return asking

    monkeypatch.setattr(sampler.StaticDecoder, "step", recorded_step)
    monkeypatch.setattr(sampler._Slots, "add_tokens", checked_add_tokens)
    return steps


@pytest.mark.parametrize("cache_block", [sampler.CACHE_BLOCK, 3])
def test_static_slots_greedy_equal_the_growing_path_and_the_reference(checkpoints, monkeypatch, static_steps,
                                                                      cache_block):
    monkeypatch.setattr(sampler, "CACHE_BLOCK", cache_block)
    net, _ = model.load(checkpoints["llama_gqa_untied"][0])
    distinct = prompts_of_different_lengths()
    prompts = distinct[:3] + distinct[:2] + distinct[3:] + [distinct[0]]  # 8 rows, repeats share one prefill
    static = sampler.generate(net, prompts, 20, temperature=0, eos_token_id=[], static_slots=True)
    assert_same_samples(static, sampler.generate(net, prompts, 20, temperature=0, eos_token_id=[]))
    reference = sampler.generate_reference(net, prompts, 20, temperature=0)
    for prompt, sample, (ids, logprobs) in zip(prompts, static, reference):
        assert sample.tokens == ids[len(prompt):] and sample.logprobs == pytest.approx(logprobs, abs=1e-4)
    assert {(n, b) for n, b, _ in static_steps} == {(8, 8)}


@pytest.mark.parametrize("buckets", [sampler.DECODE_BUCKETS, (2, 4, 8)])
def test_static_slots_sampled_rows_ending_at_different_times(monkeypatch, static_steps, buckets):
    """Seeded top-k / top-p sampling, rows ending by EOS and at the context end one after another: the static path
    draws what the growing path and a full forward per token draw. With buckets (2, 4, 8) the 11 rows start on 16
    slots (past the largest bucket, a multiple of it) and move down through 8, 4 and 2 as they end."""
    monkeypatch.setattr(sampler, "CACHE_BLOCK", 3)
    monkeypatch.setattr(sampler, "DECODE_BUCKETS", buckets)
    net, _ = model.tiny(seed=1)
    long_prompt = (list(range(2, 98)) * 4)[:375]  # 9 tokens short of the context
    prompts = prompts_of_different_lengths(5) * 2 + [long_prompt]
    seeds = list(range(20, 20 + len(prompts)))
    kwargs = dict(temperature=0.8, top_k=20, top_p=0.9, eos_token_id=list(range(2, 20)))
    static = sampler.generate(net, prompts, 40, seed=seeds, static_slots=True, **kwargs)
    assert_same_samples(static, sampler.generate(net, prompts, 40, seed=seeds, **kwargs))
    reference = sampler.generate_reference(net, prompts, 40, seeds=seeds, eos=kwargs.pop("eos_token_id"), **kwargs)
    for prompt, sample, (ids, logprobs) in zip(prompts, static, reference):
        assert sample.tokens == ids[len(prompt):] and sample.logprobs == pytest.approx(logprobs, abs=1e-4)
    assert {s.finish_reason for s in static} == {"eos", "length"}
    assert len({len(s.tokens) for s in static}) > 5  # the rows end at different steps
    used = [b for _, b, _ in static_steps]
    assert used == sorted(used, reverse=True) and used[-1] < used[0]
    if buckets == (2, 4, 8):
        assert set(used) == {16, 8, 4, 2}


def test_static_slots_pad_to_the_bucket_at_the_scratch_position(checkpoints, static_steps):
    """5 rows run on 8 slots: the 3 padding slots feed at the cache's last position, which no live row attends to."""
    assert [sampler.decode_bucket(n) for n in (1, 5, 8, 9, 200, 256, 257, 600)] == [8, 8, 8, 16, 256, 256, 512, 768]
    net, _ = model.load(checkpoints["qwen2_gqa_bias_tied"][0])
    prompts = prompts_of_different_lengths(5)
    kwargs = dict(temperature=1.0, top_k=10, seed=4, eos_token_id=[])
    assert_same_samples(sampler.generate(net, prompts, 12, static_slots=True, **kwargs),
                        sampler.generate(net, prompts, 12, **kwargs))
    longest = max(map(len, prompts)) + 12
    for n, b, positions in static_steps:
        assert (n, b) == (5, 8) and max(positions[:5]) < longest - 1
        assert positions[5:] == [positions[5]] * 3 and positions[5] >= max(positions[:5])


def test_static_slots_stop_strings_and_eos(checkpoints, static_steps):
    net, tokenizer = model.load(checkpoints["llama_gqa_untied"][0])
    prompts = prompts_of_different_lengths(3)
    free = sampler.generate(net, prompts, 12, temperature=0, eos_token_id=[])
    kwargs = dict(temperature=0, tokenizer=tokenizer, eos_token_id=free[1].tokens[3],
                  stop_strings=[tokenizer.decode(free[0].tokens[4:6])])
    static = sampler.generate(net, prompts, 12, static_slots=True, **kwargs)
    assert_same_samples(static, sampler.generate(net, prompts, 12, **kwargs))
    assert [s.finish_reason for s in static[:2]] == ["stop", "eos"]


class PaddedScriptedModel(ScriptedModel):
    """ScriptedModel for the static path: a padding slot sits at the cache's last position, which can be the context's
    last, where the script has no next token; what a padding slot gets is ignored anyway."""

    def step(self, input_ids, cache, positions):
        index = (positions[:, None] + 1).clamp(max=len(self.script) - 1)
        return torch.nn.functional.one_hot(self.script[index], self.config.vocab_size).float()


def test_static_slots_tool_calls_on_a_scripted_model(static_steps):
    """Rows starting at different points of a script with three calls: injections, max_calls and its notice, each row
    pausing and resuming at its own time, as on the growing path."""
    _, tokenizer = model.load("tiny")
    injected, notice = task.tool_injection("42"), task.tool_injection(task.MAX_CALLS_NOTICE)
    parts = [PROMPT, CALL, injected, "again", CALL, injected, "once more", CALL, notice, "and", CALL, "never reached"]
    text = "".join(parts)
    net = PaddedScriptedModel(tokenizer.encode(text, add_special_tokens=False))
    starts = [len(PROMPT), len(PROMPT) + 3, len(PROMPT) + len(CALL) + len(injected) + 2, len(PROMPT) + 1]
    prompts = [tokenizer.encode(text[:k]) for k in starts]

    def tool(responses):
        time.sleep(0.01)  # the other rows take a few steps meanwhile
        return [("42", "ok") for _ in responses]

    kwargs = dict(temperature=0, tokenizer=tokenizer, tool=tool, max_calls=2)
    static = sampler.generate(net, prompts, 500, static_slots=True, **kwargs)
    assert_same_samples(static, sampler.generate(net, prompts, 500, **kwargs))
    assert static[0].text == text[len(PROMPT):text.index("never reached")] and static[0].finish_reason == "max_calls"
    assert [s.calls for s in static] == [2, 2, 2, 2]
    assert any(n < 4 for n, _, _ in static_steps)  # some steps ran while rows waited in padding slots


class TriggerTokenizer:
    """The tiny tokenizer, except that four characters each decode to the whole tool trigger: a random model then calls
    the tool now and then, with a real KV cache (a scripted model has none)."""

    def __init__(self):
        self.inner = task.tiny_tokenizer()
        self.pieces = [self.inner.decode([i]) for i in range(len(self.inner))]
        for character in "@#$%":
            self.pieces[self.inner.convert_tokens_to_ids(character)] = task.TOOL_TRIGGER

    def encode(self, text, add_special_tokens=False):
        return self.inner.encode(text, add_special_tokens=False)

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids)


def test_static_slots_rows_waiting_in_padding_slots_keep_their_cache(static_steps):
    """A row waiting for its tool sits in a padding slot while the others decode, its slot fed at the scratch position;
    when it resumes, it must read the keys and values it left: its tokens and log-probs are those of the growing
    path (a row's draws depend only on its own sequence, so how long each call takes changes nothing)."""
    net, _ = model.tiny(seed=1)
    tokenizer = TriggerTokenizer()
    prompts = [tokenizer.encode(f"Q: {a} + {a + 3} = ?\n") for a in range(6)]

    def tool(responses):
        time.sleep(0.02)
        return [(str(len(r)), "ok") for r in responses]

    kwargs = dict(temperature=1.0, seed=5, tokenizer=tokenizer, tool=tool, max_calls=2, eos_token_id=[])
    static = sampler.generate(net, prompts, 48, static_slots=True, **kwargs)
    assert_same_samples(static, sampler.generate(net, prompts, 48, **kwargs))
    assert sum(s.calls for s in static) >= 3 and any(n < 6 for n, _, _ in static_steps)


def test_the_static_step_holds_no_op_a_cuda_graph_cannot(checkpoints, monkeypatch):
    """What a graph cannot capture, checked on the CPU: no op in the step reads a value back to the host (.item(),
    .tolist(), a comparison to a Python bool), makes a shape from data (nonzero, boolean-mask indexing) or builds a
    tensor from Python data (lift_fresh: on a GPU, a copy from the host)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    host_reads = {"_local_scalar_dense", "nonzero", "nonzero_static", "masked_select", "_unique2", "unique_dim",
                  "unique_consecutive", "equal", "is_nonzero", "allclose", "item", "lift_fresh"}

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen, self.boolean_indexing = set(), False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(func.overloadpacket.__name__)
            if func.overloadpacket.__name__.startswith("index"):
                indices = [i for a in args if isinstance(a, (list, tuple)) for i in a]
                self.boolean_indexing |= any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)
            return func(*args, **(kwargs or {}))

    ops, forward = Ops(), sampler.StaticDecoder._forward

    def watched(self, b):
        with ops:
            return forward(self, b)

    monkeypatch.setattr(sampler.StaticDecoder, "_forward", watched)
    net, _ = model.load(checkpoints["qwen2_gqa_bias_tied"][0])
    for kwargs in (dict(temperature=0, eos_token_id=[4, 5]),
                   dict(temperature=0.7, top_k=5, top_p=0.8, seed=1, eos_token_id=[])):
        sampler.generate(net, prompts_of_different_lengths(3), 6, static_slots=True, **kwargs)
    assert {"linear", "scaled_dot_product_attention", "sort", "topk", "index_copy_"} <= ops.seen  # it watched the step
    assert not ops.seen & host_reads and not ops.boolean_indexing


def test_the_cpu_default_is_the_growing_path(checkpoints, monkeypatch):
    made = []
    monkeypatch.setattr(sampler, "StaticDecoder", lambda *args, **kwargs: made.append(1))
    net, _ = model.load(checkpoints["llama_gqa_untied"][0])
    sampler.generate(net, prompts_of_different_lengths(3), 4, temperature=0)
    assert made == []


# ---- CUDA only: graph capture and replay. These cannot run on a CPU.
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("buckets", [sampler.DECODE_BUCKETS, (2, 4, 8)])
def test_cuda_graph_replay_equals_eager(checkpoints, monkeypatch, static_steps, dtype, buckets):
    """The same static step replayed as CUDA graphs (one per bucket, as rows end) and run eagerly: the same kernels,
    so the same tokens and log-probs; in fp32 also the growing path's."""
    monkeypatch.setattr(sampler, "DECODE_BUCKETS", buckets)
    captured, graph = [], sampler.StaticDecoder._graph

    def counted_graph(self, b):
        if b not in self.graphs:
            captured.append(b)
        return graph(self, b)

    monkeypatch.setattr(sampler.StaticDecoder, "_graph", counted_graph)
    net, _ = model.load(checkpoints["llama_gqa_untied"][0], dtype=dtype, device="cuda")
    prompts = prompts_of_different_lengths(10) * 2
    kwargs = dict(temperature=0.9, top_k=30, top_p=0.95, seed=list(range(len(prompts))), eos_token_id=[3, 4, 5])
    graphs = sampler.generate(net, prompts, 40, **kwargs)
    assert len(captured) > 1 and len(set(captured)) == len(captured)  # one graph per bucket used
    # bit for bit where capture picks the eager kernels; bf16 leaves room for a different cuBLAS choice
    atol = 1e-6 if dtype == torch.float32 else 1e-3
    assert_same_samples(graphs, sampler.generate(net, prompts, 40, cuda_graphs=False, **kwargs), atol=atol)
    if dtype == torch.float32:
        assert_same_samples(graphs, sampler.generate(net, prompts, 40, static_slots=False, **kwargs), atol=1e-4)
    assert len({len(s.tokens) for s in graphs}) > 3


@cuda
def test_cuda_graphs_greedy_fp32_equals_transformers(tmp_path):
    hf = make_checkpoint(str(tmp_path / "ck"), "qwen2_gqa_bias_tied", seed=2, initializer_range=0.2).cuda()
    net, _ = model.load(str(tmp_path / "ck"), device="cuda")
    prompts = prompts_of_different_lengths(12)
    new = 24
    ours = sampler.generate(net, prompts, new, temperature=0, eos_token_id=[])  # the default on a GPU: graphs
    width = max(map(len, prompts))
    input_ids = torch.tensor([[1] * (width - len(p)) + p for p in prompts], device="cuda")
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device="cuda")
    reference = hf.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=new, min_new_tokens=new,
                            do_sample=False, pad_token_id=1)
    assert [s.tokens for s in ours] == reference[:, width:].tolist()


@cuda
def test_cuda_graphs_tool_calls_on_a_scripted_model():
    _, tokenizer = model.load("tiny")
    injected = task.tool_injection("42")
    text = "".join([PROMPT, CALL, injected, "again", CALL, injected, "the end"])
    prompts = [tokenizer.encode(text[:k]) for k in (len(PROMPT), len(PROMPT) + 3, len(PROMPT) + len(CALL) + 4)]
    on_cpu = PaddedScriptedModel(tokenizer.encode(text, add_special_tokens=False))
    on_gpu = PaddedScriptedModel(tokenizer.encode(text, add_special_tokens=False)).cuda()
    on_gpu.script = on_gpu.script.cuda()
    kwargs = dict(temperature=0, tokenizer=tokenizer, tool=lambda responses: [("42", "ok")] * len(responses))
    assert_same_samples(sampler.generate(on_gpu, prompts, 300, **kwargs), sampler.generate(on_cpu, prompts, 300, **kwargs))

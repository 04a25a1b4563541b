"""Loading what real checkpoint dirs hold (issue 27, item 4), each against transformers' logits: several EOS ids (Llama
3's generation_config.json list, scaled to a small vocabulary), no PAD token, bf16 weights on disk loaded on the CPU,
tied embeddings with no lm_head tensor in the file, sharded safetensors with an index. The checkpoints are random
networks built from config with a Llama-3-style tokenizer (tests/realformat.py), saved by transformers as it saves
real ones (no download)."""
import json
import os
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import model
import sampler
import task
import train
from realformat import hf_config, llama3_tokenizer, qwen_tokenizer, random_model

@pytest.fixture(scope="module")
def tokenizer():
    return llama3_tokenizer()


def special(tokenizer, name):
    return tokenizer.convert_tokens_to_ids(name)


def llama3_config(tokenizer, **overrides):
    """Llama 3.1-Instruct's layout at toy size: BOS <|begin_of_text|>, config.json EOS [<|end_of_text|>, <|eot_id|>]
    (128001, 128009), no PAD, untied."""
    kwargs = dict(bos_token_id=special(tokenizer, "<|begin_of_text|>"), pad_token_id=None,
                  eos_token_id=[special(tokenizer, "<|end_of_text|>"), special(tokenizer, "<|eot_id|>")],
                  tie_word_embeddings=False, max_position_embeddings=128)
    kwargs.update(overrides)
    return hf_config("llama", tokenizer, **kwargs)


def save(hf, tokenizer, path, **kwargs):
    hf.save_pretrained(path, **kwargs)
    tokenizer.save_pretrained(path)
    return str(path)


def some_ids(tokenizer, n=3, length=24, seed=1):
    """Token ids of the task's text (chat prompts and the start of a solution), n rows of `length`."""
    rows = []
    for record in task.make_problems(n, "train", seed=seed):
        prompt = task.encode_prompt(tokenizer, record["problem"], "auto")
        response, _ = task.tokenize_response(tokenizer, task.teacher_solution(record, "cot"), prompt)
        rows.append((prompt + response)[:length])
    return torch.tensor(rows)


def assert_logits_match(path, hf, tokenizer, dtype="fp32", atol=1e-5):
    net, loaded_tokenizer = model.load(path, dtype=dtype)
    ids = some_ids(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(net(ids).float(), hf(ids).logits.float(), atol=atol, rtol=atol)
    return net, loaded_tokenizer


# ----------------------------------------------------------------------------------------------------------------- EOS
def permuted(hf, swaps):
    """The same network with token ids exchanged in pairs (embedding and head rows): it writes the swapped ids
    wherever the original wrote the others."""
    order = list(range(hf.config.vocab_size))
    for a, b in swaps:
        order[a], order[b] = order[b], order[a]
    order = torch.tensor(order)
    with torch.no_grad():
        hf.model.embed_tokens.weight.copy_(hf.model.embed_tokens.weight[order])
        hf.lm_head.weight.copy_(hf.lm_head.weight[order])
    return hf


@pytest.mark.parametrize("layout", ["generation_config_list", "config_list"])
def test_generation_stops_at_any_of_several_eos_ids(tmp_path, tokenizer, layout):
    """Llama 3: <|end_of_text|> (128001) and <|eot_id|> (128009) both end a reply. layout generation_config_list: the
    base model's config.json names one, generation_config.json the list; config_list: Instruct's config.json lists
    both. The network is arranged so that greedy decoding writes <|end_of_text|> in one row and <|eot_id|> in
    another: each row must end at its own, as transformers' generate ends it."""
    end_of_text, eot = special(tokenizer, "<|end_of_text|>"), special(tokenizer, "<|eot_id|>")
    config = llama3_config(tokenizer, initializer_range=0.2)  # peaked logits: no argmax flips between implementations
    hf = random_model(config, seed=3)
    # the problems' text without a chat template: no special token in a prompt, so the permutation below changes none
    prompts = [tokenizer.encode(r["problem"], add_special_tokens=False) for r in task.make_problems(3, "train", seed=2)]
    # where the network goes freely, greedy: the tokens to turn into the two EOS ids, each new in its row
    free = save(hf, tokenizer, tmp_path / "free")
    net, _ = model.load(free)
    rows = [s.tokens for s in sampler.generate(net, prompts, 12, temperature=0, eos_token_id=[])]
    a = next(t for t in rows[0][2:] if t not in rows[0][:2] and all(t not in p for p in prompts))
    b = next(t for t in rows[1][3:] if t not in rows[1][:3] + [a] and all(t not in p for p in prompts))
    permuted(hf, [(a, end_of_text), (b, eot)])
    if layout == "generation_config_list":
        hf.config.eos_token_id = end_of_text
    hf.generation_config.eos_token_id = [end_of_text, eot]
    path = save(hf, tokenizer, tmp_path / layout)
    on_disk = json.load(open(os.path.join(path, "config.json")))["eos_token_id"]
    assert on_disk == (end_of_text if layout == "generation_config_list" else [end_of_text, eot])
    assert json.load(open(os.path.join(path, "generation_config.json")))["eos_token_id"] == [end_of_text, eot]

    net, loaded = model.load(path)
    assert set(net.config.eos_token_id) == {end_of_text, eot} and loaded.pad_token is None
    samples = sampler.generate(net, prompts, 12, temperature=0)    # the model's own EOS ids: the default
    assert samples[0].tokens[-1] == end_of_text and samples[0].finish_reason == "eos"
    assert samples[1].tokens[-1] == eot and samples[1].finish_reason == "eos"
    assert samples[0].tokens == [a if t == end_of_text else t for t in rows[0][:len(samples[0].tokens) - 1]] + [
        end_of_text]
    # transformers, reading the same dir, computes the same logits and ends each row at the same token
    reference = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    assert_logits_match(path, reference, tokenizer)
    for prompt, sample in zip(prompts, samples):
        out = reference.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):].tolist()
        assert out == sample.tokens, (out, sample.tokens)
    # and a sampled row stops at the first of either, wherever it falls
    for sample in sampler.generate(net, prompts * 4, 24, temperature=1.0, seed=5):
        ends = [i for i, t in enumerate(sample.tokens) if t in (end_of_text, eot)]
        assert ends == ([len(sample.tokens) - 1] if sample.finish_reason == "eos" else [])


# ----------------------------------------------------------------------------------------------------------- no PAD
def test_no_pad_token(tmp_path, tokenizer):
    """Llama 3 has no PAD token (tokenizer and config): loading, sampling a batch of different lengths, an M-step on
    its own rollouts (train.py pads with the EOS id; ρ = 1 at the first step) and its checkpoint reloading in
    transformers all go without one."""
    assert tokenizer.pad_token is None
    hf = random_model(llama3_config(tokenizer), seed=4)
    path = save(hf, tokenizer, tmp_path / "ckpt")
    assert json.load(open(os.path.join(path, "config.json"))).get("pad_token_id") is None
    net, loaded = assert_logits_match(path, hf, tokenizer)
    assert loaded.pad_token_id is None
    problems = task.make_problems(4, "train", seed=6)
    prompts = [task.encode_prompt(loaded, r["problem"], "auto") for r in problems]
    assert len({len(p) for p in prompts}) > 1
    samples = sampler.generate(net, prompts, 10, temperature=1.0, seed=1, tokenizer=loaded)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(dict(
        id=str(i), prompt_ids=p, response_ids=s.tokens, trainable_mask=s.sampled_mask,
        behaviour_logprobs=s.logprobs, advantage=1.0 if i % 2 else -1.0, sft=True, temperature=1.0, top_p=1.0,
        top_k=0)) + "\n" for i, (p, s) in enumerate(zip(prompts, samples))))
    examples = train.record_examples([json.loads(line) for line in data.read_text().splitlines()], "rl")
    padded = train.collate(examples, loaded.eos_token_id, "cpu")
    assert (padded["input_ids"][~padded["trainable"]] >= 0).all()
    out = tmp_path / "out"
    _, log = train.main(["--device=cpu", "--mode=rl", f"--init={path}", f"--data={data}", "--epochs=1",
                         "--batch_size=4", "--log_every=100", f"--out={out}"])
    assert log[0]["ratio"] == pytest.approx(1.0, abs=1e-5) and log[0]["kl"] == pytest.approx(0.0, abs=1e-7)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert transformers.AutoTokenizer.from_pretrained(str(out)).pad_token is None
    assert_logits_match(str(out), reloaded, tokenizer)


# ------------------------------------------------------------------------------------------------------ bf16 on disk
def test_bf16_weights_on_disk_load_on_the_cpu(tmp_path, tokenizer):
    """Checkpoints ship in bf16 (config dtype bfloat16, BF16 safetensors). On the CPU model.load gives fp32 (the
    default) or bf16 weights: fp32 holds the bf16 values exactly, and gives transformers' fp32 logits; bf16 gives its
    bf16 logits up to bf16 rounding."""
    hf = random_model(llama3_config(tokenizer), seed=5).to(torch.bfloat16)
    path = save(hf, tokenizer, tmp_path / "bf16")
    assert json.load(open(os.path.join(path, "config.json")))["dtype"] == "bfloat16"
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"BF16"}
    on_disk = load_file(os.path.join(path, "model.safetensors"))

    net, _ = assert_logits_match(path, transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
                                 .eval(), tokenizer)
    assert net.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(net.embed_tokens.weight, on_disk["model.embed_tokens.weight"].float())
    assert torch.equal(net.layers[0].mlp.down_proj.weight, on_disk["model.layers.0.mlp.down_proj.weight"].float())

    half, _ = model.load(path, dtype="bf16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert torch.equal(half.lm_head.weight, on_disk["lm_head.weight"])
    reference = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ids = some_ids(tokenizer)
    with torch.no_grad():
        exact = net(ids)
        torch.testing.assert_close(half(ids).float(), reference(ids).logits.float(), atol=0.03, rtol=0.03)
        torch.testing.assert_close(half(ids).float(), exact, atol=0.03, rtol=0.03)
    # the sampler runs on the bf16 weights
    assert len(sampler.generate(half, ids.tolist(), 4, temperature=0.8, seed=1, eos_token_id=[])[0].tokens) == 4
    # saved from fp32, the checkpoint says so and transformers reads back the same network
    model.save(net, tokenizer, str(tmp_path / "fp32"))
    assert json.load(open(tmp_path / "fp32" / "config.json"))["dtype"] == "float32"
    assert_logits_match(str(tmp_path / "fp32"),
                        transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "fp32")).eval(), tokenizer)


# ------------------------------------------------------------------------------------------------- tied embeddings
@pytest.mark.parametrize("head_in_file", [False, True])
def test_tied_embeddings_without_an_lm_head_tensor(tmp_path, head_in_file):
    """Qwen2.5 up to 3B ties the head to the embedding: the file has no lm_head.weight (head_in_file False, what
    transformers writes). Some exports write the tied head anyway (True): the same network."""
    tokenizer = qwen_tokenizer()
    hf = random_model(hf_config("qwen2", tokenizer, tie_word_embeddings=True), seed=6)
    path = save(hf, tokenizer, tmp_path / "tied")
    weights = os.path.join(path, "model.safetensors")
    with safe_open(weights, "pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()
    if head_in_file:
        tensors = load_file(weights)
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
        save_file(tensors, weights, metadata={"format": "pt"})
    net, _ = assert_logits_match(path, hf, tokenizer)
    assert net.lm_head.weight is net.embed_tokens.weight
    model.save(net, tokenizer, str(tmp_path / "saved"))
    with safe_open(str(tmp_path / "saved" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "saved")).eval()
    assert reloaded.config.tie_word_embeddings
    assert_logits_match(str(tmp_path / "saved"), reloaded, tokenizer)


# ---------------------------------------------------------------------------------------------------------- sharded
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sharded_safetensors(tmp_path, tokenizer, dtype):
    """Real checkpoints of more than a few GB come in shards named by model.safetensors.index.json."""
    hf = random_model(llama3_config(tokenizer), seed=7).to(dtype)
    path = save(hf, tokenizer, tmp_path / "sharded", max_shard_size="50KB")
    assert not os.path.exists(os.path.join(path, "model.safetensors"))
    index = json.load(open(os.path.join(path, "model.safetensors.index.json")))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and all(os.path.exists(os.path.join(path, s)) for s in shards)
    assert set(index["weight_map"]) == {k for s in shards for k in load_file(os.path.join(path, s))}
    reference = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    net, _ = assert_logits_match(path, reference, tokenizer)
    model.save(net, tokenizer, str(tmp_path / "saved"))        # one file again, read back by transformers
    assert_logits_match(str(tmp_path / "saved"),
                        transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "saved")).eval(), tokenizer)


# --------------------------------------------------------------------------------------- what a save must keep
def test_save_keeps_the_generation_config(tmp_path):
    tokenizer = qwen_tokenizer()
    hf = random_model(hf_config("qwen2", tokenizer), seed=8)
    eos = [tokenizer.eos_token_id, special(tokenizer, "<|endoftext|>")]
    settings = dict(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)
    hf.generation_config = transformers.GenerationConfig(bos_token_id=None, eos_token_id=eos,
                                                         pad_token_id=tokenizer.pad_token_id, **settings)
    path = save(hf, tokenizer, tmp_path / "ckpt")
    net, loaded = model.load(path)
    assert set(net.config.eos_token_id) == set(eos)
    model.save(net, loaded, str(tmp_path / "saved"))
    saved = transformers.GenerationConfig.from_pretrained(str(tmp_path / "saved"))
    assert set(saved.eos_token_id) == set(eos)
    assert {key: getattr(saved, key) for key in settings} == settings


# what building a network on the meta device needs: allocations (RMSNorm's weights are torch.ones)
META_ALLOCATIONS = {"empty", "empty_strided", "ones", "zeros", "full", "fill_", "zero_"}


def test_loading_a_checkpoint_runs_no_compute_on_the_meta_device(tmp_path, tokenizer):
    """The weights come from the file: model.load has nothing to compute before it reads them. (Checked as the ops
    it runs on meta tensors, not as sys.modules: another test of the session may have imported torch._dynamo.)"""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class MetaOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if any(isinstance(t, torch.Tensor) and t.is_meta for t in tree_flatten(out)[0]):
                self.ops.add(func.overloadpacket.__name__)
            return out

    path = save(random_model(llama3_config(tokenizer)), tokenizer, tmp_path / "ckpt")
    with MetaOps() as seen:
        model.load(path)
    assert "empty" in seen.ops                 # it watched the meta construction
    assert seen.ops <= META_ALLOCATIONS, sorted(seen.ops - META_ALLOCATIONS)

"""A6: Transformer.step, one KV-cached decode step, against the cache-free full forward of the same sequences.

The cache is prefilled by model.prefill (reference code), and every position a row has not written yet is filled
with junk: a step that reads past its own position, or writes somewhere else, shows up as a wrong hidden state."""
import pytest
import torch

import model
import sampler
pytestmark = pytest.mark.A6

CONFIGS = {
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2),
    "mha_qkv_bias": dict(num_attention_heads=4, num_key_value_heads=4, qkv_bias=True),
    "one_kv_head_head_dim": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=6),
    "linear_rope": dict(num_attention_heads=2, num_key_value_heads=2, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "yarn_rope": dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=1e5,
                      rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
}


def make_model(name, seed=0, vocab=50):
    torch.manual_seed(seed)
    config = model.Config(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, intermediate_size=40,
                      max_position_embeddings=64, tie_word_embeddings=False, **CONFIGS[name])
    net = model.Transformer(config)
    model.init_weights(net, std=0.15)
    return net.eval()


def prompts(seed=1, lengths=(5, 1, 9, 3), vocab=50):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


def prefilled(net, seqs, capacity, seed=2):
    """A KVCache of len(seqs) slots and `capacity` positions holding each prompt's keys and values, junk after."""
    cache = sampler.KVCache(net.config, len(seqs), capacity, torch.float32, "cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        net.prefill(seqs, (cache.k, cache.v))
        for i, seq in enumerate(seqs):
            for t in (cache.k, cache.v):
                junk = t[:, i, :, len(seq):]
                junk.copy_(50 * torch.randn(junk.shape, generator=g))
    return cache


def full_hidden(net, seq):
    with torch.no_grad():
        return net(torch.tensor([seq]), return_hidden=True)[0, -1]


def step(net, cache, tokens, positions):
    with torch.no_grad():
        out = net.step(torch.tensor(tokens)[:, None], (cache.k, cache.v), torch.tensor(positions))
    assert out.shape == (len(tokens), 1, net.config.hidden_size), (
        f"step returns the final (normed) hidden states [n, 1, D] = [{len(tokens)}, 1, {net.config.hidden_size}], "
        f"got {tuple(out.shape)}")
    return out[:, 0]


def assert_close(got, expected, what):
    error = (got - expected).abs().max().item()
    assert error < 1e-4, (f"{what}: the cached step's hidden state is off by {error:.2e} from a full forward over the "
                          f"whole sequence")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_each_step_equals_the_full_forward(name):
    """step: rows at different positions in one step, 6 steps, each equal to a cache-free forward of the sequence"""
    net = make_model(name)
    seqs = prompts()
    cache = prefilled(net, seqs, capacity=24)
    g = torch.Generator().manual_seed(3)
    for j in range(6):
        tokens = torch.randint(2, 50, (len(seqs),), generator=g).tolist()
        positions = [len(s) for s in seqs]           # the new token's index in its sequence
        hidden = step(net, cache, tokens, positions)
        for i, (seq, token) in enumerate(zip(seqs, tokens)):
            seq.append(token)
            assert_close(hidden[i], full_hidden(net, seq), f"{name}, step {j}, row {i} (token at position {len(seq) - 1})")


def test_first_n_slots_only():
    """step: n = input_ids.shape[0] uses slots 0..n-1; slots n.. of the cache are not touched"""
    net = make_model("gqa")
    seqs = prompts(lengths=(4, 7, 2, 6))
    cache = prefilled(net, seqs, capacity=16)
    before_k, before_v = cache.k[:, 2:].clone(), cache.v[:, 2:].clone()
    hidden = step(net, cache, [11, 12], [4, 7])
    assert torch.equal(cache.k[:, 2:], before_k) and torch.equal(cache.v[:, 2:], before_v), \
        "a step over the first 2 slots wrote into slots 2 and 3"
    for i in range(2):
        assert_close(hidden[i], full_hidden(net, seqs[i] + [11 + i]), f"row {i}")


def test_writes_exactly_one_position_per_row():
    """step: each row writes its key and value at its own position of its own slot, in every layer, nothing else"""
    net = make_model("mha_qkv_bias")
    seqs = prompts(lengths=(3, 8))
    cache = prefilled(net, seqs, capacity=12)
    k0, v0 = cache.k.clone(), cache.v.clone()
    step(net, cache, [20, 21], [3, 8])
    changed = ((cache.k != k0) | (cache.v != v0)).any(-1)          # [layers, slots, kv_heads, capacity]
    for slot, position in ((0, 3), (1, 8)):
        where = changed[:, slot].any(0).any(0).nonzero().flatten().tolist()
        assert where == [position], (f"slot {slot} (a row whose new token is at position {position}) changed "
                                     f"positions {where} of the cache; it must write exactly position {position}")
        assert changed[:, slot, :, position].all(), f"slot {slot}: every layer and key/value head writes position {position}"


def test_the_mask_hides_positions_after_each_rows_own():
    """step: a row attends to positions 0..p only (junk after p, and another row's longer sequence, is masked)"""
    net = make_model("gqa")
    short, long = [7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18]
    cache = prefilled(net, [short, long], capacity=40)
    hidden = step(net, cache, [30, 31], [2, 10])
    assert_close(hidden[0], full_hidden(net, short + [30]), "the short row (position 2 of a 40-position cache)")
    assert_close(hidden[1], full_hidden(net, long + [31]), "the long row")


def test_rotary_positions_are_each_rows_own():
    """step: the token at position p is rotated by p (not 0, not the cache length, not another row's p)"""
    net = make_model("linear_rope")
    seqs = [[5] * 6, [5] * 6]
    cache = prefilled(net, seqs, capacity=20)
    # the same token after the same prefix: equal hidden states; the same token at position 6 and at 7 differ
    hidden = step(net, cache, [9, 9], [6, 6])
    assert torch.allclose(hidden[0], hidden[1], atol=1e-6)
    seqs[0].append(9)
    seqs[1].append(9)
    hidden = step(net, cache, [4, 4], [7, 7])
    assert_close(hidden[0], full_hidden(net, seqs[0] + [4]), "position 7")


def test_a_cache_that_grew_between_steps():
    """step: the capacity comes from the cache passed in (generate() grows it in blocks between steps)"""
    net = make_model("one_kv_head_head_dim")
    seqs = prompts(lengths=(3, 5))
    cache = prefilled(net, seqs, capacity=6)
    hidden = step(net, cache, [40, 41], [3, 5])
    for seq, token in zip(seqs, [40, 41]):
        seq.append(token)
    cache.grow(30)                                     # zeros beyond the old capacity, as in generate()
    for j in range(3):
        tokens = [42 + j, 43 + j]
        hidden = step(net, cache, tokens, [len(s) for s in seqs])
        for i, (seq, token) in enumerate(zip(seqs, tokens)):
            seq.append(token)
            assert_close(hidden[i], full_hidden(net, seq), f"after growing the cache, step {j}, row {i}")


def test_positions_past_the_rotary_table_built_so_far():
    """step: the rotary table must cover the cache's capacity (the model builds at most 4,096 positions up front)"""
    torch.manual_seed(6)
    config = model.Config(vocab_size=50, hidden_size=16, num_hidden_layers=1, intermediate_size=24,
                      max_position_embeddings=8192, num_attention_heads=2, num_key_value_heads=2)
    net = model.Transformer(config)
    model.init_weights(net, std=0.15)
    net.eval()
    g = torch.Generator().manual_seed(7)
    seq = torch.randint(2, 50, (4100,), generator=g).tolist()
    cache = prefilled(net, [seq], capacity=4104)
    hidden = step(net, cache, [9], [4100])
    assert_close(hidden[0], full_hidden(net, seq + [9]), "a token at position 4,100 of a 4,104-position cache")


def test_step_makes_every_tensor_on_the_models_device():
    """step: everything it builds is on the model's device and comes from tensors, never from host data (a GPU's
    CUDA graph holds the step). Run on PyTorch's "meta" device: shapes, no data, and no .item() / .tolist()"""
    net = make_model("gqa").to("meta")
    cache = sampler.KVCache(net.config, 3, 16, torch.float32, "meta")
    with torch.no_grad():
        hidden = net.step(torch.zeros(2, 1, dtype=torch.long, device="meta"), (cache.k, cache.v),
                          torch.tensor([4, 7], device="meta"))
    assert hidden.device.type == "meta" and tuple(hidden.shape) == (2, 1, net.config.hidden_size)


def test_a_bf16_model_steps_in_bf16():
    """step: a bf16 model with a bf16 cache (explore.py's default on a GPU) steps in bf16, close to its full forward"""
    net = make_model("gqa").bfloat16()
    seqs = prompts(lengths=(4, 7))
    cache = sampler.KVCache(net.config, len(seqs), 16, torch.bfloat16, "cpu")
    with torch.no_grad():
        net.prefill(seqs, (cache.k, cache.v))
        hidden = net.step(torch.tensor([[20], [21]]), (cache.k, cache.v), torch.tensor([4, 7]))
    assert hidden.dtype == torch.bfloat16, f"a bf16 model's step returns bf16 hidden states, got {hidden.dtype}"
    for i, (seq, token) in enumerate(zip(seqs, [20, 21])):
        expected = full_hidden(net, seq + [token]).float()
        error = (hidden[i, 0].float() - expected).abs().max().item() / expected.abs().max().item()
        assert error < 0.05, f"row {i}: the bf16 step is off by {error:.3f} of its scale from the bf16 full forward"


def test_greedy_decoding_with_the_cache_equals_decoding_without():
    """step: a greedy decode of 20 tokens through prefill + step gives the tokens of generate_reference"""
    net = make_model("gqa", seed=4)
    seqs = prompts(seed=5, lengths=(2, 6, 4))
    cache = prefilled(net, seqs, capacity=32)
    reference = sampler.generate_reference(net, seqs, 20, temperature=0)
    with torch.no_grad():
        last = torch.stack([full_hidden(net, s) for s in seqs])
    generated = [[] for _ in seqs]
    tokens = net.lm_head(last).argmax(-1).tolist()
    for j in range(20):
        for i, token in enumerate(tokens):
            generated[i].append(token)
        if j == 19:
            break
        positions = [len(s) + len(g) - 1 for s, g in zip(seqs, generated)]
        hidden = step(net, cache, tokens, positions)
        with torch.no_grad():
            tokens = net.lm_head(hidden).argmax(-1).tolist()
    for i, (ids, _) in enumerate(reference):
        assert generated[i] == ids[len(seqs[i]):], f"row {i}: cached greedy tokens differ from the cache-free ones"

"""The fused log-prob kernel against the naive computation it replaces."""

import pytest
import torch

from logprobs import fused_logprobs


def naive(hidden, weight, targets, temperature=1.0):
    logits = (hidden @ weight.T).float() / temperature
    return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)


def make(num_rows, vocab=50, width=16, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_rows, width, generator=generator).to(dtype).requires_grad_()
    weight = torch.randn(vocab, width, generator=generator).to(dtype).requires_grad_()
    targets = torch.randint(vocab, (num_rows,), generator=generator)
    upstream = torch.randn(num_rows, generator=generator)  # a generic per-row loss weight
    return hidden, weight, targets, upstream


def values_and_grads(function, hidden, weight, targets, upstream, **kwargs):
    hidden.grad = weight.grad = None
    values = function(hidden, weight, targets, **kwargs)
    values.backward(upstream)
    return values.detach(), hidden.grad.clone(), weight.grad.clone()


def assert_all_close(got, expected, atol):
    for name, a, b in zip(("values", "grad hidden", "grad weight"), got, expected):
        assert a.shape == b.shape, name
        error = (a.float() - b.float()).abs().max().item()
        assert error <= atol, f"{name}: max abs error {error:.2e} > {atol:.0e}"


# 23 rows: chunk sizes that divide it (1, 23), that do not (4, 7) and one larger than it (64)
@pytest.mark.parametrize("chunk_size", [1, 4, 7, 23, 64])
def test_matches_naive_fp32(chunk_size):
    inputs = make(23)
    expected = values_and_grads(naive, *inputs)
    got = values_and_grads(fused_logprobs, *inputs, chunk_size=chunk_size)
    assert_all_close(got, expected, atol=1e-5)


# 50 logits per row in vocabulary tiles that divide it (5, 50), that do not (1, 7, 13) and a tile larger than V
@pytest.mark.parametrize("vocab_tile", [1, 5, 7, 13, 50, 64])
@pytest.mark.parametrize("chunk_size", [4, 23])
def test_matches_naive_fp32_vocab_tiles(vocab_tile, chunk_size):
    inputs = make(23)
    expected = values_and_grads(naive, *inputs)
    got = values_and_grads(fused_logprobs, *inputs, chunk_size=chunk_size, vocab_tile=vocab_tile)
    assert_all_close(got, expected, atol=1e-5)


def test_online_log_sum_exp_with_far_apart_tiles():
    # each row's largest logits sit in a late tile, hundreds above the first tile's: the running max
    # must rescale the running sums (eq. 3), where a fixed shift would overflow exp or lose everything
    hidden, weight, targets, upstream = make(6, vocab=40, width=8, seed=4)
    direction = torch.nn.functional.normalize(torch.ones(8), dim=0)
    with torch.no_grad():
        hidden.mul_(0.1).add_(3 * direction)    # every row points along one direction...
        weight.mul_(0.1)[30:] += 25 * direction  # ...and so do the last tile's weights: logits ~75 there, ~0 before
    inputs = (hidden, weight, targets, upstream)
    got = values_and_grads(fused_logprobs, *inputs, chunk_size=4, vocab_tile=8)
    expected = values_and_grads(naive, *inputs)
    logits = (hidden @ weight.T).detach()
    assert (logits[:, 30:].max(1).values - logits[:, :8].max(1).values).min() > 50  # the case is what it says
    assert_all_close(got, expected, atol=1e-4 * max(1.0, expected[2].abs().max().item()))
    _, entropy = fused_logprobs(hidden, weight, targets, chunk_size=4, vocab_tile=8, return_entropy=True)
    probs = torch.softmax(logits, dim=-1)
    assert (entropy - (-(probs * probs.clamp_min(1e-30).log()).sum(-1))).abs().max() <= 1e-4


def test_single_row():
    inputs = make(1)
    assert_all_close(values_and_grads(fused_logprobs, *inputs, chunk_size=4), values_and_grads(naive, *inputs), 1e-5)


def test_large_vocab_rows_chunked():
    # a wider, Qwen-shaped slice: many chunks, non-dividing, realistic logit scale
    hidden, weight, targets, upstream = make(37, vocab=3000, width=64, seed=1)
    with torch.no_grad():
        weight.mul_(0.1)
    inputs = (hidden, weight, targets, upstream)
    assert_all_close(values_and_grads(fused_logprobs, *inputs, chunk_size=8), values_and_grads(naive, *inputs), 1e-5)


@pytest.mark.parametrize("temperature", [0.6, 1.7])
def test_temperature(temperature):
    inputs = make(19)
    expected = values_and_grads(naive, *inputs, temperature=temperature)
    got = values_and_grads(fused_logprobs, *inputs, chunk_size=5, temperature=temperature)
    assert_all_close(got, expected, atol=1e-5)


def test_masked_batch_positions_cost_nothing():
    # the trainer's use: [B, T, D] hidden states, only response tokens are trainable; the rows are
    # selected BEFORE the kernel, so masked positions get exactly zero gradient and no compute
    generator = torch.Generator().manual_seed(2)
    batch, length, width, vocab = 3, 9, 16, 40
    hidden = torch.randn(batch, length, width, generator=generator, requires_grad=True)
    weight = torch.randn(vocab, width, generator=generator, requires_grad=True)
    tokens = torch.randint(vocab, (batch, length), generator=generator)
    mask = torch.rand(batch, length, generator=generator) < 0.5
    mask[0, 0] = True  # at least one trainable token

    fused = fused_logprobs(hidden[mask], weight, tokens[mask], chunk_size=4)
    fused.sum().backward()
    fused_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    every_position = naive(hidden.reshape(-1, width), weight, tokens.reshape(-1)).reshape(batch, length)
    (every_position * mask).sum().backward()
    assert (fused.detach() - every_position[mask].detach()).abs().max() <= 1e-5
    assert (fused_grads[0] - hidden.grad).abs().max() <= 1e-5
    assert (fused_grads[1] - weight.grad).abs().max() <= 1e-5
    assert (fused_grads[0][~mask] == 0).all()


def test_bf16_tolerance():
    # bf16 inputs: the GEMMs run in bf16 (fp32 accumulation inside), the softmax and the weight
    # gradient's sum over chunks in fp32. Compared with the fp32 computation on the SAME bf16
    # numbers, the error is the rounding of the logits and of the gradient GEMMs' inputs to bf16
    # (relative 2^-8 ~ 4e-3 of each logit): documented tolerance 2e-2 absolute on the log-probs for
    # logits of a trained model's scale (|z| up to ~6 here), 2e-2 relative (in norm) on the gradients.
    hidden, weight, targets, upstream = make(29, vocab=300, width=32, seed=3)
    with torch.no_grad():
        hidden, weight = hidden.bfloat16().requires_grad_(), (0.25 * weight).bfloat16().requires_grad_()
    got = values_and_grads(fused_logprobs, hidden, weight, targets, upstream, chunk_size=8)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.bfloat16
    reference_inputs = [t.detach().float().requires_grad_() for t in (hidden, weight)]
    expected = values_and_grads(naive, *reference_inputs, targets, upstream)
    assert (got[0] - expected[0]).abs().max() <= 2e-2
    for a, b in zip(got[1:], expected[1:]):
        assert (a.float() - b).norm() <= 2e-2 * b.norm()


@pytest.mark.parametrize("vocab_tile", [None, 7])
def test_entropy_for_logging(vocab_tile):
    hidden, weight, targets, _ = make(13)
    logprobs, entropy = fused_logprobs(hidden, weight, targets, chunk_size=5, temperature=0.8, return_entropy=True,
                                       vocab_tile=vocab_tile)
    probs = torch.softmax(hidden @ weight.T / 0.8, dim=-1)
    assert (entropy - (-(probs * probs.log()).sum(-1))).abs().max() <= 1e-5
    assert not entropy.requires_grad
    assert (logprobs - naive(hidden, weight, targets, 0.8)).abs().max() <= 1e-5
    logprobs.sum().backward()  # entropy output does not disturb the gradient
    assert hidden.grad is not None


def test_frozen_weight_and_empty_input():
    hidden, weight, targets, upstream = make(11)
    weight.requires_grad_(False)
    fused_logprobs(hidden, weight, targets, chunk_size=3).backward(upstream)
    reference = hidden.detach().clone().requires_grad_()
    naive(reference, weight, targets).backward(upstream)
    assert (hidden.grad - reference.grad).abs().max() <= 1e-5
    empty = fused_logprobs(hidden[:0], weight, targets[:0])
    assert empty.shape == (0,)


def test_gradcheck_float64():
    hidden, weight, targets, _ = make(5, vocab=7, width=3, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda h, w: fused_logprobs(h, w, targets, chunk_size=2, temperature=0.9), (hidden, weight))


def test_mixed_dtypes_under_autocast():
    # a trainer under bf16 autocast may hand over fp32 hidden states and a bf16 head (or the reverse)
    hidden, weight, targets, upstream = make(9)
    head = (0.25 * weight.detach()).bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        values = fused_logprobs(hidden, head, targets, chunk_size=4)
    values.backward(upstream)
    assert values.dtype == torch.float32 and hidden.grad.dtype == torch.float32 and head.grad.dtype == torch.bfloat16
    expected = naive(hidden.detach().bfloat16().float(), head.detach().float(), targets)
    assert (values.detach() - expected).abs().max() <= 2e-2

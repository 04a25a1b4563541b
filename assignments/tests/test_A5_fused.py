"""A5: FusedLogprobs.backward against the naive log_softmax + gather it replaces (autograd's gradient)."""
import pytest
import torch

from logprobs import FusedLogprobs, fused_logprobs

pytestmark = pytest.mark.A5


def naive(hidden, weight, targets, temperature=1.0):
    logits = hidden @ weight.T
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature   # bf16 up to fp32, fp64 kept
    return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)


def make(rows, vocab=50, width=16, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = (scale * torch.randn(rows, width, generator=g)).to(dtype).requires_grad_()
    weight = torch.randn(vocab, width, generator=g).to(dtype).requires_grad_()
    targets = torch.randint(vocab, (rows,), generator=g)
    upstream = torch.randn(rows, generator=g)       # a different loss weight per row, some negative
    return hidden, weight, targets, upstream


def grads(function, hidden, weight, targets, upstream, **kwargs):
    hidden.grad = weight.grad = None
    values = function(hidden, weight, targets, **kwargs)
    values.backward(upstream)
    return hidden.grad.clone(), weight.grad.clone()


def check(got, expected, atol, what):
    for name, a, b in zip(("d hidden", "d weight"), got, expected):
        assert a.shape == b.shape, f"{what}: {name} has shape {tuple(a.shape)}, expected {tuple(b.shape)}"
        assert a.dtype == b.dtype, f"{what}: {name} has dtype {a.dtype}, expected {b.dtype} (the input's dtype)"
        error = (a.float() - b.float()).abs().max().item()
        assert error <= atol, f"{what}: {name} is off by up to {error:.2e} from the naive gradient (tolerance {atol:.0e})"


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 23, 64])
def test_gradients_match_naive_for_any_chunk_size(chunk_size):
    """backward: d hidden and d weight equal autograd's through log_softmax + gather, for chunks of rows"""
    inputs = make(23)
    check(grads(fused_logprobs, *inputs, chunk_size=chunk_size), grads(naive, *inputs), 1e-5,
          f"23 rows, chunk_size {chunk_size}")


@pytest.mark.parametrize("vocab_tile", [1, 7, 13, 50, 64])
def test_gradients_match_naive_for_any_vocabulary_tile(vocab_tile):
    """backward: the same for vocabulary tiles that divide V, that do not, and one larger than V"""
    inputs = make(23)
    check(grads(fused_logprobs, *inputs, chunk_size=5, vocab_tile=vocab_tile), grads(naive, *inputs), 1e-5,
          f"V = 50 in tiles of {vocab_tile}, chunks of 5 rows")


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_gradients_with_a_temperature(temperature):
    """backward: logits z = h·W^T / T, so both gradients carry the 1/T"""
    inputs = make(17, seed=1)
    check(grads(fused_logprobs, *inputs, chunk_size=6, vocab_tile=9, temperature=temperature),
          grads(naive, *inputs, temperature=temperature), 1e-5, f"temperature {temperature}")


def test_float64_gradcheck():
    """backward: torch.autograd.gradcheck in float64 (finite differences)"""
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(9, 4, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.randint(9, (5,), generator=g)
    assert torch.autograd.gradcheck(lambda h, w: fused_logprobs(h, w, targets, chunk_size=2, vocab_tile=4,
                                                                temperature=0.7), (hidden, weight), eps=1e-6,
                                    atol=1e-6)


def test_only_the_inputs_that_need_a_gradient():
    """backward: returns None for an input that does not require grad (hidden alone, or weight alone)"""
    h, w, t, up = make(11, seed=3)
    expected_h, expected_w = grads(naive, h, w, t, up)
    frozen_w = w.detach()
    h.grad = None
    fused_logprobs(h, frozen_w, t, chunk_size=4, vocab_tile=7).backward(up)
    assert h.grad is not None and torch.allclose(h.grad, expected_h, atol=1e-5), "d hidden with a frozen weight"
    frozen_h = h.detach()
    w.grad = None
    fused_logprobs(frozen_h, w, t, chunk_size=4, vocab_tile=7).backward(up)
    assert w.grad is not None and torch.allclose(w.grad, expected_w, atol=1e-5), "d weight with frozen hidden"


def test_repeated_targets_accumulate():
    """backward: rows sharing a target each add their onehot part to that row of d weight"""
    h, w, _, up = make(12, vocab=20, seed=4)
    targets = torch.tensor([3] * 6 + [7] * 6)
    check(grads(fused_logprobs, h, w, targets, up, chunk_size=5, vocab_tile=6), grads(naive, h, w, targets, up),
          1e-5, "12 rows with only 2 distinct targets")


def test_zero_and_uniform_upstream_gradients():
    """backward: the upstream gradient scales each row (0 rows contribute nothing)"""
    h, w, t, _ = make(9, seed=5)
    zero = torch.zeros(9)
    got = grads(fused_logprobs, h, w, t, zero, chunk_size=4, vocab_tile=8)
    assert got[0].abs().max() == 0 and got[1].abs().max() == 0, "upstream 0 everywhere: gradients 0"
    ones = torch.ones(9)
    check(grads(fused_logprobs, h, w, t, ones, chunk_size=4), grads(naive, h, w, t, ones), 1e-5, "upstream 1")
    mixed = torch.tensor([1.0, 0, 0, -2.0, 0, 0, 0, 3.0, 0])
    check(grads(fused_logprobs, h, w, t, mixed, chunk_size=2, vocab_tile=5), grads(naive, h, w, t, mixed), 1e-5,
          "upstream nonzero on 3 rows")


def test_one_row_and_large_logits():
    """backward: a single row; and logits in the hundreds, their largest in a late tile (softmax from the saved lse)"""
    h, w, t, up = make(1, seed=6)
    check(grads(fused_logprobs, h, w, t, up, vocab_tile=3), grads(naive, h, w, t, up), 1e-5, "one row")
    h, w, t, up = make(6, vocab=40, width=8, seed=7, scale=30.0)
    with torch.no_grad():
        w[35:] *= 3.0                      # the largest logits sit in the last tile
    check(grads(fused_logprobs, h, w, t, up, chunk_size=4, vocab_tile=10), grads(naive, h, w, t, up), 2e-3,
          "logits of magnitude ~ 100 - 1000")


def test_entropy_output_does_not_break_the_backward():
    """backward: with return_entropy=True the entropy gets no gradient (grad_entropy may be None or zeros)"""
    h, w, t, up = make(10, seed=8)
    expected = grads(naive, h, w, t, up)
    h.grad = w.grad = None
    values, entropy = fused_logprobs(h, w, t, chunk_size=3, vocab_tile=11, return_entropy=True)
    values.backward(up)
    check((h.grad, w.grad), expected, 1e-5, "return_entropy=True")
    h.grad = w.grad = None
    values, entropy = fused_logprobs(h, w, t, chunk_size=3, vocab_tile=11, return_entropy=True)
    (values * up).sum().backward()
    check((h.grad, w.grad), expected, 1e-5, "return_entropy=True, loss as a sum")


def test_bf16_inputs_give_bf16_gradients_close_to_fp32():
    """backward: bf16 hidden and weight get bf16 gradients, within bf16 rounding of the fp32 ones"""
    h32, w32, t, up = make(16, vocab=64, width=32, seed=9)
    expected = grads(naive, h32, w32, t, up)
    h = h32.detach().bfloat16().requires_grad_()
    w = w32.detach().bfloat16().requires_grad_()
    fused_logprobs(h, w, t, chunk_size=5, vocab_tile=20).backward(up)
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16, (h.grad.dtype, w.grad.dtype)
    for name, got, ref in (("d hidden", h.grad, expected[0]), ("d weight", w.grad, expected[1])):
        error = (got.float() - ref).abs().max().item() / ref.abs().max().item()
        assert error < 0.05, f"bf16 {name} is off by {error:.3f} of its scale from fp32"


def test_bf16_gradients_are_accumulated_in_fp32_over_many_tiles():
    """backward: d hidden sums one term per vocabulary tile; in bf16 that running sum loses its low bits at each of
    256 tiles, in fp32 (cast once at the end) it does not. The rows of the weight share one direction, so the sum is
    large next to what is left of it (W_t - Σ p W)"""
    g = torch.Generator().manual_seed(11)
    hidden = (0.05 * torch.randn(64, 64, generator=g)).bfloat16()
    weight = (torch.randn(4096, 64, generator=g) + 4 * torch.randn(64, generator=g)).bfloat16()
    targets, upstream = torch.randint(4096, (64,), generator=g), torch.randn(64, generator=g)
    expected = grads(naive, hidden.float().requires_grad_(), weight.float().requires_grad_(), targets, upstream)
    got = grads(fused_logprobs, hidden.clone().requires_grad_(), weight.clone().requires_grad_(), targets, upstream,
                chunk_size=64, vocab_tile=16)
    for name, a, b in zip(("d hidden", "d weight"), got, expected):
        error = (a.float() - b).abs().max().item() / b.abs().max().item()
        assert error < 0.02, (f"bf16 {name} over 256 vocabulary tiles is off by {error:.3f} of its scale from fp32 "
                              f"(the same bf16 inputs): accumulate in fp32 and cast once at the end")


def test_float64_inputs_get_float64_precision():
    """backward: fp64 inputs are accumulated in fp64 (the dtype of the forward's log-sum-exp), not rounded to fp32"""
    hidden, weight, targets, upstream = make(12, vocab=40, width=8, dtype=torch.float64, seed=12)
    expected = grads(naive, hidden, weight, targets, upstream)
    got = grads(fused_logprobs, hidden, weight, targets, upstream, chunk_size=5, vocab_tile=7)
    for name, a, b in zip(("d hidden", "d weight"), got, expected):
        error = (a - b).abs().max().item()
        assert a.dtype == torch.float64 and error < 1e-12, (
            f"fp64 {name}: dtype {a.dtype}, off by {error:.1e} from the fp64 naive gradient (fp32 arithmetic "
            f"leaves ~1e-7)")


def test_backward_keeps_every_tensor_on_the_inputs_device():
    """backward: every buffer it makes is on the inputs' device (run on PyTorch's "meta" device, which holds shapes
    and no data: a tensor made without device= lands on the CPU and the step fails, as it would on a GPU)"""
    hidden = torch.empty(6, 8, device="meta", requires_grad=True)
    weight = torch.empty(20, 8, device="meta", requires_grad=True)
    targets = torch.zeros(6, dtype=torch.long, device="meta")
    FusedLogprobs.apply(hidden, weight, targets, 4, 8, 1.0, False).sum().backward()   # (autocast knows no "meta")
    assert hidden.grad.device.type == "meta" and weight.grad.device.type == "meta"
    assert hidden.grad.shape == hidden.shape and weight.grad.shape == weight.shape


def test_backward_returns_one_gradient_per_forward_input():
    """backward: returns (d hidden, d weight, None, None, None, None, None): one value per forward argument"""
    h, w, t, up = make(4, seed=10)
    values = FusedLogprobs.apply(h, w, t, 2, 5, 1.0, False)
    values.backward(up)
    assert h.grad is not None and w.grad is not None

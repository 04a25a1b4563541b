"""A4: m_step_loss on hand-computed tokens and on a committed 300-token fixture; token_logprobs against log_softmax
of a full forward. The fused kernel is replaced here by the naive log_softmax + gather it stands for, so these
checks need nothing of A5."""
import json
import math
import os

import pytest
import torch

import model
import train
from common import FIXTURES

pytestmark = pytest.mark.A4


def loss_of(tokens, n_tokens=None, **kwargs):
    """tokens: [(π_θ, π_b, A, sft)] -> (loss, d loss / d log π_θ per token, stats)."""
    p, b, a, s = zip(*tokens)
    logprobs = torch.tensor(p, dtype=torch.float64).log().requires_grad_()
    loss, stats = train.m_step_loss(logprobs, torch.tensor(b, dtype=torch.float64).log(),
                                    torch.tensor(a, dtype=torch.float64), torch.tensor(s),
                                    len(tokens) if n_tokens is None else n_tokens, **kwargs)
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0, f"the loss must be a scalar tensor, got {loss!r}"
    loss.backward()
    return loss.item(), logprobs.grad.tolist(), stats


def approx(x, tol=1e-7):
    return pytest.approx(x, rel=tol, abs=tol)


# --------------------------------------------------------------------------- m_step_loss by hand
def test_ppo_min_form_by_hand():
    """m_step_loss: -(1/N) Σ min(ρA, clip(ρ, 1-ε, 1+ε)A), ρ = π_θ/π_b per token (dual clip off)"""
    tokens = [(0.5, 0.25, 1.0, False),     # ρ = 2,   A > 0: clip(ρ)·A = 1.2 < ρA = 2 -> 1.2, no gradient
              (0.125, 0.25, 1.0, False),   # ρ = 0.5, A > 0: ρA = 0.5 < 0.8 -> 0.5, gradient ρA
              (0.5, 0.25, -1.0, False),    # ρ = 2,   A < 0: ρA = -2 < -1.2 -> -2, gradient ρA
              (0.125, 0.25, -1.0, False),  # ρ = 0.5, A < 0: clip·A = -0.8 < -0.5 -> -0.8, no gradient
              (0.55, 0.5, 2.0, False)]     # ρ = 1.1 inside [0.8, 1.2]: 2.2, gradient ρA
    loss, grad, _ = loss_of(tokens, clip_eps=0.2, sft_weight=0.0, dual_clip=0.0)
    expected = -(1.2 + 0.5 - 2.0 - 0.8 + 2.2) / 5
    assert loss == approx(expected), (f"5 tokens (ρ, A) = (2, 1), (0.5, 1), (2, -1), (0.5, -1), (1.1, 2), ε = 0.2: "
                                      f"terms 1.2, 0.5, -2, -0.8, 2.2, loss = -(sum)/5 = {expected}; got {loss}")
    expected_grad = [-g / 5 for g in (0.0, 0.5, -2.0, 0.0, 2.2)]
    assert grad == approx(expected_grad), (
        f"d loss / d log π_θ = -(ρA)/N where the unclipped ρA is the min, 0 where the clipped term is: "
        f"{expected_grad}; got {grad}")


def test_the_ratio_is_against_the_behaviour_logprobs():
    """m_step_loss: ρ = exp(log π_θ - log π_b), the behaviour log-probs of the record (not detached π_θ, not π_b/π_θ)"""
    loss, grad, stats = loss_of([(0.3, 0.6, 1.0, False)], clip_eps=0.6, sft_weight=0.0, dual_clip=0.0)
    assert loss == approx(-0.5), f"π_θ = 0.3, π_b = 0.6: ρ = 0.5 (inside [0.4, 1.6]), loss -ρA = -0.5; got {loss}"
    assert grad == approx([-0.5]), f"d(-ρA)/d log π_θ = -ρA = -0.5; got {grad}"
    loss, _, _ = loss_of([(0.6, 0.3, 1.0, False)], clip_eps=2.0, sft_weight=0.0, dual_clip=0.0)
    assert loss == approx(-2.0), f"π_θ = 0.6, π_b = 0.3: ρ = 2, loss -2; got {loss}"
    loss, grad, stats = loss_of([(0.5, 0.0005, -1.0, False)], clip_eps=0.2, sft_weight=0.0, dual_clip=0.0)
    assert loss == approx(1000.0, 1e-6) and grad == approx([1000.0], 1e-6), (
        f"π_θ = 0.5, π_b = 0.0005: ρ = 1000 exactly (no cap on the ratio itself), A = -1, dual clip off: the min keeps "
        f"ρA = -1000, loss 1000, gradient -ρA = 1000; got loss {loss}, gradient {grad}")
    assert stats["ratio"] == approx(1000.0, 1e-6), f"the stats sum the same ratio: {stats['ratio']}"


def test_clip_range_follows_eps():
    """m_step_loss: the clip range is [1 - ε, 1 + ε] for the given ε"""
    loss, _, _ = loss_of([(0.5, 0.25, 1.0, False)], clip_eps=0.1, sft_weight=0.0, dual_clip=0.0)
    assert loss == approx(-1.1), f"ρ = 2, A = 1, ε = 0.1: clipped at 1.1; got {-loss} for the term"
    loss, _, _ = loss_of([(0.125, 0.25, -1.0, False)], clip_eps=0.3, sft_weight=0.0, dual_clip=0.0)
    assert loss == approx(0.7), f"ρ = 0.5, A = -1, ε = 0.3: min(-0.5, -0.7) = -0.7, loss 0.7; got {loss}"
    loss, _, _ = loss_of([(0.125, 0.25, 1.0, False)], clip_eps=0.3, sft_weight=0.0, dual_clip=0.0)
    assert loss == approx(-0.5), f"ρ = 0.5, A = 1, ε = 0.3: min(0.5, 0.7) = 0.5 (the min, not the clip); got {loss}"


def test_lambda_term_on_sft_tokens_only():
    """m_step_loss: -λ·Σ_{sft} log π_θ / N, on sft tokens only, scaled by sft_weight"""
    tokens = [(0.4, 0.4, 0.0, True), (0.2, 0.2, 0.0, False), (0.5, 0.5, 0.0, True)]
    loss, grad, _ = loss_of(tokens, clip_eps=0.2, sft_weight=0.5, dual_clip=0.0)
    expected = -0.5 * (math.log(0.4) + math.log(0.5)) / 3
    assert loss == approx(expected), (f"A = 0 everywhere, sft on tokens 1 and 3, λ = 0.5: "
                                      f"-0.5·(log 0.4 + log 0.5)/3 = {expected}; got {loss}")
    assert grad == approx([-0.5 / 3, 0.0, -0.5 / 3]), f"gradient -λ/N on sft tokens, 0 elsewhere; got {grad}"
    loss, grad, _ = loss_of(tokens, clip_eps=0.2, sft_weight=0.0, dual_clip=0.0)
    assert loss == approx(0.0) and grad == approx([0.0] * 3), "λ = 0 and A = 0: nothing"


def test_both_terms_add_on_the_same_token():
    """m_step_loss: a token with A ≠ 0 and sft gets both terms"""
    loss, grad, _ = loss_of([(0.3, 0.3, 2.0, True)], clip_eps=0.2, sft_weight=1.0, dual_clip=0.0)
    assert loss == approx(-(2.0 + math.log(0.3))), f"ρ = 1, A = 2, sft, λ = 1: -(2 + log 0.3); got {loss}"
    assert grad == approx([-(2.0 + 1.0)]), f"gradient -(ρA + λ) = -3; got {grad}"


def test_seven_tokens_with_defaults_but_lambda():
    """m_step_loss: the seven-token table of tests/test_train.py (ε = 0.2, λ = 0.5)"""
    tokens = [(0.5, 0.25, 1.0, False), (0.125, 0.25, 1.0, False), (0.5, 0.25, -1.0, False),
              (0.125, 0.25, -1.0, False), (0.55, 0.5, 2.0, False), (0.3, 0.3, 0.0, False), (0.4, 0.4, 0.0, True)]
    loss, grad, _ = loss_of(tokens, clip_eps=0.2, sft_weight=0.5)
    assert loss == approx(-(1.2 + 0.5 - 2.0 - 0.8 + 2.2 + 0.5 * math.log(0.4)) / 7)
    assert grad == approx([-g / 7 for g in (0, 0.5, -2.0, 0, 2.2, 0, 0.5)])


def test_the_defaults_are_the_papers():
    """m_step_loss: called without clip_eps, sft_weight and dual_clip it uses ε = 0.2, λ = 1 and c = 3"""
    tokens = [(0.5, 0.1, -1.0, False),    # ρ = 5, A = -1: min(-5, -1.2) = -5, held at c·A = -3 by the dual clip
              (0.5, 0.5, 0.0, True),      # ρ = 1, A = 0, sft: the λ term λ·log 0.5
              (0.5, 0.25, 1.0, False)]    # ρ = 2, A = 1: clipped at 1 + ε = 1.2
    loss, grad, stats = loss_of(tokens)
    expected = -(-3.0 + math.log(0.5) + 1.2) / 3
    assert loss == approx(expected), (f"defaults ε = 0.2, λ = 1, c = 3: terms -3, log 0.5, 1.2, loss {expected}; "
                                      f"got {loss}")
    assert grad == approx([0.0, -1.0 / 3, 0.0]), f"only the λ term moves (-λ/N); got {grad}"
    assert stats["dual_clipped"] == 1 and stats["clipped"] == 2, stats


def test_normalised_by_the_token_count_of_the_whole_step():
    """m_step_loss: divided by n_tokens (the step's trainable tokens), not by this call's token count"""
    tokens = [(0.3, 0.3, 1.0, False), (0.3, 0.3, -0.5, True)]
    whole, _, _ = loss_of(tokens, n_tokens=2, clip_eps=0.2, sft_weight=1.0, dual_clip=0.0)
    part, grad, _ = loss_of(tokens, n_tokens=8, clip_eps=0.2, sft_weight=1.0, dual_clip=0.0)
    assert part == approx(whole * 2 / 8), (f"n_tokens = 8 for these 2 tokens (a micro-batch of a larger step): the "
                                           f"loss is a quarter of the n_tokens = 2 loss {whole}; got {part}")
    assert grad == approx([-1.0 / 8, -(-0.5 + 1.0) / 8]), grad


def test_micro_batches_add_up_to_the_whole_step():
    """m_step_loss: two halves normalised by the step's total sum to the whole (accumulation is exact)"""
    g = torch.Generator().manual_seed(0)
    lp, bl = -torch.rand(10, generator=g) * 2, -torch.rand(10, generator=g) * 2
    a, s = torch.randn(10, generator=g), torch.rand(10, generator=g) > 0.5
    whole, _ = train.m_step_loss(lp, bl, a, s, 10, clip_eps=0.2, sft_weight=1.0, dual_clip=3.0)
    first, _ = train.m_step_loss(lp[:3], bl[:3], a[:3], s[:3], 10, clip_eps=0.2, sft_weight=1.0, dual_clip=3.0)
    second, _ = train.m_step_loss(lp[3:], bl[3:], a[3:], s[3:], 10, clip_eps=0.2, sft_weight=1.0, dual_clip=3.0)
    assert (first + second).item() == approx(whole.item(), 1e-5)


def test_n_tokens_may_be_a_tensor():
    """m_step_loss: train.py passes n_tokens as a 0-dim tensor (all-reduced over ranks)"""
    p = torch.tensor([0.5]).log()
    loss, _ = train.m_step_loss(p, p.clone(), torch.tensor([1.0]), torch.tensor([False]), torch.tensor(4.0),
                                clip_eps=0.2, sft_weight=1.0, dual_clip=0.0)
    assert loss.item() == approx(-0.25, 1e-6), f"ρ = 1, A = 1, n_tokens = tensor(4.): -1/4; got {loss.item()}"


def test_no_tokens_no_loss():
    """m_step_loss: a micro-batch without trainable tokens contributes 0 (not nan)"""
    empty = torch.zeros(0)
    loss, stats = train.m_step_loss(empty.clone().requires_grad_(), empty, empty, empty.bool(), 5,
                                    clip_eps=0.2, sft_weight=1.0, dual_clip=3.0)
    assert loss.item() == 0.0, f"0 tokens of a 5-token step: loss 0, got {loss.item()}"
    assert stats["tokens"] == 0
    logprobs = empty.clone().requires_grad_()
    loss, _ = train.m_step_loss(logprobs, empty, empty, empty.bool(), 5, clip_eps=0.2, sft_weight=1.0, dual_clip=3.0)
    loss.backward()                     # train.py calls backward on every micro-batch's loss, empty or not
    assert logprobs.grad is not None and logprobs.grad.numel() == 0


def test_the_ratio_of_two_tiny_probabilities():
    """m_step_loss: ρ from the difference of the log-probs, so π_θ = e^-120, π_b = e^-120.5 in fp32 gives ρ = e^0.5,
    not 0 / 0 (e^-120 is below fp32's smallest number)"""
    loss, stats = train.m_step_loss(torch.tensor([-120.0]), torch.tensor([-120.5]), torch.tensor([1.0]),
                                    torch.tensor([False]), 1, clip_eps=1.0, sft_weight=0.0, dual_clip=0.0)
    assert loss.item() == pytest.approx(-math.exp(0.5), rel=1e-5), f"ρ = e^0.5 = 1.6487, loss -ρA; got {loss.item()}"


def test_dual_clip_by_hand():
    """m_step_loss: with A < 0 the policy term is max(min(ρA, clip(ρ)A), c·A); A ≥ 0 untouched"""
    # (ρ, A) per token, π_b = 0.1, ε = 0.2, c = 3
    tokens = [(5.0, -1.0),    # min(-5, -1.2) = -5, dual clip: max(-5, -3) = -3, no gradient
              (2.0, -1.0),    # min(-2, -1.2) = -2 > -3: the dual clip does not bind, gradient ρA = -2
              (0.5, -1.0),    # min(-0.5, -0.8) = -0.8 (clipped), no gradient
              (5.0, 1.0),     # A > 0: min(5, 1.2) = 1.2, no gradient (never dual-clipped)
              (4.0, -0.5)]    # min(-2, -0.6) = -2 < 3·(-0.5) = -1.5: held at -1.5, no gradient
    as_probs = [(0.1 * rho, 0.1, a, False) for rho, a in tokens]
    loss, grad, stats = loss_of(as_probs, clip_eps=0.2, sft_weight=1.0, dual_clip=3.0)
    assert loss == approx(-(-3.0 - 2.0 - 0.8 + 1.2 - 1.5) / 5), (
        f"terms -3 (held at c·A), -2, -0.8, 1.2, -1.5 (held): loss {-(-3.0 - 2.0 - 0.8 + 1.2 - 1.5) / 5}; got {loss}")
    assert grad == approx([0, 2.0 / 5, 0, 0, 0]), f"only the second token has a gradient (-ρA/N = 0.4); got {grad}"
    off, _, _ = loss_of(as_probs, clip_eps=0.2, sft_weight=1.0, dual_clip=0.0)
    assert off == approx(-(-5.0 - 2.0 - 0.8 + 1.2 - 2.0) / 5), f"dual_clip = 0 is off: PPO's min alone; got {off}"
    loss, _, _ = loss_of([(0.5, 0.1, -1.0, False)], clip_eps=0.2, sft_weight=1.0, dual_clip=2.0)
    assert loss == approx(2.0), f"ρ = 5, A = -1, c = 2: held at c·A = -2, loss 2; got {loss}"


def test_stats_by_hand():
    """m_step_loss stats: sums over the tokens (ratio, clipped, dual_clipped, kl, nll) and the token count"""
    tokens = [(0.5, 0.25, 1.0, False), (0.125, 0.25, 1.0, False), (0.5, 0.05, -1.0, False),
              (0.11, 0.1, -1.0, False), (0.3, 0.3, 0.0, True)]
    _, _, stats = loss_of(tokens, clip_eps=0.2, sft_weight=1.0, dual_clip=3.0)
    ratios = [2.0, 0.5, 10.0, 1.1, 1.0]
    expected = {"tokens": 5, "clipped": 3, "dual_clipped": 1,
                "ratio": sum(ratios), "kl": sum(x - 1 - math.log(x) for x in ratios),
                "nll": -sum(math.log(p) for p, _, _, _ in tokens)}
    for key, value in expected.items():
        assert key in stats, f"stats[{key!r}] is missing (train.py logs it)"
        assert float(stats[key]) == approx(value, 1e-6), (
            f"stats[{key!r}]: expected {value} (ratios {ratios}; clipped: |ρ - 1| > ε; dual_clipped: A < 0 and ρ > c; "
            f"kl: Σ (ρ - 1) - log ρ; nll: -Σ log π_θ), got {stats[key]}")
    _, _, stats = loss_of(tokens, clip_eps=0.2, sft_weight=1.0, dual_clip=0.0)
    assert stats["dual_clipped"] == 0, "dual clip off: no token is dual-clipped"


def test_clipped_counts_only_ratios_strictly_outside_the_range():
    """m_step_loss stats: clipped counts |ρ - 1| > ε (a ratio of exactly 1 with ε = 0 is not clipped)"""
    p = torch.tensor([0.5, 0.25, 0.125], dtype=torch.float64).log()
    _, stats = train.m_step_loss(p, p.clone(), torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64),
                                 torch.tensor([False, True, False]), 3, clip_eps=0.0, sft_weight=1.0, dual_clip=0.0)
    assert stats["clipped"] == 0, f"ρ = 1 exactly on every token, ε = 0: nothing is outside, got {stats['clipped']}"
    assert stats["ratio"] == approx(3.0) and stats["kl"] == approx(0.0), stats


def test_gradient_reaches_only_the_policy_logprobs():
    """m_step_loss: differentiable in log π_θ (the loss is a tensor of the graph, not a float)"""
    lp = torch.tensor([-1.0, -2.0], requires_grad=True)
    bl = torch.tensor([-1.2, -1.9])
    loss, _ = train.m_step_loss(lp, bl, torch.tensor([1.0, -1.0]), torch.tensor([True, False]), 2,
                                clip_eps=0.2, sft_weight=1.0, dual_clip=3.0)
    loss.backward()
    assert lp.grad is not None and lp.grad.abs().sum() > 0, "no gradient reached the policy log-probs"


# --------------------------------------------------------------------------- m_step_loss on the fixture
with open(os.path.join(FIXTURES, "mstep_reference.json")) as _f:
    MSTEP = json.load(_f)


@pytest.mark.parametrize("name", sorted(MSTEP["settings"]))
def test_matches_the_reference_on_300_tokens(name):
    """m_step_loss: 300 seeded tokens (ratios 0.05-20, both signs of A, a third sft): loss, gradient and stats"""
    setting, inputs = MSTEP["settings"][name], MSTEP["inputs"]
    logprobs = torch.tensor(inputs["logprobs"], dtype=torch.float64, requires_grad=True)
    loss, stats = train.m_step_loss(logprobs, torch.tensor(inputs["behaviour_logprobs"], dtype=torch.float64),
                                    torch.tensor(inputs["advantages"], dtype=torch.float64),
                                    torch.tensor(inputs["sft"]), setting["n_tokens"], **setting["kwargs"])
    loss.backward()
    assert loss.item() == approx(setting["loss"], 1e-9), (
        f"setting {name} ({setting['kwargs']}, n_tokens {setting['n_tokens']}): loss {setting['loss']}, got "
        f"{loss.item()}")
    worst = max(range(len(setting["grad"])), key=lambda i: abs(logprobs.grad[i].item() - setting["grad"][i]))
    assert logprobs.grad[worst].item() == approx(setting["grad"][worst], 1e-8), (
        f"setting {name}: d loss / d log π_θ of token {worst} (ρ = "
        f"{math.exp(inputs['logprobs'][worst] - inputs['behaviour_logprobs'][worst]):.3f}, A = "
        f"{inputs['advantages'][worst]}, sft = {inputs['sft'][worst]}) should be {setting['grad'][worst]}, got "
        f"{logprobs.grad[worst].item()}")
    for key, value in setting["stats"].items():
        assert float(stats[key]) == approx(value, 1e-7), f"setting {name}: stats[{key!r}] {value}, got {stats[key]}"


# --------------------------------------------------------------------------- token_logprobs
def naive_fused_logprobs(hidden, weight, targets, chunk_size=2048, temperature=1.0, return_entropy=False,
                         vocab_tile=None):
    """What logprobs.fused_logprobs computes, the plain way (it stands in for the kernel so A5 is not needed)."""
    logp = torch.log_softmax((hidden @ weight.T).float() / temperature, -1)
    values = logp.gather(1, targets[:, None].long())[:, 0]
    if return_entropy:
        return values, -(logp.exp() * logp).sum(-1).detach()
    return values


@pytest.fixture
def kernel_calls(monkeypatch):
    calls = []

    def spy(hidden, weight, targets, **kwargs):
        calls.append({"rows": hidden.shape[0], "weight": weight, "targets": targets.tolist(), **kwargs})
        return naive_fused_logprobs(hidden, weight, targets, **kwargs)

    monkeypatch.setattr(train, "fused_logprobs", spy)
    return calls


def small_model(seed=0, vocab=40):
    torch.manual_seed(seed)
    net = model.Transformer(model.Config(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64,
                                 tie_word_embeddings=False))
    model.init_weights(net, std=0.2)
    return net


def batch_of(examples):
    return train.collate([train.example(*e) for e in examples], pad_id=1, device="cpu")


BATCH = [([5, 6, 7], [10, 11, 12, 13, 14], [1, 0, 0, 1, 1], [0.0] * 5, 1.0, False),   # tokens 2 and 3 injected
         ([5, 6], [20, 21, 22], [1, 1, 1], [0.0] * 3, -1.0, True),                     # padded by 3
         ([9], [30, 31], [1, 1], [0.0] * 2, 0.5, False)]                               # one prompt token
# (row, position) of every trainable token, in row-major order: token t is predicted by the hidden state at t - 1
TRAINABLE = [(0, 3), (0, 6), (0, 7), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2)]


def test_token_logprobs_are_the_shifted_trainable_tokens(kernel_calls):
    """token_logprobs: log π(y_t | y_<t) at the trainable positions, predicted from the hidden state at t - 1"""
    net = small_model()
    tensors = batch_of(BATCH)
    logprobs, entropy = train.token_logprobs(net, net.lm_head.weight, tensors, temperature=0.7, chunk_size=5)
    with torch.no_grad():
        full = torch.log_softmax(net(tensors["input_ids"]) / 0.7, -1)
    expected = [full[r, t - 1, tensors["input_ids"][r, t]].item() for r, t in TRAINABLE]
    assert logprobs.shape == (8,), f"one log-prob per trainable token (8 here), got shape {tuple(logprobs.shape)}"
    assert logprobs.tolist() == pytest.approx(expected, abs=1e-5), (
        f"token t's log-prob comes from the logits at position t - 1 (the hidden state [:, :-1] against the ids "
        f"[:, 1:] and the mask [:, 1:]); expected {[round(x, 4) for x in expected]}, got "
        f"{[round(x, 4) for x in logprobs.tolist()]}")
    expected_entropy = [-(full[r, t - 1].exp() * full[r, t - 1]).sum().item() for r, t in TRAINABLE]
    assert entropy.tolist() == pytest.approx(expected_entropy, abs=1e-4), "the entropy at the same positions"


def test_token_logprobs_send_only_trainable_rows_to_the_kernel(kernel_calls):
    """token_logprobs: the kernel gets the trainable rows only, with the temperature, chunk size and entropy flag"""
    net = small_model()
    tensors = batch_of(BATCH)
    train.token_logprobs(net, net.lm_head.weight, tensors, temperature=0.5, chunk_size=3)
    assert len(kernel_calls) == 1, f"one kernel call per batch, got {len(kernel_calls)}"
    call = kernel_calls[0]
    assert call["rows"] == 8, (f"the kernel must see only the 8 trainable positions (select hidden[mask] first: "
                               f"prompt, injected output and padding cost nothing), it saw {call['rows']} rows")
    assert call["targets"] == [tensors["input_ids"][r, t].item() for r, t in TRAINABLE], "targets in row-major order"
    assert call.get("temperature") == 0.5, f"temperature passed on as temperature=0.5, got {call.get('temperature')}"
    assert call.get("chunk_size") == 3, f"chunk_size passed on, got {call.get('chunk_size')}"
    assert call.get("return_entropy") is True, "return_entropy=True: train.py logs the entropy"


def test_token_logprobs_use_the_given_output_matrix(kernel_calls):
    """token_logprobs: the log-probs are against lm_weight, the matrix passed in (DDP passes the module's)"""
    net = small_model()
    tensors = batch_of(BATCH)
    other = torch.randn(40, 32, generator=torch.Generator().manual_seed(3))
    logprobs, _ = train.token_logprobs(net, other, tensors, temperature=1.0)
    with torch.no_grad():
        hidden = net(tensors["input_ids"], return_hidden=True)
        full = torch.log_softmax(hidden @ other.T, -1)
    expected = [full[r, t - 1, tensors["input_ids"][r, t]].item() for r, t in TRAINABLE]
    assert logprobs.tolist() == pytest.approx(expected, abs=1e-5), "use the lm_weight argument, not net.lm_head"


def test_token_logprobs_are_differentiable_in_the_model(kernel_calls):
    """token_logprobs: gradients reach the model's parameters as through a plain log_softmax"""
    net = small_model()
    tensors = batch_of(BATCH)
    logprobs, _ = train.token_logprobs(net, net.lm_head.weight, tensors, temperature=0.7)
    weights = torch.arange(1.0, 9.0)
    (logprobs * weights).sum().backward()
    got = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad()
    full = torch.log_softmax(net(tensors["input_ids"]) / 0.7, -1)
    sum(w * full[r, t - 1, tensors["input_ids"][r, t]] for w, (r, t) in zip(weights, TRAINABLE)).backward()
    for name, p in net.named_parameters():
        assert got[name] is not None and torch.allclose(got[name], p.grad, atol=1e-5), f"gradient of {name} differs"


def test_token_logprobs_single_row_without_padding(kernel_calls):
    """token_logprobs: a batch of one sequence, every response token trainable"""
    net = small_model(seed=1)
    tensors = batch_of([([3, 4], [5, 6, 7], [1, 1, 1], [0.0] * 3, 0.0, True)])
    logprobs, _ = train.token_logprobs(net, net.lm_head.weight, tensors)
    with torch.no_grad():
        full = torch.log_softmax(net(tensors["input_ids"]), -1)
    assert logprobs.tolist() == pytest.approx([full[0, 1, 5].item(), full[0, 2, 6].item(), full[0, 3, 7].item()],
                                              abs=1e-5)

"""
logprobs.py: the M-step's log π_θ(y_t | x, y_<t), forward and backward, without ever holding N x V logits.

The M-step needs log pi_theta(y_t | x, y_<t) for every trainable response token. The naive way,

    logprobs = log_softmax(hidden @ weight.T, -1).gather(1, targets[:, None])

materialises N x V logits, then an N x V log-softmax, and in the backward an N x V gradient of the
gather and an N x V gradient of the logits: with Qwen's V = 151,936 that is 1.2 GB per 2,048 tokens
for EACH of them, and it is where RL trainers usually run out of memory.

Per row only two numbers matter: the target logit z_t and the log-normaliser lse = log sum_j exp z_j,

    log p_t = z_t - lse                                                              (1)

and the gradient of (1) with respect to the logits is the familiar

    d log p_t / d z_j = onehot_j(t) - softmax_j(z)                                   (2)

So the forward keeps only lse per row, and the backward recomputes the logits it needs (one more
matmul: 4 instead of naive's 3) and turns them into softmax - onehot with the saved lse.

The work is cut in tiles: a chunk of rows (chunk_size) times a slice of the vocabulary (vocab_tile).
A tile's logits are a few MB, so everything done to them between the matmuls (max, exp, sums) runs
in the CPU's cache instead of streaming 1.2 GB arrays through memory, and the weight gradient of a
vocabulary slice is written once per row chunk. The price is that lse is built up tile by tile,
the "online" log-sum-exp of flash attention: with m the running max and s = sum exp(z - m),

    m' = max(m, max_tile z),   s' = s exp(m - m') + sum_tile exp(z - m'),   lse = m + log s    (3)

Two more savings in the backward: the onehot part of (2) touches one logit per row, so it is added
outside the tiles (a gather of W's target rows and an index_add into dW); and the upstream gradient
g (one number per row) is folded into the rows before the dW matmul and applied to dh once per
chunk, so a tile goes through exactly two elementwise passes (subtract lse, exp).

Time: at V = 151,936 the four matmuls are nearly all of it; the naive path pays three matmuls plus
its N x V passes (fresh 1.2 GB tensors, page faults, log-softmax, the gather's zero gradient, the
softmax backward). Measured: `python bench.py fused`.
"""
import torch

# Rows per chunk: the rows whose log-sum-exp is built up together, and the unit the weight gradient
# is accumulated over (dW of a vocabulary slice gets one update per chunk, so large is better).
CHUNK_SIZE = 2048
# Logits per tile (chunk_size x vocab_tile). CPU: 2^22 fp32 = 16 MB, small enough to stay near the
# cores, large enough that each matmul is still efficient (see the bench). GPU: 2^25 = 128 MB, where
# each extra tile costs kernel launches and the caches matter less.
TILE_ELEMENTS = {"cpu": 2**22, "gpu": 2**25}


def _default_vocab_tile(rows, vocab, device):
    budget = TILE_ELEMENTS["cpu" if device.type == "cpu" else "gpu"]
    return max(1, min(vocab, budget // max(rows, 1)))


def _tile_logits(weight_tile, rows, buffer):
    """Logits of a tile, TRANSPOSED ([vocab slice, rows] fp32), in the reusable flat buffer: W_tile @ rows.T measured
    faster than rows @ W_tile.T on this CPU, and the weight slice is then a contiguous block of rows of W."""
    logits_t = buffer[: weight_tile.shape[0] * rows.shape[0]].view(weight_tile.shape[0], rows.shape[0])
    if rows.dtype == buffer.dtype:
        torch.mm(weight_tile, rows.t(), out=logits_t)
    else:
        # bf16/fp16: the GEMM runs in the input dtype (fp32 accumulation inside it), the softmax
        # arithmetic in fp32 -- exactly what the naive `log_softmax(logits.float())` does.
        logits_t.copy_(weight_tile @ rows.t())
    return logits_t


class FusedLogprobs(torch.autograd.Function):
    """Autograd function for fused_logprobs; saves hidden, weight, targets and one lse per row.

    Inside, a tile's logits are [vocab slice, rows], so every per-row reduction is over dim 0."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, vocab_tile, temperature, return_entropy):
        num_rows, vocab = hidden.shape[0], weight.shape[0]
        # softmax and accumulation dtype: fp32 for fp32/bf16/fp16 inputs (float64 stays float64)
        float_dtype = torch.promote_types(hidden.dtype, torch.float32)
        logprobs = torch.empty(num_rows, dtype=float_dtype, device=hidden.device)
        log_normaliser = torch.empty_like(logprobs)
        entropy = torch.empty_like(logprobs) if return_entropy else None
        buffer = torch.empty(vocab_tile * min(chunk_size, num_rows), dtype=float_dtype, device=hidden.device)
        # the entropy needs the logits and their exponentials at once: a second tile, logging only
        exp_buffer = torch.empty_like(buffer) if return_entropy else None

        for start in range(0, num_rows, chunk_size):
            end = min(start + chunk_size, num_rows)
            # temperature is folded into the chunk's rows: W (h / T)^T = z / T, a C x D op, not V x C
            rows = hidden[start:end] / temperature if temperature != 1.0 else hidden[start:end]
            for first in range(0, vocab, vocab_tile):
                shifted = _tile_logits(weight[first:first + vocab_tile], rows, buffer)
                tile_max = shifted.amax(dim=0)
                if first == 0:
                    row_max, rescale = tile_max, None
                else:
                    new_max = torch.maximum(row_max, tile_max)
                    max_step, row_max = new_max - row_max, new_max
                    rescale = torch.exp(-max_step)
                shifted.sub_(row_max)
                if return_entropy:
                    # H = log s - t / s with t = sum e (z - m), e = exp(z - m), carried along with s: when m
                    # grows by d, each old term e (z - m) becomes exp(-d) e (z - m - d), so t' = exp(-d) (t - d s)
                    exps = torch.exp(shifted, out=exp_buffer[: shifted.numel()].view_as(shifted))
                    tile_sum, tile_weighted = exps.sum(dim=0), exps.mul_(shifted).sum(dim=0)
                    if rescale is None:
                        sum_exp, weighted = tile_sum, tile_weighted
                    else:
                        weighted = rescale * (weighted - max_step * sum_exp) + tile_weighted
                        sum_exp = rescale * sum_exp + tile_sum
                else:
                    tile_sum = shifted.exp_().sum(dim=0)
                    sum_exp = tile_sum if rescale is None else rescale * sum_exp + tile_sum   # eq. (3)
            log_normaliser[start:end] = row_max + sum_exp.log()
            if return_entropy:
                entropy[start:end] = sum_exp.log() - weighted / sum_exp
            # the target logit is one dot product per row, taken outside the tiles; eq. (1)
            target_logit = (rows.to(float_dtype) * weight[targets[start:end]].to(float_dtype)).sum(-1)
            logprobs[start:end] = target_logit - log_normaliser[start:end]

        ctx.save_for_backward(hidden, weight, targets, log_normaliser)
        ctx.chunk_size, ctx.vocab_tile, ctx.temperature = chunk_size, vocab_tile, temperature
        if return_entropy:
            ctx.mark_non_differentiable(entropy)
            return logprobs, entropy
        return logprobs

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy=None):
        hidden, weight, targets, log_normaliser = ctx.saved_tensors
        chunk_size, vocab_tile, temperature = ctx.chunk_size, ctx.vocab_tile, ctx.temperature
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        num_rows, vocab = hidden.shape[0], weight.shape[0]
        float_dtype = log_normaliser.dtype
        same_dtype = hidden.dtype == float_dtype
        grad_logprobs = grad_logprobs.to(float_dtype)

        # both accumulated in fp32 whatever the input dtype, cast once at the end. With z = (h/T) W^T and
        # dL/dz = g (onehot - p) by eq. (2):  dL/dh = g (W_t - p W) / T  and  dL/dW = (onehot - p)^T (g h/T).
        grad_hidden = torch.zeros(hidden.shape, dtype=float_dtype, device=hidden.device) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=float_dtype, device=weight.device) if need_weight else None
        buffer = torch.empty(vocab_tile * min(chunk_size, num_rows), dtype=float_dtype, device=hidden.device)

        for start in range(0, num_rows, chunk_size):
            end = min(start + chunk_size, num_rows)
            rows = hidden[start:end] / temperature if temperature != 1.0 else hidden[start:end]
            grad_rows = grad_logprobs[start:end, None]
            # the -p part of dL/dW needs g h / T, so g goes into the rows once instead of into every tile
            weighted_rows = rows * (-grad_rows).to(rows.dtype)
            # p W summed over the tiles, for dL/dh
            probs_times_weight = grad_hidden[start:end] if need_hidden else None
            for first in range(0, vocab, vocab_tile):
                weight_tile = weight[first:first + vocab_tile]
                logits_t = _tile_logits(weight_tile, rows, buffer)
                # softmax from the saved log-normaliser, in place: p = exp(z - lse)
                probs_t = logits_t.sub_(log_normaliser[start:end]).exp_()
                if not same_dtype:
                    probs_t = probs_t.to(rows.dtype)  # run the two GEMMs in bf16/fp16 too
                if need_hidden:
                    if same_dtype:
                        probs_times_weight.addmm_(probs_t.t(), weight_tile)
                    else:
                        probs_times_weight += probs_t.t() @ weight_tile
                if need_weight:
                    if same_dtype:
                        grad_weight[first:first + vocab_tile].addmm_(probs_t, weighted_rows)
                    else:
                        grad_weight[first:first + vocab_tile] += probs_t @ weighted_rows
            # the onehot part of eq. (2): one logit per row
            target_rows = targets[start:end]
            if need_hidden:
                probs_times_weight.mul_(-grad_rows).addcmul_(grad_rows, weight[target_rows].to(float_dtype))
                if temperature != 1.0:
                    probs_times_weight /= temperature
            if need_weight:
                grad_weight.index_add_(0, target_rows, grad_rows * rows.to(float_dtype))

        if need_hidden:
            grad_hidden = grad_hidden.to(hidden.dtype)
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def fused_logprobs(hidden, weight, targets, chunk_size=CHUNK_SIZE, temperature=1.0, return_entropy=False,
                   vocab_tile=None):
    """log softmax(hidden @ weight.T / temperature)[i, targets[i]] for each row i, as fp32 [N].

    hidden [N, D] and weight [V, D] (fp32, or bf16/fp16 with fp32 softmax and accumulation),
    targets [N] int64. Differentiable in hidden and weight; never holds more than
    chunk_size x vocab_tile logits (vocab_tile=None: TILE_ELEMENTS worth).
    Select the trainable rows (e.g. hidden[mask]) BEFORE calling: masked positions then cost nothing.
    With return_entropy=True also returns each row's entropy of softmax(logits / temperature),
    detached (for logging).
    """
    if chunk_size < 1 or (vocab_tile is not None and vocab_tile < 1):
        raise ValueError(f"fused_logprobs: chunk_size and vocab_tile must be >= 1, got {chunk_size}, {vocab_tile}")
    if vocab_tile is None:
        vocab_tile = _default_vocab_tile(min(chunk_size, hidden.shape[0]), weight.shape[0], weight.device)
    # the kernel picks its own precisions (GEMMs in weight's dtype, softmax and sums in fp32), so
    # autocast is switched off inside it; hidden is cast to weight's dtype (its gradient casts back)
    with torch.autocast(hidden.device.type, enabled=False):
        hidden = hidden.to(weight.dtype)
        return FusedLogprobs.apply(hidden, weight, targets.long(), chunk_size, vocab_tile, float(temperature),
                                   return_entropy)

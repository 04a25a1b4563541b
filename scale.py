"""
scale.py: the M-step of a model larger than one GPU holds under DDP (README: On N GPUs).

DDP keeps the whole model on every GPU: fp32 weights (4 bytes a parameter), fp32 gradients (4) and AdamW's two
fp32 moments (8), 16 bytes a parameter before any activation: 122 GB for Qwen2.5-Math-7B. FSDP2
(torch.distributed.fsdp.fully_shard) keeps 1/N of each of them on each of N GPUs. Each transformer block is one
unit: its weights are all-gathered just before it runs and freed after it, in the forward and again in the
backward, and its gradient is reduce-scattered, each rank keeping the sum of its own 1/N. The objective does not
change: the loss is the same mean over every trainable token of the step, and the gradient the same as DDP's.

    torchrun --nproc_per_node=N train.py ... --fsdp=true              shards over N GPUs
    train.py ... --activation_checkpointing=true                      each block recomputed in the backward
    train.py ... --fsdp=true --cpu_offload=true                       the shards in host memory: one GPU, slow
    train.py --plan=true --init=DIR --world_size=N [--fsdp ...]       the bytes per GPU, from config.json alone

memory_plan() is what a run needs per GPU, term by term, and train.py sets allocated_bytes() beside it after the
first step (tests/test_fsdp.py checks that the two agree on the CPU).
"""
import functools
import json
import math
import os

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from logprobs import TILE_ELEMENTS
from model import TINY_CONFIG, Config, Transformer, config_from_hf, no_init, rope_inverse_frequencies

GiB, MiB = 2**30, 2**20


# -----------------------------------------------------------------------------
# Sharding, recomputation, and the whole model back for saving.

def checkpoint_blocks(model):
    """Each block keeps only its input for the backward and runs its forward again there (torch.utils.checkpoint,
    non-reentrant): the activations of L blocks become their L inputs plus one block's, for one more forward of each
    block (~1/3 more compute). The recomputation repeats the same ops on the same input, so the gradient is the same.
    The forward is replaced on the instance, so parameter names (and checkpoints) do not change."""
    for block in model.layers:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def shard(module, blocks, device, cpu_offload):
    """FSDP2 over all ranks: each block its own unit, then `module` the unit of everything else (embedding, final
    norm, output head). Those stay in one unit because a tied head IS the embedding, and FSDP needs one owner per
    parameter; the root unit is gathered once and kept for the whole step. Parameters may start on the CPU:
    fully_shard moves each rank's shards to `device` (or, offloaded, leaves them in host memory)."""
    # imported here, as below: DTensor and FSDP take ~1 s to import, which a run without FSDP need not pay
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
    mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
    if device.startswith("cuda"):
        # bf16 compute: the gathered copy of each unit is bf16. fp32 master weights: AdamW updates the fp32 shards.
        # fp32 reduce-scatter: summed in bf16, each rank's share of a gradient would be rounded to 8 bits of mantissa.
        precision = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        precision = MixedPrecisionPolicy()  # fp32 throughout on the CPU
    # pinned host memory makes the copies to and from the GPU asynchronous; there is nothing to pin without one
    offload = CPUOffloadPolicy(pin_memory=device.startswith("cuda")) if cpu_offload else OffloadPolicy()
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=precision, offload_policy=offload)
    fully_shard(module, mesh=mesh, mp_policy=precision, offload_policy=offload)
    return module


def gather_full_model(model):
    """The sharded model whole again, as a plain fp32 Transformer in rank 0's host memory (None on the other ranks),
    for model.save: the same HF dir as an unsharded run writes. Every rank must call it (the gather is collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    with torch.device("meta"), no_init():
        full = Transformer(model.config)
    full.load_state_dict(state, assign=True)
    if model.config.tie_word_embeddings:
        full.lm_head.weight = full.embed_tokens.weight
    full.inv_freq, full.attention_scale = rope_inverse_frequencies(model.config)  # a buffer outside the state dict
    return full.eval()


def allocated_bytes(model, optimizer, device="cpu"):
    """This rank's bytes of parameters, gradients and optimizer state as allocated (a shard's local part under FSDP),
    to set beside the plan's, and on a GPU the peak of the first step (every term of the plan at once). Called after
    optimizer.step(), before the gradients are cleared."""
    def nbytes(t):
        t = t.to_local() if hasattr(t, "to_local") else t   # a DTensor: this rank's shard
        return t.numel() * t.element_size()
    params = list(model.parameters())
    allocated = {"parameters": sum(nbytes(p) for p in params),
                 "gradients": sum(nbytes(p.grad) for p in params if p.grad is not None),
                 "optimizer": sum(nbytes(v) for state in optimizer.state.values() for v in state.values()
                                  if torch.is_tensor(v))}
    if device.startswith("cuda"):
        allocated["peak_first_step"] = torch.cuda.max_memory_allocated(device)
    return allocated


# -----------------------------------------------------------------------------
# The memory plan: bytes per GPU for a model, a world size and the flags, from the config alone.

def read_config(init):
    """model.Config of a checkpoint dir from its config.json alone (no weights are read), or of the tiny preset."""
    if init == "tiny":
        return Config(**TINY_CONFIG)
    path = os.path.join(init, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{init!r} is neither a checkpoint dir with a config.json nor a preset name (tiny)")
    with open(path) as f:
        return config_from_hf(json.load(f), path)


def parameter_shapes(config):
    """([shapes outside the blocks], [[shapes of block i]]): the model built on the meta device, which allocates
    nothing, so the count is exact (biases, GQA, a tied head counted once) for any size."""
    with torch.device("meta"), no_init():
        model = Transformer(config)
    in_blocks = {id(p) for p in model.layers.parameters()}
    root = [p.shape for p in model.parameters() if id(p) not in in_blocks]
    return root, [[p.shape for p in block.parameters()] for block in model.layers]


def shard_numel(shape, world_size):
    """Elements of one rank's shard. FSDP2 cuts dim 0 into world_size equal pieces, padded: ceil(rows / N) rows."""
    return math.ceil(shape[0] / world_size) * math.prod(shape[1:])


def activation_bytes_per_token(config, residual, matmul):
    """Bytes one block keeps for its backward, per token, r = `residual` bytes (the residual stream and the norms'
    outputs), a = `matmul` bytes (the projections' inputs and outputs); D = hidden, q = heads x head_dim,
    kv = kv heads x head_dim, H = heads, I = intermediate:
        two RMSNorms   2·((4 + r + a)·D + 4)   x in fp32, x normalised, the output; 1/rms in fp32
        attention      3·a·(q + kv) + 4·H      q, k after RoPE; the q|k|v output (for v); SDPA's output; an fp32
                                                log-sum-exp per head. No T x T matrix: flash-style SDPA kernels
        SwiGLU MLP     4·a·I                   the gate|up output, silu(gate), their product
    These are the tensors autograd saves, counted with saved_tensors_hooks (tests/test_fsdp.py)."""
    D, H = config.hidden_size, config.num_attention_heads
    q, kv = H * config.head_dim, config.num_key_value_heads * config.head_dim
    return 2 * ((4 + residual + matmul) * D + 4) + 3 * matmul * (q + kv) + 4 * H + 4 * matmul * config.intermediate_size


def memory_plan(config, world_size, fsdp, activation_checkpointing, cpu_offload, micro_batch, max_len, cuda,
                chunk_size=256):
    """Bytes per GPU of a run, term by term (a dict, json-ready). micro_batch: sequences in the largest forward
    (train.py: ceil(batch_size / pad_split)), each assumed max_len tokens long and every token trainable: an
    upper bound. cuda: bf16 compute as train.py does it there (FSDP: bf16 weights; else autocast), fp32 otherwise."""
    root, blocks = parameter_shapes(config)
    shapes = root + [s for block in blocks for s in block]
    count = sum(math.prod(s) for s in shapes)
    shards = world_size if fsdp else 1
    local = sum(shard_numel(s, shards) for s in shapes)
    root_count, block_count = sum(math.prod(s) for s in root), max(sum(math.prod(s) for s in b) for b in blocks)
    # the dtypes of the step: residual stream r, matmul activations a, the fused kernel's operands k, gathered weights g
    r, a = (2 if fsdp else 4, 2) if cuda else (4, 4)
    # without FSDP, autocast leaves the final norm's output (the kernel's input) in fp32: the kernel runs in fp32
    k = g = 2 if cuda and fsdp else 4
    persistent = {"parameters": 4 * local,            # fp32 master weights, AdamW updates these
                  "gradients": 4 * local,             # fp32, reduced over ranks
                  "optimizer": 8 * local + 4 * len(shapes)}   # AdamW's m and v in fp32, and a step count per tensor
    if fsdp:
        # At the peak (the start of the backward: every activation still kept) the root unit is gathered (it stays
        # for the whole step) and two blocks (one computing, the next prefetched), in the compute dtype, plus one
        # block's unsharded gradient and its fp32 reduce-scatter input. The head's unsharded gradient is the fused
        # kernel's dW (counted there); the embedding's comes at the end of the backward, after the activations.
        gathered = g * (root_count + 2 * block_count) + (g + 4) * block_count
        if cpu_offload:
            gathered += 4 * block_count   # a block's fp32 shards, copied to the GPU before the cast
    else:
        gathered = 2 * len(blocks) * block_count if cuda else 0   # autocast's bf16 copies, kept for the backward
    tokens = micro_batch * max_len
    per_layer = activation_bytes_per_token(config, r, a)
    final_norm = (4 + r + a) * config.hidden_size + 4
    if activation_checkpointing:
        per_token = len(blocks) * r * config.hidden_size + per_layer + final_norm   # L block inputs + one recomputed
    else:
        per_token = len(blocks) * per_layer + final_norm
    V, D = config.vocab_size, config.hidden_size
    tile = min(TILE_ELEMENTS["gpu" if cuda else "cpu"], chunk_size * V)
    # the kernel's backward: dW of the whole head in fp32, dH in fp32, the saved rows, a logit tile, 3 fp32 per row;
    # with bf16 operands also dW, dH and the tile cast to bf16
    kernel = 4 * V * D + (4 + k) * tokens * D + 4 * tile + 12 * tokens
    if k != 4:
        kernel += k * (V * D + tokens * D + tile)
    per_gpu = {**({key: 0 for key in persistent} if cpu_offload else persistent),
               "gathered": gathered, "activations": tokens * per_token, "fused_kernel": kernel}
    return {"architecture": config.architecture, "parameter_count": count, "blocks": len(blocks), "hidden_size": D,
            "block_parameters": block_count, "other_parameters": root_count, "world_size": world_size,
            "fsdp": fsdp, "activation_checkpointing": activation_checkpointing, "cpu_offload": cpu_offload,
            "device": "cuda" if cuda else "cpu", "micro_batch": micro_batch, "max_len": max_len,
            "activation_bytes_per_token_per_block": per_layer, "residual_bytes": r, "bytes_per_gpu": per_gpu,
            "total_per_gpu": sum(per_gpu.values()), "host_bytes": sum(persistent.values()) if cpu_offload else 0,
            "persistent_per_rank": persistent}


def describe(plan):
    """{term: what it holds}, for the printed plan."""
    compute = "bf16" if plan["device"] == "cuda" else "fp32"
    shard = f", 1/{plan['world_size']} of each" if plan["fsdp"] and plan["world_size"] > 1 else ""
    if plan["fsdp"]:
        gathered = f"{compute} copies of embedding and head (whole step) and 2 blocks; a block's gradient"
    else:
        gathered = "autocast's bf16 copies of the blocks' weights" if plan["device"] == "cuda" else "none on the CPU"
    tokens, blocks = plan["micro_batch"] * plan["max_len"], plan["blocks"]
    block = f"{plan['activation_bytes_per_token_per_block'] / 1024:.0f} KiB"
    if plan["activation_checkpointing"]:
        block_input = plan["residual_bytes"] * plan["hidden_size"] / 1024
        activations = f"{tokens} tokens x ({blocks} block inputs of {block_input:.0f} KiB + one block's {block})"
    else:
        activations = f"{tokens} tokens x {blocks} blocks x {block}"
    return {"parameters": "fp32 master weights" + shard, "gradients": "fp32" + shard,
            "optimizer": "AdamW's two fp32 moments" + shard, "gathered": gathered, "activations": activations,
            "fused_kernel": "the head's dW in fp32 (vocab x hidden), dH, logit tiles"}


def format_plan(plan):
    """The plan as lines of text: each term in GiB (MiB for a small model) with what it holds, the total, and what
    dominates."""
    per_gpu, total, persistent = plan["bytes_per_gpu"], plan["total_per_gpu"], plan["persistent_per_rank"]
    unit, unit_name = (GiB, "GiB") if total >= GiB else (MiB, "MiB")
    count = plan["parameter_count"]
    count = f"{count / 1e9:.2f}B" if count >= 1e8 else f"{count / 1e6:.2f}M"
    gpus = f"{plan['world_size']} {'GPU' if plan['device'] == 'cuda' else 'CPU rank'}" + \
        ("s" if plan["world_size"] > 1 else "")
    mode = "FSDP" if plan["fsdp"] else "DDP" if plan["world_size"] > 1 else "one process"
    mode += ", CPU offload" if plan["cpu_offload"] else ""
    mode += ", activation checkpointing" if plan["activation_checkpointing"] else ""
    per = "GPU" if plan["device"] == "cuda" else "rank"
    lines = [f"memory plan per {per}, {unit_name}: {plan['architecture']} of {count} parameters on {gpus}, {mode}, "
             f"{'bf16 compute' if plan['device'] == 'cuda' else 'fp32 (CPU)'}, largest micro-batch "
             f"{plan['micro_batch']} x {plan['max_len']} tokens"]
    for term, text in describe(plan).items():
        in_host = plan["cpu_offload"] and term in persistent   # shown, but not part of the GPU's total
        value = persistent[term] if in_host else per_gpu[term]
        lines.append(f"  {term:<13}{value / unit:8.2f}  {text}{' (in host memory)' if in_host else ''}")
    ranked = sorted(per_gpu, key=per_gpu.get, reverse=True)
    top = [term for term in ranked if per_gpu[term] >= 0.25 * total] or ranked[:1]
    lines.append(f"  {'total':<13}{total / unit:8.2f}  dominated by "
                 + " and ".join(f"{term} ({per_gpu[term] / total:.0%})" for term in top))
    if plan["cpu_offload"]:
        lines.append(f"  {'host memory':<13}{plan['host_bytes'] / unit:8.2f}  the fp32 weights, gradients and AdamW "
                     f"state")
    return "\n".join(lines)

"""train.py with FSDP2 on the CPU (gloo), activation checkpointing and the memory plan (scale.py): two sharded ranks
train what one process trains on the union of their batches, untied (a Qwen2 checkpoint) and tied (the tiny preset,
with checkpointing and CPU offload); the checkpoint they save loads in transformers with identical logits;
checkpointing gives the same gradients; the plan's bytes are the bytes allocated, and the activation formula counts
what autograd saves."""
import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch
import transformers

import scale
import train
from model import MLP, TINY_CONFIG, Config, Transformer, load
from task import tiny_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ["--device=cpu", "--steps=3", "--warmup_steps=1", "--check_n=0", "--n_train=32", "--seed=0", "--log_every=100",
         "--finetune_lr=4e-3"]
RUNS = {"qwen2": ["--fsdp=true"],   # untied head, qkv bias, GQA, from an HF checkpoint dir
        "tiny": ["--fsdp=true", "--activation_checkpointing=true", "--cpu_offload=true"]}   # tied head


def qwen2_checkpoint(path):
    """A random Qwen2 with an untied head, built from config like tests/test_model.py's, and the tiny tokenizer."""
    config = transformers.Qwen2Config(vocab_size=TINY_CONFIG["vocab_size"], hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, tie_word_embeddings=False, eos_token_id=0,
                                      pad_token_id=1, bos_token_id=None)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def one_process_on_the_union(init, out):
    """train.main in this process, each step the union of the two ranks' batches of 2 (rank 0's, then rank 1's:
    each rank shuffles its own shard examples[rank::2] with seed + rank)."""
    real_batches = train.batches

    def union_of_the_ranks(examples, batch_size, rng, window=0):
        ranks = [real_batches(examples[r::2], batch_size // 2, random.Random(0 + r), window) for r in range(2)]
        for parts in zip(*ranks):
            yield [e for part in parts for e in part]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "batches", union_of_the_ranks)
        model, _ = train.main([*STEPS, f"--init={init}", "--batch_size=4", f"--out={out}"])
    return model


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The two torchrun runs side by side (each of 2 ranks), and meanwhile their one-process references here."""
    root = tmp_path_factory.mktemp("fsdp")
    inits = {"qwen2": qwen2_checkpoint(str(root / "qwen2-init")), "tiny": "tiny"}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    launched = {name: subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *STEPS,
         f"--init={inits[name]}", "--batch_size=2", f"--out={root / name}", *flags],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for name, flags in RUNS.items()}
    references = {name: one_process_on_the_union(inits[name], root / f"{name}-reference") for name in RUNS}
    outputs = {name: process.communicate(timeout=120)[0] for name, process in launched.items()}
    for name, process in launched.items():
        assert process.returncode == 0, outputs[name][-3000:]
    return root, inits, references, outputs


@pytest.mark.parametrize("name", list(RUNS))
def test_two_sharded_ranks_train_what_one_process_trains_on_their_union(runs, name):
    root, inits, references, outputs = runs
    assert "3 steps on 2 x cpu" in outputs[name] and "memory plan per rank" in outputs[name]
    sharded, _ = load(str(root / name))
    start, _ = load(inits[name], seed=0)
    reference, sharded, start = (dict(m.named_parameters()) for m in (references[name], sharded, start))
    assert reference.keys() == sharded.keys()
    moved = max((reference[k] - start[k]).abs().max().item() for k in reference)
    gap = max((reference[k] - sharded[k]).abs().max().item() for k in reference)
    # As in tests/test_ddp.py: the reduce-scattered gradient differs from the one-process gradient by summation
    # order only, which Adam's normalised step amplifies on near-zero gradients; a rank training on its own half-batch
    # lands ~2x moved away.
    assert moved > 3e-3
    assert gap < 0.05 * moved, (gap, moved)


@pytest.mark.parametrize("name", list(RUNS))
def test_the_sharded_runs_checkpoint_loads_in_transformers_with_identical_logits(runs, name):
    root = runs[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(root / name)).eval()
    ours, _ = load(str(root / name))
    assert (ours.lm_head.weight is ours.embed_tokens.weight) == (name == "tiny")
    ids = torch.randint(0, TINY_CONFIG["vocab_size"], (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["qwen2", "tiny", "qwen2-reference"])
def test_the_plans_parameter_gradient_and_optimizer_bytes_are_the_bytes_allocated(runs, name):
    # Rank 0's bytes after the first AdamW step (train.py, scale.allocated_bytes): its shards hold ceil(rows / 2)
    # rows, the most of any rank. The reference is one process, unsharded.
    with open(runs[0] / name / "train_config.json") as f:
        config = json.load(f)
    plan, allocated = config["memory_plan"], config["memory_allocated"]
    assert plan["persistent_per_rank"] == allocated
    assert plan["world_size"] == (1 if name.endswith("reference") else 2)
    assert plan["bytes_per_gpu"]["parameters"] == (0 if name == "tiny" else allocated["parameters"])  # offloaded


def saved_bytes_per_token(model, ids, dtype=torch.float32):
    """Bytes of the tensors autograd keeps for the backward of the blocks of model(ids), each storage once, the
    parameters and the RoPE tables (shared by all blocks) left out."""
    model = model.to(dtype)
    x = model.embed_tokens(ids).detach().requires_grad_()
    cos, sin = (t[:ids.shape[1]] for t in model.rope_tables(ids.shape[1], x.dtype))
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), cos, sin]}
    kept = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for block in model.layers:
            x = block(x, cos, sin)
    return sum(kept.values()) / ids.numel()


def test_the_activation_formula_counts_what_autograd_saves():
    config = Config(vocab_size=50, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=96, qkv_bias=True, tie_word_embeddings=False)
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 24))
    for dtype, size in ((torch.float32, 4), (torch.bfloat16, 2)):
        formula = scale.activation_bytes_per_token(config, residual=size, matmul=size)
        assert saved_bytes_per_token(Transformer(config), ids, dtype) == 2 * formula   # two blocks


def test_activation_checkpointing_gives_the_same_gradients(monkeypatch):
    batch = [train.example([5, 6, 7], list(range(10, 40)), [1] * 30, [-1.0] * 30, 0.5, True),
             train.example([5, 6], list(range(40, 60)), [1] * 20, [-2.0] * 20, -0.5, False)]
    tensors = [train.collate(batch, pad_id=1, device="cpu")]
    n_tokens = tensors[0]["trainable"][:, 1:].sum().float()
    args = train.parse_args(["--mode=rl", "--data=unused.jsonl"])
    args.temperature = 1.0
    # each MLP runs once in the forward and, checkpointed, once more in the backward (counted in the class: module
    # hooks do not fire in the recomputation)
    calls, mlp_forward = [], MLP.forward
    monkeypatch.setattr(MLP, "forward", lambda self, x: calls.__setitem__(-1, calls[-1] + 1) or mlp_forward(self, x))
    grads = []
    for checkpointed in (False, True):
        model, _ = load("tiny", seed=0)
        if checkpointed:
            scale.checkpoint_blocks(model)
        calls.append(0)
        train.accumulate_gradients(model, model.lm_head.weight, tensors, n_tokens, args, 0.2, 1.0, 3.0, False, 1,
                                   torch.autocast("cpu", enabled=False))
        grads.append({name: p.grad for name, p in model.named_parameters()})
    assert calls == [4, 8]   # 4 blocks
    assert grads[0].keys() == grads[1].keys() and grads[0]["layers.0.mlp.down_proj.weight"].abs().max() > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)


def test_the_plan_of_qwen2_5_math_7b_from_config_json_alone(tmp_path, capsys):
    # the published shape of Qwen2.5-Math-7B; the dir holds config.json and nothing else
    config = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 3584, "intermediate_size": 18944,
              "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
              "max_position_embeddings": 4096, "tie_word_embeddings": False, "hidden_act": "silu"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    plan, log = train.main(["--plan=true", f"--init={tmp_path}", "--world_size=8", "--fsdp=true", "--max_len=1536",
                            "--batch_size=8"])
    assert log == [] and "7.62B parameters on 8 GPUs, FSDP, bf16 compute" in capsys.readouterr().out
    D, V, I, kv = 3584, 152064, 18944, 4 * 128
    # qkv and its bias, o, gate|up, down, two norms
    block = (D + 2 * kv) * D + (D + 2 * kv) + D * D + 2 * I * D + I * D + 2 * D
    assert plan["parameter_count"] == 2 * V * D + D + 28 * block == 7_615_616_512
    # V = 152064 rows split 8 ways evenly; the 3584-row matrices and the norms too
    assert plan["bytes_per_gpu"]["parameters"] == 4 * plan["parameter_count"] // 8
    assert plan["bytes_per_gpu"]["activations"] == 4 * 1536 * (28 * scale.activation_bytes_per_token(
        scale.read_config(str(tmp_path)), 2, 2) + (4 + 2 + 2) * D + 4)
    with pytest.raises(SystemExit, match="--cpu_offload=true needs --fsdp=true"):
        train.parse_args(["--cpu_offload=true"])
    assert math.ceil(197 / 2) * 96 == scale.shard_numel((197, 96), 2)   # the tiny head: padded to 99 rows a rank

"""
bench.py: the speed and memory claims of sampler.py and logprobs.py, each measured against its baseline in the same process.

  OMP_WAIT_POLICY=PASSIVE python bench.py sampler      # sampler.generate vs transformers' generate, same weights, greedy:
                                                       # tiny preset @ batch 64, a ~25M Llama @ batch 16 (CPU)
  python bench.py sampler --device=cuda --sizes=qwen0.5b   # a 0.5B Qwen2 config in bf16, plus the memory-bandwidth
                                                       # bound of a decode step
  python bench.py sampler --device=cuda --sizes=qwen0.5b-b64,qwen0.5b-b128,qwen0.5b-b256 --repeats=2
                                                       # the CUDA-graph rows: 256-token prompts + 512 new tokens
  OMP_WAIT_POLICY=PASSIVE python bench.py fused        # fused_logprobs vs naive log_softmax+gather, forward+backward,
                                                       # V=151,936, D=896, N=2048 and 8192: time and extra peak memory
  python bench.py fused --device=cuda --dtype=bfloat16

Sampler: greedy, fixed length (EOS ignored), the same batch of prompts of different lengths (left-padded for HF, as it
needs), the greedy tokens of both checked identical. Both run alternately in one process, `repeats` times each, and the
ratio of medians is what to quote: on a shared machine absolute numbers swing, ratios much less. On CPU, "kernel
ceiling" is HF's time over the time our run spends in matrix products and the attention kernel, which both samplers
must run; no sampler made of these kernels could beat HF by more on this machine. `--threads` matters (torch's
default is one per core): a second thread speeds up the kernels but not the per-op overhead, so the ratio rises.

Fused: extra peak memory = peak during forward+backward above what was held before, minus the weight's own gradient
(V x D, both need it). On CPU peak RSS is reset through /proc/self/clear_refs and read back as VmHWM.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep: steadier timings on a shared CPU
import gc
import json
import re
import statistics
import sys
import tempfile
import time

import torch
import transformers

import flags
from logprobs import CHUNK_SIZE, fused_logprobs
from model import TINY_CONFIG, Config, Transformer, init_weights, save
from sampler import generate

# ----------------------------------------------------------------------------- sampler hyperparameters
sampler_sizes = "tiny,25m,25m-k4,tiny-b4"  # which rows of the table to run (tiny, 25m, 25m-k4, tiny-b4, qwen0.5b)
sampler_device = "cpu"    # cpu | cuda (bf16 there)
sampler_threads = 1       # torch CPU threads (1: the steadiest timings on a shared 2-core machine)
sampler_repeats = 3       # alternating runs of each implementation
sampler_hbm_gbps = 0.0    # GPU memory bandwidth for the bound; 0 = guess from the device name
sampler_compare_eager = False  # cuda: also time our static path with its steps run eagerly (cuda_graphs=False)
# ----------------------------------------------------------------------------- end of sampler hyperparameters
SEED = 0                  # the random weights and prompts of every preset

LLAMA_25M = dict(vocab_size=8192, hidden_size=512, num_hidden_layers=7, num_attention_heads=8, num_key_value_heads=4,
                 intermediate_size=1536, max_position_embeddings=1024, tie_word_embeddings=True, eos_token_id=0)
QWEN2_05B = dict(vocab_size=151936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, intermediate_size=4864, max_position_embeddings=32768, rope_theta=1e6,
                 tie_word_embeddings=True, qkv_bias=True, architecture="Qwen2ForCausalLM", eos_token_id=0)
# name: (config fields for a random Llama/Qwen2, batch, prompt length range, new tokens[, copies of each prompt])
PRESETS = {
    "tiny": (dict(TINY_CONFIG), 64, (40, 80), 128),
    # small batch, short prompts: the step is bound by per-op overhead, not by memory traffic
    "tiny-b4": (dict(TINY_CONFIG), 4, (8, 16), 64),
    "25m": (LLAMA_25M, 16, (32, 64), 64),
    # the same, shaped like explore.py's calls: 4 prompts x K=4 rollouts of each (HF prefills every copy)
    "25m-k4": (LLAMA_25M, 16, (32, 64), 64, 4),
    "qwen0.5b": (QWEN2_05B, 64, (64, 128), 256),
    # GPU rows for the CUDA-graph decode step: at batch 256 the keys and values read per step outweigh the weights
    "qwen0.5b-b64": (QWEN2_05B, 64, (256, 256), 512),
    "qwen0.5b-b128": (QWEN2_05B, 128, (256, 256), 512),
    "qwen0.5b-b256": (QWEN2_05B, 256, (256, 256), 512),
}
KNOWN_BANDWIDTH_GBPS = {"H100": 3350, "H200": 4800, "A100": 2039, "L4": 300, "A10": 600, "4090": 1008}


def build(name, device, dtype):
    """Our model with random weights, and transformers' model loaded from what save() wrote (the same weights)."""
    fields, batch, (shortest, longest), new_tokens, *copies = PRESETS[name]
    copies = copies[0] if copies else 1
    torch.manual_seed(SEED)
    model = Transformer(Config(**fields))
    init_weights(model)
    model = model.to(device=device, dtype=dtype).eval()
    with tempfile.TemporaryDirectory() as tmp:
        save(model, None, tmp + "/ck")
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp + "/ck", dtype=dtype).to(device).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    g = torch.Generator().manual_seed(SEED)
    lengths = torch.randint(shortest, longest + 1, (batch // copies,), generator=g).tolist()
    distinct = [torch.randint(2, fields["vocab_size"], (n,), generator=g).tolist() for n in lengths]
    prompts = [prompt for prompt in distinct for _ in range(copies)]
    return model, hf, prompts, new_tokens


def run_ours(model, prompts, new_tokens, **kwargs):
    samples = generate(model, prompts, new_tokens, temperature=0, eos_token_id=[], **kwargs)
    return [s.tokens for s in samples]


def run_hf(hf, prompts, new_tokens, device):
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    with torch.inference_mode():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False)
    return out[:, width:].tolist()


def timed(fn, device):
    """(result, wall seconds, CPU seconds of this process): on a shared CPU the second is the steadier of the two."""
    if device != "cpu":
        torch.cuda.synchronize()
    start, cpu_start = time.perf_counter(), time.process_time()
    result = fn()
    if device != "cpu":
        torch.cuda.synchronize()
    return result, time.perf_counter() - start, time.process_time() - cpu_start


KERNELS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu")


def kernel_time(fn):
    """Seconds that one run of fn spends inside matrix products and the attention kernel, as torch.profiler counts
    them. Both samplers run these same kernels on the same numbers (ours over a few more cache positions), so on a CPU
    this is the floor under our time, and HF's time over it is the highest ratio that any sampler built from these
    kernels could reach here: the rest (norms, RoPE, sampling, Python) is all a faster sampler can cut."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        fn()
    return sum(event.self_cpu_time_total for event in profiler.key_averages() if event.key in KERNELS) / 1e6


def bandwidth_bound(model, prompts, new_tokens, dtype, gbps, attended=None):
    """Upper bound on decode tokens/s: a step must read every weight once (the embedding table only through the
    LM head) plus the keys and values of every row so far, and those grow by one position a step: the step that
    draws new token t reads len(prompt) + t positions of each row. At HBM bandwidth the run takes the sum over its
    steps of bytes / bandwidth. attended: read that many positions of every row at every step instead (a cache
    attended over its whole allocated length, as the static path's step does: the mask hides the rest, but the
    attention kernel still reads it)."""
    c = model.config
    size = torch.finfo(dtype).bits // 8
    weights = sum(p.numel() for p in model.parameters()) * size
    if not c.tie_word_embeddings:
        weights -= model.embed_tokens.weight.numel() * size
    position_bytes = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * size  # a key and a value a layer
    if attended is None:  # sum over t < new_tokens of sum over rows of len(prompt) + t
        positions = new_tokens * sum(len(p) for p in prompts) + len(prompts) * new_tokens * (new_tokens - 1) // 2
    else:
        positions = new_tokens * len(prompts) * attended
    seconds = (new_tokens * weights + positions * position_bytes) / (gbps * 1e9)
    return len(prompts) * new_tokens / seconds


def sampler_main(argv):
    args = flags.parse(__file__, globals(), argv, block="sampler hyperparameters", prefix="sampler_",
                       prog="bench.py sampler")
    print(json.dumps(vars(args)))
    torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    rows = []
    for name in args.sizes.split(","):
        model, hf, prompts, new_tokens = build(name, args.device, dtype)
        params = sum(p.numel() for p in model.parameters())
        run_ours(model, prompts, 4), run_hf(hf, prompts, 4, args.device)  # warm-up
        ours_times, hf_times, ours_cpu, hf_cpu = [], [], [], []
        for _ in range(args.repeats):
            ours, t, c = timed(lambda: run_ours(model, prompts, new_tokens), args.device)
            ours_times.append(t), ours_cpu.append(c)
            theirs, t, c = timed(lambda: run_hf(hf, prompts, new_tokens, args.device), args.device)
            hf_times.append(t), hf_cpu.append(c)
            if ours != theirs:
                same = sum(a == b for x, y in zip(ours, theirs) for a, b in zip(x, y)) / (len(prompts) * new_tokens)
                print(f"  WARNING {name}: greedy tokens differ ({same:.1%} identical)")
        tokens = len(prompts) * new_tokens
        ours_tps, hf_tps = tokens / statistics.median(ours_times), tokens / statistics.median(hf_times)
        kernel_seconds = kernel_time(lambda: run_ours(model, prompts, new_tokens)) if args.device == "cpu" else 0.0
        row = dict(size=name, params_m=round(params / 1e6, 2), batch=len(prompts), new_tokens=new_tokens,
                   device=args.device, ours_tok_s=round(ours_tps), hf_tok_s=round(hf_tps),
                   ratio=round(ours_tps / hf_tps, 2),
                   cpu_time_ratio=round(statistics.median(hf_cpu) / statistics.median(ours_cpu), 2),
                   identical=ours == theirs)
        if kernel_seconds:
            row.update(kernel_s=round(kernel_seconds, 3), ceiling=round(statistics.median(hf_times) / kernel_seconds, 2))
        if args.device != "cpu":
            row.update(gpu_columns(model, prompts, new_tokens, dtype, args, ours_tps))
        print(json.dumps(row), flush=True)
        rows.append(row)
    print("\n| size | params | batch | new tokens | device | threads | ours tok/s | HF tok/s | ratio (wall) "
          "| ratio (CPU time) | kernel ceiling | of HBM bound | identical |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ceiling = f"{r['ceiling']}x" if "ceiling" in r else "-"
        of_bound = f"{r['of_bound']:.1%}" if "of_bound" in r else "-"
        print(f"| {r['size']} | {r['params_m']}M | {r['batch']} | {r['new_tokens']} | {r['device']} | {args.threads} "
              f"| {r['ours_tok_s']} | {r['hf_tok_s']} | {r['ratio']}x | {r['cpu_time_ratio']}x | {ceiling} "
              f"| {of_bound} | {r['identical']} |")


def gpu_columns(model, prompts, new_tokens, dtype, args, ours_tps):
    """Our share of the HBM-bandwidth bound, with the keys and values read as they grow (of_bound) and as the static
    path's step reads them, its whole allocated cache every step (of_full_cache_bound); with compare_eager, also our
    static path with its steps run eagerly instead of replayed as CUDA graphs."""
    device_name = torch.cuda.get_device_name()
    columns = dict(gpu=device_name)
    if args.compare_eager:
        times = [timed(lambda: run_ours(model, prompts, new_tokens, cuda_graphs=False), args.device)[1]
                 for _ in range(args.repeats)]
        eager_tps = len(prompts) * new_tokens / statistics.median(times)
        columns.update(eager_tok_s=round(eager_tps), graphs_speedup=round(ours_tps / eager_tps, 2))
    gbps = args.hbm_gbps or next((v for k, v in KNOWN_BANDWIDTH_GBPS.items() if k in device_name), 0)
    if gbps:
        allocated = min(model.config.max_position_embeddings, max(map(len, prompts)) + new_tokens)
        bound = bandwidth_bound(model, prompts, new_tokens, dtype, gbps)
        full = bandwidth_bound(model, prompts, new_tokens, dtype, gbps, attended=allocated)
        columns.update(hbm_gbps=gbps, bound_tok_s=round(bound), of_bound=round(ours_tps / bound, 3),
                       full_cache_bound_tok_s=round(full), of_full_cache_bound=round(ours_tps / full, 3))
    return columns


# ----------------------------------------------------------------------------------------------------------------------
# The fused log-prob kernel vs the naive computation.

# ----------------------------------------------------------------------------- fused hyperparameters
fused_vocab = 151_936           # V (Qwen2.5-0.5B's vocabulary)
fused_width = 896               # D (Qwen2.5-0.5B's hidden size)
fused_rows = "2048,8192"        # comma-separated row counts N
fused_chunk_size = CHUNK_SIZE  # rows per chunk of the kernel
fused_vocab_tile = 0            # vocabulary rows per tile; 0 = the kernel's own choice
fused_repeats = 3               # naive and fused alternate this many times per row count (times are medians)
fused_threads = 2               # torch CPU threads
fused_device = "cpu"            # "cuda" runs the same comparison with torch.cuda.max_memory_allocated
fused_dtype = "float32"         # float32 | bfloat16 (on cuda, the interesting case)
# ----------------------------------------------------------------------------- end of fused hyperparameters


def naive_logprobs(hidden, weight, targets, temperature=1.0):
    """The reference: full logits, log-softmax in fp32, gather (what a trainer usually writes)."""
    logits = torch.nn.functional.linear(hidden, weight).float()
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)


def _rss_bytes(field):
    kib = re.search(field + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)
    return int(kib) * 1024


class PeakMemory:
    """Extra peak memory of a block: exact on CPU via the kernel's resettable RSS high-water mark
    (writing 5 to /proc/self/clear_refs resets VmHWM), torch.cuda.max_memory_allocated on CUDA."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = _rss_bytes("VmRSS")
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.seconds = time.perf_counter() - self.start
            self.extra = torch.cuda.max_memory_allocated() - self.base
        else:
            self.seconds = time.perf_counter() - self.start
            self.extra = _rss_bytes("VmHWM") - self.base


def bench_one(function, hidden, weight, targets, upstream, device):
    hidden.grad = weight.grad = None
    with PeakMemory(device) as measured:
        values = function(hidden, weight, targets)
        values.backward(upstream)
    measured.result = values.detach()
    return measured


def fused_bench(args):
    torch.set_num_threads(args.threads)
    device, dtype = args.device, getattr(torch, args.dtype)
    GB = 2**30
    print(f"V={args.vocab} D={args.width} device={device} dtype={args.dtype} chunk_size={args.chunk_size} "
          f"vocab_tile={args.vocab_tile or 'auto'} threads={args.threads} repeats={args.repeats}")
    print("extra peak = peak memory during forward+backward above what was held before, minus the weight's own")
    print("gradient (V x D, both need it). Times are medians; naive and fused alternate.")
    header = f"{'N':>6} | {'naive s':>8} {'fused s':>8} {'time ratio':>10} | {'naive extra GB':>14} {'fused extra GB':>14} {'mem ratio':>9} | {'max |dlogp|':>11} {'max |dW|':>9} {'max |dh|':>9}"
    print(header)
    print("-" * len(header))
    fused = lambda h, w, t: fused_logprobs(h, w, t, chunk_size=args.chunk_size, vocab_tile=args.vocab_tile or None)
    for num_rows in [int(n) for n in args.rows.split(",")]:
        generator = torch.Generator().manual_seed(0)
        hidden = torch.randn(num_rows, args.width, generator=generator).to(device, dtype).requires_grad_()
        weight = (0.02 * torch.randn(args.vocab, args.width, generator=generator)).to(device, dtype).requires_grad_()
        targets = torch.randint(args.vocab, (num_rows,), generator=generator).to(device)
        upstream = torch.randn(num_rows, generator=generator).to(device)
        grad_bytes = weight.numel() * weight.element_size()
        # naive's peak holds ~2.5 N x V fp32 tensors (measured); skip it where that would not fit
        naive_need = int(2.5 * num_rows * args.vocab * 4) + grad_bytes
        if device == "cpu":
            available = int(re.search(r"MemAvailable:\s+(\d+)", open("/proc/meminfo").read()).group(1)) * 1024
        else:
            available = torch.cuda.mem_get_info()[0]
        run_naive = naive_need < 0.8 * available
        runs = {"naive": [], "fused": []}
        for repeat in range(args.repeats):
            for name, function in (("naive", naive_logprobs), ("fused", fused)):
                if name == "naive" and not run_naive:
                    continue
                measured = bench_one(function, hidden, weight, targets, upstream, device)
                runs[name].append(measured)
                if repeat == 0:
                    runs[name + "_result"] = (measured.result, hidden.grad.clone(), weight.grad.clone())
        fused_s = statistics.median(m.seconds for m in runs["fused"])
        fused_extra = max(m.extra for m in runs["fused"]) - grad_bytes
        if not run_naive:
            print(f"{num_rows:>6} | {'skipped':>8} {fused_s:8.2f} {'':>10} | {'~' + format(naive_need / GB, '.1f'):>14} "
                  f"{fused_extra / GB:14.3f} {'':>9} | naive needs ~{naive_need / GB:.0f} GB, {available / GB:.0f} GB free")
            continue
        naive_s = statistics.median(m.seconds for m in runs["naive"])
        naive_extra = max(m.extra for m in runs["naive"]) - grad_bytes
        (v0, h0, w0), (v1, h1, w1) = runs["naive_result"], runs["fused_result"]
        print(f"{num_rows:>6} | {naive_s:8.2f} {fused_s:8.2f} {fused_s / naive_s:10.2f} | {naive_extra / GB:14.3f} "
              f"{fused_extra / GB:14.3f} {naive_extra / fused_extra:9.1f} | {(v0 - v1).abs().max():11.1e} "
              f"{(w0 - w1).abs().max():9.1e} {(h0 - h1).abs().max():9.1e}")
        del runs
        del hidden, weight, targets, upstream


def fused_main(argv):
    args = flags.parse(__file__, globals(), argv, block="fused hyperparameters", prefix="fused_",
                       prog="bench.py fused")
    fused_bench(args)


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else ""
    if which not in ("sampler", "fused"):
        sys.exit(__doc__ + "\nusage: python bench.py {sampler|fused} [--name=value ...]")
    (sampler_main if which == "sampler" else fused_main)(sys.argv[2:])

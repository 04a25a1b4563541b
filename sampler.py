"""
sampler.py: the sampler. generate() draws continuations of a batch of prompts from the model with a KV cache, and
runs Python mid-generation: when a row writes the tool trigger (task.TOOL_TRIGGER) it pauses, its code runs in the
sandbox, and the output is fed back to it as tokens.

Read top to bottom:
  1. Sample (what a row returns) and choose_tokens: temperature, top-k, top-p, and per-row noise keyed by
     (seed, position, token), so a row's tokens never depend on its batch;
  2. generate_reference(): the same sampling in a few lines, without cache, batch or tools: the specification that
     tests hold generate() to;
  3. the KV cache, and the state of rows (what ends them, what they wait for), slots (their place in the cache) and
     tool calls;
  4. generate(): a packed prefill of each distinct prompt once, then decode steps over the rows still running;
  5. code_open_probability(): π(code | x) as the model states it (explore.py's estimate of the prior);
  6. the static decode step for CUDA graphs (off by default: generate(static_slots=True) selects it).

explore.py, evaluate.py and bench.py call generate().
"""
import collections
import concurrent.futures
from dataclasses import dataclass, field

import torch

from model import Config
from task import CODE_OPEN, MAX_CALLS_NOTICE, TOOL_TRIGGER, encode_continuation, tool_injection

# ----------------------------------------------------------------------------------------------------------------------
# 1. What a row returns, and how each token is chosen.

@dataclass
class Sample:
    tokens: list          # all new tokens, sampled and injected, in order (a final EOS included)
    sampled_mask: list    # 1 = sampled by the model, 0 = injected tool output
    logprobs: list        # per token: log-prob under the distribution it was drawn from, softmax(logits / T)
                          # renormalised over the tokens top-k / top-p keep (log softmax(logits) when greedy); 0 if
                          # injected
    text: str             # tokens decoded, EOS left out
    calls: int            # code executions
    statuses: list        # the tool's status of each execution
    finish_reason: str    # "eos", "stop", "length" or "max_calls"


def _hash32(x):
    """A 32-bit integer mixer (xorshift-multiply, after C. Wellons' lowbias32) on int64 tensors holding values < 2^32:
    a bijection whose output bits each depend on all input bits, so hash(seed, position, token) gives
    independent-looking uniform noise. Both multipliers are odd and < 2^31, so no product overflows int64: the same
    bits on every device."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & 0xFFFFFFFF
    return x ^ (x >> 16)


def gumbel_noise(seeds, positions, vocab_size):
    """Gumbel(0,1) noise [B,V] that depends only on (seed, position, token id): argmax(logits/T + g) is then an exact
    sample of softmax(logits/T) (the Gumbel-max trick), reproducible per row whatever else is in the batch."""
    key = _hash32((seeds + _hash32((positions + 0x9E3779B9) & 0xFFFFFFFF)) & 0xFFFFFFFF)
    tokens = torch.arange(vocab_size, device=seeds.device)
    bits = _hash32(key[:, None] ^ tokens[None, :])
    uniform = ((bits >> 8).float() + 0.5) / float(1 << 24)  # 24 bits, in (0, 1)
    return -torch.log(-torch.log(uniform))


def choose_tokens(logits, temperature, top_k, top_p, seeds, positions):
    """logits [B,V] fp32 -> (tokens [B], behaviour log-probs [B]). The log-prob is under the distribution the token was
    drawn from: softmax(logits / T) renormalised over the tokens top-k / top-p keep, the denominator pi_b of the
    trainer's importance ratio. Greedy (T = 0) gives log_softmax(logits)."""
    if temperature == 0:
        tokens = logits.argmax(-1)
        return tokens, torch.log_softmax(logits, -1).gather(1, tokens[:, None])[:, 0]
    scaled = logits / temperature
    filtered = scaled
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]
        filtered = filtered.masked_fill(filtered < kth, float("-inf"))
    if top_p < 1.0:
        # keep the smallest set of most likely tokens whose mass reaches top_p: drop a token when the mass strictly
        # before it (in descending order) is already >= top_p.
        sorted_logits, order = torch.sort(filtered, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, -1)
        drop = (probs.cumsum(-1) - probs) >= top_p
        drop[:, 0].fill_(False)  # the most likely token always stays (fill_: no tensor built from Python data)
        filtered = filtered.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    tokens = (filtered + gumbel_noise(seeds, positions, logits.shape[-1])).argmax(-1)
    # the dropped tokens are -inf, so this renormalises over the kept ones; with nothing dropped it is exactly
    # log_softmax(scaled), the same bits as before truncation was accounted for
    return tokens, torch.log_softmax(filtered, -1).gather(1, tokens[:, None])[:, 0]


# ----------------------------------------------------------------------------------------------------------------------
# 2. The specification: generate_reference.

@torch.inference_mode()
def generate_reference(model, prompts, max_new_tokens, temperature=1.0, seeds=None, eos=(), top_k=0, top_p=1.0):
    """What generate() computes, without its machinery: one row at a time, a full forward over the whole sequence for
    every new token, no cache, no tools. seeds: one per prompt (None: 0 for all, enough when greedy); eos: token ids.
    Returns (prompt + new tokens, log-probs of the new tokens) per prompt. generate() with the same seeds draws the same
    tokens (the noise depends only on seed and position) and the same log-probs up to float rounding (a cached step
    adds up the attention in another order than a full forward)."""
    device = model.embed_tokens.weight.device
    results = []
    for i, prompt in enumerate(prompts):
        ids, logprobs = list(prompt), []
        seed = torch.tensor([(seeds[i] if seeds is not None else 0) & 0xFFFFFFFF], device=device)
        while len(ids) - len(prompt) < max_new_tokens and len(ids) < model.config.max_position_embeddings:
            logits = model(torch.tensor([ids], device=device))[0, -1:].float()
            position = torch.tensor([len(ids)], device=device)
            token, logprob = choose_tokens(logits, temperature, top_k, top_p, seed, position)
            ids.append(int(token))
            logprobs.append(float(logprob))
            if ids[-1] in eos:
                break
        results.append((ids, logprobs))
    return results


# ----------------------------------------------------------------------------------------------------------------------
# 3. The cache, and the state of rows, slots and tool calls.

# A decode step attends over the cache's whole capacity (the positions past a row's own are masked), because that
# block is contiguous: a shorter slice of a longer buffer is strided, and SDPA copies strided keys and values on every
# call (on CPU that copy cost more than the attention). So the capacity grows in blocks of CACHE_BLOCK positions, one
# copy per block rather than a concatenation per step, up to the longest sequence any row can reach.
CACHE_BLOCK = 32
# Stop strings and the tool trigger are tested on a row's last tokens, decoded. Tokens can decode to fewer characters
# than their count (a character split over several byte-level tokens decodes to one), so a few more tokens are decoded
# than the longest string tested has characters.
TAIL_EXTRA_TOKENS = 8


class KVCache:
    """The keys and values of the sampler's sequences: k and v, each [layers, slots, kv_heads, capacity, head_dim]."""

    def __init__(self, config: Config, slots, capacity, dtype, device):
        shape = (config.num_hidden_layers, slots, config.num_key_value_heads, capacity, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def capacity(self):
        return self.k.shape[3]

    def make_room(self, needed, longest):
        """Grow, by CACHE_BLOCK positions at a time, to hold sequences of `needed` tokens (never beyond `longest`)."""
        if needed > self.capacity:
            self.grow(min(longest, needed + CACHE_BLOCK - 1))

    def grow(self, capacity, copy_of=None):
        """Move to a zeroed cache of `capacity` positions holding what this one holds; with copy_of (a tensor of slot
        indices), new slot i holds old slot copy_of[i], which is how rows sharing a prompt get its prefilled keys."""
        layers, slots, kv_heads, old_capacity, head_dim = self.k.shape
        slots = slots if copy_of is None else len(copy_of)
        old = (self.k, self.v)
        shape = (layers, slots, kv_heads, capacity, head_dim)
        new = tuple(torch.zeros(shape, dtype=t.dtype, device=t.device) for t in old)
        for new_tensor, old_tensor in zip(new, old):
            for layer in range(layers):  # one layer at a time: a gather's copy stays small
                rows = old_tensor[layer] if copy_of is None else old_tensor[layer, copy_of]
                new_tensor[layer, :, :, :old_capacity] = rows
        self.k, self.v = new

    def swap(self, a, b):
        """Exchange slots a[i] and b[i] (index tensors) in every layer."""
        both, other = torch.cat([a, b]), torch.cat([b, a])
        for tensor in (self.k, self.v):
            tensor[:, both] = tensor[:, other]


@dataclass
class _Rules:
    """What ends a row or pauses it on a tool call: generate()'s arguments, the same for every row."""
    eos: set
    max_new_tokens: int
    context: int            # the model's: prompt + response never exceed it
    tokenizer: object
    stop_strings: list
    has_tool: bool          # whether TOOL_TRIGGER calls a tool
    max_calls: int

    def __post_init__(self):
        # the characters a row's tail must hold to end with any stop string, or with the trigger (whitespace after it
        # comes in the trigger's own last token, so it needs no more tokens)
        self.tail_chars = max([len(s) for s in self.stop_strings] + [len(TOOL_TRIGGER) if self.has_tool else 0])


@dataclass
class _Row:
    """Bookkeeping of one prompt while it is generated."""
    prompt_length: int
    seed: int
    tokens: list = field(default_factory=list)
    sampled_mask: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    forced: collections.deque = field(default_factory=collections.deque)  # injected tokens still to feed
    calls: int = 0
    statuses: list = field(default_factory=list)
    noticed: bool = False        # MAX_CALLS_NOTICE already injected
    finish_reason: str | None = None
    waiting: bool = False        # paused on a tool call

    @property
    def decoding(self):
        return self.finish_reason is None and not self.waiting

    def add_token(self, token, sampled, logprob, rules: _Rules):
        """Append one token (sampled, or injected with log-prob 0) and decide what the row does next: go on, finish
        ("eos", "length", "stop", "max_calls"), queue MAX_CALLS_NOTICE as the output of a call beyond max_calls, or
        wait for the tool. Returns True when the row now waits: the caller submits its call."""
        self.tokens.append(token)
        self.sampled_mask.append(int(sampled))
        self.logprobs.append(logprob if sampled else 0.0)
        if sampled and token in rules.eos:
            self.finish_reason = "eos"
        elif len(self.tokens) >= rules.max_new_tokens or self.prompt_length + len(self.tokens) >= rules.context:
            self.finish_reason = "length"
        elif sampled and rules.tail_chars:  # injected text never stops a row nor calls the tool
            tail = rules.tokenizer.decode(self.tokens[-(rules.tail_chars + TAIL_EXTRA_TOKENS):])
            if any(tail.endswith(s) for s in rules.stop_strings):
                self.finish_reason = "stop"
            # the trigger's last token may carry whitespace after it ("output\n\n"). A token of whitespace alone
            # completes no trigger: the one it follows was complete a token earlier and was answered then
            elif (rules.has_tool and tail.rstrip().endswith(TOOL_TRIGGER)
                  and rules.tokenizer.decode([token]).strip()):
                if self.calls < rules.max_calls:
                    self.waiting = True
                elif not self.noticed:
                    self.noticed = True
                    self.inject(MAX_CALLS_NOTICE, tail.endswith("\n"), rules.tokenizer)
                else:
                    self.finish_reason = "max_calls"
        return self.waiting

    def inject(self, output, after_newline, tokenizer):
        self.forced.extend(encode_continuation(tokenizer, tool_injection(output, after_newline), self.tokens))

    def tool_returned(self, output, status, tokenizer):
        self.calls += 1
        self.statuses.append(status)
        self.waiting = False
        self.inject(output, tokenizer.decode(self.tokens).endswith("\n"), tokenizer)

    def sample(self, tokenizer):
        text_tokens = self.tokens[:-1] if self.finish_reason == "eos" else self.tokens
        text = tokenizer.decode(text_tokens) if tokenizer is not None else ""
        return Sample(self.tokens, self.sampled_mask, self.logprobs, text, self.calls, self.statuses,
                      self.finish_reason)


class _Slots:
    """The batch as a decode step sees it: slot s of the cache holds row row_of[s]. The slots are kept ordered [rows
    still decoding | paused or finished rows], so a step runs on the views [:n] without copying; a row changing state
    swaps slots with another (two rows copied, not the whole cache)."""

    def __init__(self, rows, cache: KVCache, device=None):
        # the per-slot state lives with the cache by default; the static path (StaticDecoder) keeps it on the host,
        # where the rows are, and copies what a step needs into its own buffers
        device = cache.k.device if device is None else device
        self.rows, self.cache = rows, cache
        self.row_of = list(range(len(rows)))
        # tokens of each slot's sequence, counting next_input, the chosen token not yet fed (so not yet cached)
        self.lengths = torch.tensor([row.prompt_length for row in rows], device=device)
        self.next_input = torch.zeros(len(rows), dtype=torch.long, device=device)
        self.seeds = torch.tensor([row.seed for row in rows], device=device)

    def swap(self, a, b):
        """Exchange slots a[i] and b[i] (lists): their cache rows, per-slot state and rows."""
        if not a:
            return
        device = self.lengths.device
        ia, ib = torch.tensor(a, device=device), torch.tensor(b, device=device)
        self.cache.swap(ia.to(self.cache.k.device), ib.to(self.cache.k.device))
        both, other = torch.cat([ia, ib]), torch.cat([ib, ia])
        for tensor in (self.lengths, self.next_input, self.seeds):
            tensor[both] = tensor[other]
        for x, y in zip(a, b):
            self.row_of[x], self.row_of[y] = self.row_of[y], self.row_of[x]

    def compact(self):
        """Reorder slots so the rows still decoding come first; returns their count."""
        live = {s for s, r in enumerate(self.row_of) if self.rows[r].decoding}
        n = len(live)
        holes = [s for s in range(n) if s not in live]
        outsiders = sorted(s for s in live if s >= n)
        self.swap(holes, outsiders)
        return n

    def add_tokens(self, tokens, logprobs, rules: _Rules):
        """Give each of the first len(tokens) slots its next token: the chosen one, or the next injected token where the
        row has some pending. Returns the rows that now wait for the tool."""
        n = len(tokens)
        self.lengths[:n] += 1
        self.next_input[:n] = tokens
        forced_slots, forced_tokens, asking = [], [], []
        for slot, (token, logprob) in enumerate(zip(tokens.tolist(), logprobs.tolist())):
            row = self.rows[self.row_of[slot]]
            if row.forced:
                token = row.forced.popleft()
                forced_slots.append(slot)
                forced_tokens.append(token)
                waits = row.add_token(token, False, 0.0, rules)
            else:
                waits = row.add_token(token, True, logprob, rules)
            if waits:
                asking.append(row)
        if forced_slots:
            device = self.next_input.device
            self.next_input[torch.tensor(forced_slots, device=device)] = torch.tensor(forced_tokens, device=device)
        return asking


class _ToolCalls:
    """The tool calls of one step go to a worker thread as one batch (sandbox.tool runs them concurrently); their rows
    wait outside the active slots, and come back when their future is done."""

    def __init__(self, tool, workers, tokenizer):
        self.tool, self.tokenizer = tool, tokenizer
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers) if tool is not None else None
        self.pending = {}  # future -> rows

    def submit(self, rows):
        if rows:
            self.pending[self.pool.submit(self.tool, [self.tokenizer.decode(r.tokens) for r in rows])] = rows

    def collect(self, block):
        """Inject the outputs of the finished calls into their rows; with block, first wait for one call to finish."""
        if not self.pending:
            return
        if block:
            concurrent.futures.wait(list(self.pending), return_when=concurrent.futures.FIRST_COMPLETED)
        for future in [f for f in self.pending if f.done()]:
            rows = self.pending.pop(future)
            try:
                results = future.result()
            except Exception as error:
                raise RuntimeError(f"generate: the tool callback raised {type(error).__name__}: {error}") from error
            if len(results) != len(rows):
                raise RuntimeError(f"generate: the tool callback returned {len(results)} results for {len(rows)} "
                                   f"requests")
            for row, (output, status) in zip(rows, results):
                row.tool_returned(output, status, self.tokenizer)

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)


def _eos_set(model, tokenizer, eos_token_id):
    if eos_token_id is None:
        eos_token_id = model.config.eos_token_id
        if eos_token_id is None and tokenizer is not None:
            eos_token_id = tokenizer.eos_token_id
    if eos_token_id is None:
        return set()
    return {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)


def _row_seeds(seed, B):
    if seed is None:
        return torch.randint(0, 2**32, (B,)).tolist()  # from torch's global RNG: torch.manual_seed makes it repeatable
    if isinstance(seed, int):
        return [seed + i for i in range(B)]
    if len(seed) != B:
        raise ValueError(f"generate: {len(seed)} seeds for {B} prompts")
    return list(seed)


def _check_prompts(prompts, context, tokenizer, tool, stop_strings, caller="generate"):
    if (tool is not None or stop_strings) and tokenizer is None:
        raise ValueError(f"{caller}: tool calls and stop strings need the tokenizer")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"{caller}: prompt {i} is empty")
        if len(prompt) > context:
            raise ValueError(f"{caller}: prompt {i} has {len(prompt)} tokens, longer than the model's context of "
                             f"{context}")


def _prefill(model, prompts, rows, slot_count, capacity, state_device):
    """One packed forward over each distinct prompt once (explore.py draws K rollouts of every prompt in one batch, so
    most prompts come K times); the rows sharing a prompt then copy its keys and values into a cache of slot_count
    slots and `capacity` positions. Returns the slots (their state on state_device) and each row's last hidden
    state, from which its first token comes."""
    device, dtype = model.embed_tokens.weight.device, model.embed_tokens.weight.dtype
    distinct = {}
    copy_of = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
    cache = KVCache(model.config, len(distinct), max(map(len, prompts)), dtype, device)
    last = model.prefill(list(distinct), (cache.k, cache.v))[torch.tensor(copy_of, device=device)]
    # the slots past the rows (StaticDecoder's bucket can hold more) copy prompt 0: no row reads them
    cache.grow(capacity, torch.tensor(copy_of + [0] * (slot_count - len(rows)), device=device))
    return _Slots(rows, cache, state_device), last


def _first_tokens(model, slots, last, sampling, rules):
    """Each row's first token, chosen from its prompt's last hidden state. Returns the rows that now wait."""
    n = slots.compact()
    if n == 0:
        return []
    device, state_device = last.device, slots.lengths.device
    logits = model.lm_head(last[torch.tensor(slots.row_of[:n], device=device)])
    # the noise is keyed by the new token's index in the sequence: lengths, before add_tokens counts it
    tokens, logprobs = choose_tokens(logits.float(), *sampling, slots.seeds[:n].to(device),
                                     slots.lengths[:n].to(device))
    return slots.add_tokens(tokens.to(state_device), logprobs.to(state_device), rules)


class GrowingDecoder:
    """Decode steps run eagerly on exactly the rows still decoding, over a cache that grows with them (CACHE_BLOCK):
    the CPU's default path."""

    def __init__(self, model, cache: KVCache, sampling, longest):
        self.model, self.cache, self.sampling, self.longest = model, cache, sampling, longest

    def step(self, slots: _Slots, n):
        """The first n slots each feed one token at its own position and attend to their prefix. Returns their tokens
        and log-probs."""
        cache = self.cache
        cache.make_room(int(slots.lengths[:n].max()), self.longest)
        hidden = self.model.step(slots.next_input[:n, None], (cache.k, cache.v), slots.lengths[:n] - 1)
        logits = self.model.lm_head(hidden[:, 0])
        # the noise is keyed by the new token's index in the sequence: lengths, before add_tokens counts it
        return choose_tokens(logits.float(), *self.sampling, slots.seeds[:n], slots.lengths[:n])


# ----------------------------------------------------------------------------------------------------------------------
# 4. generate.

@torch.inference_mode()
def generate(model, prompts, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, seed=None, tokenizer=None,
             stop_strings=None, tool=None, max_calls=4, eos_token_id=None, tool_workers=4, static_slots=False,
             cuda_graphs=True):
    """Sample continuations of a batch of token-id prompts (different lengths welcome); returns one Sample per prompt.

    temperature=0 is greedy. seed: an int (row i uses seed + i) or a list of ints, one per prompt; a row's tokens depend
    only on its prompt and its seed (the noise is a hash of (seed, position, token id), not a shared RNG stream).
    eos_token_id: defaults to the model's (or tokenizer's) EOS ids; an empty list never stops at EOS.
    max_new_tokens counts every new token, injected ones included; a row also ends ("length") at the model's context.
    Sample.logprobs holds the behaviour log-prob of each sampled token under the distribution it was drawn from:
    softmax(logits / temperature) renormalised over the tokens top-k / top-p keep (log_softmax(logits) when greedy),
    and 0.0 for injected tokens.

    Tools: when a sampled token completes TOOL_TRIGGER (whitespace after it in the same token allowed), tool(list of
    response texts) -> list of (output, status) runs in a worker thread; the row is paused, the other rows keep
    decoding, and when the call returns tool_injection(output) is fed to the row as forced tokens, encoded as a
    continuation of the row (encode_continuation: no SentencePiece prefix space; the model's own tokens are never
    re-tokenized). Injected tokens never call the tool nor stop a row. Each execution counts in .calls and adds its
    status. After max_calls executions, the next trigger gets MAX_CALLS_NOTICE as its output (no execution, no status)
    and the one after that ends the row with "max_calls". An exception raised by the callback is re-raised here as
    RuntimeError (cause chained); a callback that never returns blocks the rows waiting for it, so give it a timeout
    (sandbox.tool has one).

    static_slots: decode with StaticDecoder (fixed buffers, steps on padded buckets of slots, sampling inside the step)
    instead of the growing cache; None = on a GPU only. It is off by default everywhere for now: it is tested eagerly
    on the CPU, but its CUDA graphs have not run on a GPU yet (no device was lent while it was written), and a
    default must be a tested path. cuda_graphs: on a GPU, replay each bucket's step as a CUDA graph (False: run it
    eagerly, for debugging). Every path draws the same tokens, with the same log-probs up to float rounding.
    """
    if not prompts:
        return []
    context, device = model.config.max_position_embeddings, model.embed_tokens.weight.device
    _check_prompts(prompts, context, tokenizer, tool, stop_strings)
    rows = [_Row(len(p), s & 0xFFFFFFFF) for p, s in zip(prompts, _row_seeds(seed, len(prompts)))]
    for row in rows:  # zero room: nothing to generate
        if max_new_tokens <= 0 or row.prompt_length >= context:
            row.finish_reason = "length"
    rules = _Rules(_eos_set(model, tokenizer, eos_token_id), max_new_tokens, context, tokenizer,
                   list(stop_strings or []), tool is not None, max_calls)
    longest_prompt = max(len(p) for p in prompts)
    longest = min(context, longest_prompt + max_new_tokens)  # the cache never needs more positions
    static = device.type == "cuda" if static_slots is None else static_slots
    sampling = (temperature, top_k, top_p)
    was_training = model.training
    model.eval()
    tools = _ToolCalls(tool, tool_workers, tokenizer)
    try:
        # A graph's buffers never move, so on a GPU the static path's cache holds the longest sequence from the start;
        # otherwise it grows, with room for the first CACHE_BLOCK new tokens to begin with.
        capacity = longest if static and device.type == "cuda" else min(longest, longest_prompt + CACHE_BLOCK)
        slot_count = decode_bucket(len(rows)) if static else len(rows)
        slots, last = _prefill(model, prompts, rows, slot_count, capacity, "cpu" if static else device)
        if static:
            decoder = StaticDecoder(model, slots.cache, rows, rules, sampling, longest, cuda_graphs)
        else:
            decoder = GrowingDecoder(model, slots.cache, sampling, longest)
        tools.submit(_first_tokens(model, slots, last, sampling, rules))
        # Decode until no row decodes and no tool call is out.
        while True:
            n = slots.compact()
            if n == 0 and not tools.pending:
                break
            tools.collect(block=(n == 0))  # nothing else to do: wait for a call to return
            n = slots.compact()
            if n:
                tools.submit(slots.add_tokens(*decoder.step(slots, n), rules))
    finally:
        tools.close()
        model.train(was_training)
    return [row.sample(tokenizer) for row in rows]


# ----------------------------------------------------------------------------------------------------------------------
# 5. The model's own prior for code: π(code | x) read from its first tokens.

def code_open_probability(net, tokenizer, prompts):
    """π(code | x) as the model states it: the probability that the response to each prompt starts
    with the tokens of task.CODE_OPEN ("```python"), by teacher forcing: exp(Σ_j log p(open_j | prompt, open_<j)).
    The opening is encoded as what the model would write after its prompt (encode_continuation: on its own, a
    SentencePiece tokenizer would give it a leading space no response starts with), so it can differ by prompt.
    Right padding is harmless (causal attention), and only the positions that predict the opening's tokens go
    through the output matrix."""
    if not prompts:
        return []
    # generate's check, before this forward over every whole prompt: its memory grows with their length
    _check_prompts(prompts, net.config.max_position_embeddings, tokenizer, None, None, "code_open_probability")
    openings = [encode_continuation(tokenizer, CODE_OPEN, list(p)) for p in prompts]
    rows = [list(p) + o for p, o in zip(prompts, openings)]
    width, longest = max(len(r) for r in rows), max(len(o) for o in openings)
    device = net.lm_head.weight.device
    ids = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    # per row, the positions predicting its opening's tokens, padded with the last one (masked out of the sum)
    positions = torch.zeros(len(rows), longest, dtype=torch.long, device=device)
    targets, counted = torch.zeros_like(positions), torch.zeros(len(rows), longest, device=device)
    for i, (p, o) in enumerate(zip(prompts, openings)):
        ids[i, :len(p) + len(o)] = torch.tensor(list(p) + o)
        at = [len(p) - 1 + j for j in range(len(o))]
        positions[i] = torch.tensor(at + at[-1:] * (longest - len(o)))
        targets[i] = torch.tensor(o + o[-1:] * (longest - len(o)))
        counted[i, :len(o)] = 1.0
    with torch.inference_mode():
        hidden = net(ids, return_hidden=True)                                     # [B, T, D]
        picked = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))  # [B, L, D]
        logprobs = torch.log_softmax((picked @ net.lm_head.weight.T).float(), dim=-1)   # [B, L, V]
        chosen = logprobs.gather(-1, targets[..., None]).squeeze(-1)
        return (chosen * counted).sum(-1).exp().tolist()


# ----------------------------------------------------------------------------------------------------------------------
# 6. The static path, off by default until it has run on a GPU: a decode step with every shape fixed, so that a GPU
# can capture it once as a CUDA graph and replay it, one launch for the whole step instead of hundreds (at the 0.5B
# size the eager step is bound by Python and kernel launches, not by memory: docs/BENCH.md). A step runs on a bucket
# of slots, the smallest of these that holds the rows still decoding, one graph per bucket; the slots past those rows
# are padding.
DECODE_BUCKETS = (8, 16, 32, 64, 128, 256)
# Eager runs of a step before it is captured, on a side stream: a first run sets things up (cuBLAS workspaces,
# kernel choices) that a capture cannot. Each writes what the replay then writes again, so they change nothing.
GRAPH_WARMUP_STEPS = 2


def decode_bucket(n):
    """How many slots a step for n rows runs on: the smallest bucket that holds them, past the largest a multiple of
    it."""
    for size in DECODE_BUCKETS:
        if n <= size:
            return size
    return -(-n // DECODE_BUCKETS[-1]) * DECODE_BUCKETS[-1]


class StaticDecoder:
    """The decode step over static buffers: the cache (on a GPU allocated at full length, so it never moves), the
    inputs of every slot and the outputs. step() copies the inputs in from the host, runs the step on a bucket of
    slots (replaying that bucket's CUDA graph, or eagerly: on the CPU, or with cuda_graphs=False) and brings the
    outputs back in one small copy. The step samples too (choose_tokens' noise is a hash of device tensors, so it
    needs no RNG state) and checks EOS and the length limit; stop strings and the tool trigger need the text, so they
    stay on the host (_Row.add_token, on the copied tokens).

    Padding slots [n, bucket) hold finished or waiting rows, or none. They feed token 0 at the cache's last position,
    a scratch position: no row attends to another slot, and a waiting row's positions from its next one on are
    written again before it reads them, so the scratch write costs it nothing. Their outputs are ignored."""

    def __init__(self, model, cache: KVCache, rows, rules: _Rules, sampling, longest, cuda_graphs=True):
        device = cache.k.device
        self.model, self.cache, self.sampling, self.longest = model, cache, sampling, longest
        self.use_graphs = cuda_graphs and device.type == "cuda"
        slots, pinned = cache.k.shape[1], device.type == "cuda"
        # One row per slot: the token fed, its position, the row's seed, its length limit, and the injected token it
        # takes instead of the sampled one (-1: none). Staged on the host (pinned memory: the copy is asynchronous)
        # and copied to the device in one piece: slots [:b] are a contiguous block.
        self.staging = torch.zeros(slots, 5, dtype=torch.long, pin_memory=pinned)
        self.inputs = torch.zeros(slots, 5, dtype=torch.long, device=device)
        # each slot's token, its behaviour log-prob and its done flag; float64 holds token ids and fp32 log-probs
        # exactly, so one copy brings all three back
        self.outputs = torch.zeros(slots, 3, dtype=torch.float64, device=device)
        self.host_outputs = torch.zeros(slots, 3, dtype=torch.float64, pin_memory=pinned)
        self.copied = torch.cuda.Event() if device.type == "cuda" else None
        self.eos = torch.tensor(sorted(rules.eos), dtype=torch.long, device=device)
        self.limits = torch.tensor([min(row.prompt_length + rules.max_new_tokens, rules.context) for row in rows])
        self.graphs, self.pool = {}, None   # bucket -> torch.cuda.CUDAGraph, all in one memory pool
        self.done = None

    def step(self, slots: _Slots, n):
        """One decode step for the rows in slots [:n]. Returns their tokens and log-probs (host tensors) for
        slots.add_tokens. self.done then holds the device's verdict on each, EOS sampled or the length limit reached:
        _Row.add_token comes to the same one on the host, where it also tests what needs the text; the flag is what a
        loop keeping several steps on the device would mask with."""
        b = decode_bucket(n)
        self.cache.make_room(int(slots.lengths[:b].max()), self.longest)  # the CPU's growing cache; on a GPU a no-op
        self._stage(slots, n, b)
        # the last step's outputs were waited for, so its copy in is done too: the staging buffer is free again
        self.inputs[:b].copy_(self.staging[:b], non_blocking=True)
        if self.use_graphs:
            self._graph(b).replay()
        else:
            self._forward(b)
        self.host_outputs[:b].copy_(self.outputs[:b], non_blocking=True)
        if self.copied is not None:
            self.copied.record()
            self.copied.synchronize()
        tokens, logprobs, done = self.host_outputs[:n].T
        self.done = done.bool()
        return tokens.long(), logprobs.clone()  # copies: the buffer is the next step's

    def _stage(self, slots, n, b):
        """The inputs of slots [:b] into the staging buffer: the rows of slots [:n], padding after."""
        staging = self.staging[:b].T  # one row per field
        staging[0, :n] = slots.next_input[:n]
        staging[1, :n] = slots.lengths[:n] - 1  # the input is its sequence's last token
        staging[2, :n] = slots.seeds[:n]
        staging[3, :n] = self.limits[slots.row_of[:n]]
        rows = (slots.rows[r] for r in slots.row_of[:n])
        staging[4, :n] = torch.tensor([row.forced[0] if row.forced else -1 for row in rows])
        staging[:, n:] = torch.tensor([0, self.cache.capacity - 1, 0, 0, -1])[:, None]

    def _forward(self, b):
        """The device part of a step on slots [:b]: reads self.inputs, writes self.outputs. It reads no host data and
        builds no shape from data (no .item(), no boolean-mask indexing): what a CUDA graph can hold."""
        input_ids, positions, seeds, limits, forced = self.inputs[:b].T.contiguous()  # one row per field
        hidden = self.model.step(input_ids[:, None], (self.cache.k, self.cache.v), positions)
        logits = self.model.lm_head(hidden[:, 0]).float()
        # the noise is keyed by the new token's index in its sequence, one past the input's
        chosen, logprobs = choose_tokens(logits, *self.sampling, seeds, positions + 1)
        sampled = forced < 0
        tokens = torch.where(sampled, chosen, forced)
        eos = sampled & (tokens[:, None] == self.eos).any(-1)
        outputs = self.outputs[:b].T
        outputs[0] = tokens
        outputs[1] = torch.where(sampled, logprobs, 0.0)
        outputs[2] = eos | (positions + 2 >= limits)  # the sequence is now position + 2 tokens long

    def _graph(self, b):
        """The CUDA graph of the step on b slots, captured at its first use (when its inputs are staged)."""
        if b not in self.graphs:
            # One memory pool for all buckets: what a graph keeps in it is scratch that every replay writes before
            # reading (all it reads or leaves behind lives in the buffers above, outside the pool), so the graphs can
            # share it and replay in any order, one at a time.
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(GRAPH_WARMUP_STEPS):
                    self._forward(b)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self._forward(b)
            self.graphs[b] = graph
        return self.graphs[b]

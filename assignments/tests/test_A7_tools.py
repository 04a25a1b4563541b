"""A7: the tool path of the sampler: _Row.add_token / inject / tool_returned, _Slots.add_tokens, _ToolCalls, and
generate() with a scripted model and a fake tool. No real model, tokenizer or sandbox is needed: the tokenizers
below are a few lines each, and the model's next token is read off a script."""
import threading
import time

import pytest
import torch

import model
import sampler
import task
pytestmark = pytest.mark.A7

TRIGGER = task.TOOL_TRIGGER
CALL = "```python\nprint(6*7)\n```\n" + TRIGGER


class CharTokenizer:
    """One token per character (id 0 is EOS), plus optional multi-character pieces matched longest first."""
    eos_token_id = 0

    def __init__(self, merges=()):
        chars = ["\n"] + [chr(c) for c in range(32, 127)]
        self.pieces = ["<|endoftext|>"] + chars + list(merges)
        self.ids = {p: i for i, p in enumerate(self.pieces)}
        self.merges = sorted(merges, key=len, reverse=True)

    def __len__(self):
        return len(self.pieces)

    def encode(self, text, add_special_tokens=False):
        ids, i = [], 0
        while i < len(text):
            piece = next((m for m in self.merges if text.startswith(m, i)), text[i])
            ids.append(self.ids[piece])
            i += len(piece)
        return ids

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids)


class PrefixSpaceTokenizer(CharTokenizer):
    """Like SentencePiece with a prefix space: text encoded on its own starts with a space token."""

    def encode(self, text, add_special_tokens=False):
        return [self.ids[" "]] + super().encode(text)


class ByteTokenizer:
    """One token per UTF-8 byte (id 0 is EOS), as byte-level BPE without merges: "∎" is three tokens."""
    eos_token_id = 0

    def __len__(self):
        return 257

    def encode(self, text, add_special_tokens=False):
        return [b + 1 for b in text.encode()]

    def decode(self, ids):
        return bytes(i - 1 for i in ids if i > 0).decode(errors="replace")


class SentencePieceLikeTokenizer(PrefixSpaceTokenizer):
    """A prefix space on encode, and (like Llama's) the leading space of the decoded text dropped on decode."""

    def decode(self, ids):
        text = super().decode(ids)
        return text[1:] if text.startswith(" ") else text


def rules(tokenizer, max_new_tokens=500, context=1000, stop=(), tool=True, max_calls=2, eos=(0,)):
    return sampler._Rules(eos=set(eos), max_new_tokens=max_new_tokens, context=context, tokenizer=tokenizer,
                    stop_strings=list(stop), has_tool=tool, max_calls=max_calls)


def feed(row, tokenizer, text, r, sampled=True, logprob=-0.5):
    """add_token for each token of text; returns what each call returned."""
    return [row.add_token(t, sampled, logprob, r) for t in tokenizer.encode(text)]


# --------------------------------------------------------------------------- _Row.add_token
def test_sampled_and_injected_tokens_are_recorded():
    """add_token: a sampled token keeps its log-prob and mask 1; an injected one gets mask 0 and log-prob 0.0"""
    tok = CharTokenizer()
    row, r = sampler._Row(prompt_length=3, seed=1), rules(tok)
    assert row.add_token(40, True, -0.5, r) is False, "an ordinary token: add_token returns False (no tool call)"
    assert row.add_token(41, False, -0.7, r) is False
    assert row.tokens == [40, 41] and row.sampled_mask == [1, 0], (row.tokens, row.sampled_mask)
    assert row.logprobs == [-0.5, 0.0], f"the injected token's log-prob is 0.0 whatever was passed, got {row.logprobs}"
    assert row.finish_reason is None and row.decoding


def test_eos_ends_the_row_only_when_sampled():
    """add_token: a sampled EOS ends the row ("eos"); an injected token with the EOS id does not"""
    tok = CharTokenizer()
    row, r = sampler._Row(3, 1), rules(tok)
    row.add_token(0, False, 0.0, r)
    assert row.finish_reason is None, "tool output may contain anything: injected tokens never end a row at EOS"
    row.add_token(0, True, -0.1, r)
    assert row.finish_reason == "eos" and not row.decoding, f"a sampled EOS: finish_reason 'eos', got {row.finish_reason!r}"


def test_length_limits():
    """add_token: "length" once max_new_tokens tokens are in, or prompt + tokens reach the context"""
    tok = CharTokenizer()
    row, r = sampler._Row(3, 1), rules(tok, max_new_tokens=3)
    feed(row, tok, "ab", r)
    assert row.finish_reason is None, "2 of 3 new tokens: not finished"
    feed(row, tok, "c", r)
    assert row.finish_reason == "length", f"3 of max_new_tokens = 3: 'length', got {row.finish_reason!r}"
    row, r = sampler._Row(5, 1), rules(tok, context=8)
    feed(row, tok, "ab", r)
    assert row.finish_reason is None
    feed(row, tok, "c", r)
    assert row.finish_reason == "length", "prompt 5 + 3 tokens = the context of 8: 'length'"
    row, r = sampler._Row(3, 1), rules(tok, max_new_tokens=3)
    feed(row, tok, "ab", r, sampled=False)
    feed(row, tok, "c", r, sampled=False)
    assert row.finish_reason == "length", "injected tokens count toward max_new_tokens too"


def test_eos_wins_over_length():
    """add_token: a sampled EOS as the last allowed token is "eos", not "length\""""
    tok = CharTokenizer()
    row, r = sampler._Row(3, 1), rules(tok, max_new_tokens=2)
    feed(row, tok, "a", r)
    row.add_token(0, True, -0.1, r)
    assert row.finish_reason == "eos", f"got {row.finish_reason!r}"


def test_stop_strings():
    """add_token: the row stops when its sampled text ends with a stop string (over several tokens too)"""
    tok = CharTokenizer()
    row, r = sampler._Row(3, 1), rules(tok, stop=["\\boxed{42}"], tool=False)
    feed(row, tok, "so \\boxed{42", r)
    assert row.finish_reason is None
    feed(row, tok, "}", r)
    assert row.finish_reason == "stop", f"text ends with the stop string: 'stop', got {row.finish_reason!r}"
    row = sampler._Row(3, 1)
    feed(row, tok, "so \\boxed{4", r)
    feed(row, tok, "2}", r, sampled=False)
    assert row.finish_reason is None, "a stop string completed by injected tokens does not stop the row"
    feed(row, tok, "x", r)
    assert row.finish_reason is None, ("the text holds the stop string (injected) but does not END with it: the row "
                                       "goes on")
    row, r = sampler._Row(3, 1), rules(tok, stop=["\n\n"], tool=False)
    feed(row, tok, "step 1\n\n", r)
    assert row.finish_reason == "stop", (f"a stop string of whitespace ('\\n\\n') stops the row too: compare the tail "
                                         f"as it is, not stripped; got {row.finish_reason!r}")


def test_stop_strings_over_multibyte_characters():
    """add_token: with one token per byte, a stop string of one character (three bytes) still stops the row: the tail
    must be decoded from enough tokens to hold it (TAIL_EXTRA_TOKENS more than its characters)"""
    tok = ByteTokenizer()
    row, r = sampler._Row(3, 1), rules(tok, stop=["∎"], tool=False)
    feed(row, tok, "so 42 ", r)
    assert row.finish_reason is None
    feed(row, tok, "∎", r)
    assert row.finish_reason == "stop", (f"the text ends with '∎' (3 tokens for 1 character): 'stop', got "
                                         f"{row.finish_reason!r}")
    row, r = sampler._Row(3, 1), rules(tok, stop=["∎∎∎∎"], tool=False)
    feed(row, tok, "so ∎∎∎∎", r)
    assert row.finish_reason == "stop", (f"a stop string of 4 characters is 12 byte tokens: decode the last "
                                         f"tail_chars + TAIL_EXTRA_TOKENS = 12 of them; got {row.finish_reason!r}")


def test_a_stop_string_is_tested_before_the_trigger():
    """add_token: when one token completes a stop string and the trigger, the row stops (no call)"""
    tok = CharTokenizer(merges=["output\n\n"])
    row, r = sampler._Row(3, 1), rules(tok, stop=["\n\n"])
    returned = feed(row, tok, "```python\nprint(1)\n```\n```output\n\n", r)
    assert row.finish_reason == "stop" and returned[-1] is False and not row.waiting, (
        f"'output\\n\\n' completes both ```output and the stop string '\\n\\n': the stop string wins, got "
        f"finish_reason {row.finish_reason!r}, waiting {row.waiting}")


def test_a_row_at_its_length_limit_makes_no_call():
    """add_token: the token that completes ```output at max_new_tokens ends the row ("length"): no call"""
    tok = CharTokenizer()
    row, r = sampler._Row(3, 1), rules(tok, max_new_tokens=len(CALL))
    returned = feed(row, tok, CALL, r)
    assert row.finish_reason == "length" and returned[-1] is False and not row.waiting, (
        f"the trigger's last token is the row's last allowed one: 'length', no call; got finish_reason "
        f"{row.finish_reason!r}, returned {returned[-1]!r}")


def test_the_trigger_pauses_the_row():
    """add_token: the sampled token completing ```output makes the row wait for the tool (returns True)"""
    tok = CharTokenizer()
    row, r = sampler._Row(3, 1), rules(tok)
    returned = feed(row, tok, "Let me compute.\n" + CALL, r)
    assert returned[-1] is True, "the token completing ```output must return True (the caller submits the call)"
    assert not any(returned[:-1]), f"only the last token starts a call, got True at {[i for i, x in enumerate(returned) if x]}"
    assert row.waiting and not row.decoding and row.finish_reason is None, (row.waiting, row.finish_reason)
    assert row.calls == 0, "calls counts executions: it goes up when the tool returns, not when the row asks"


def test_the_trigger_token_may_carry_the_newline():
    """add_token: a token "```output\\n" (trigger and whitespace in one piece) also pauses the row"""
    tok = CharTokenizer(merges=["```output\n", "output\n\n"])
    row, r = sampler._Row(3, 1), rules(tok)
    returned = feed(row, tok, "```python\nprint(1)\n```\n```output\n", r)
    assert returned[-1] is True and row.waiting, "the trigger followed by whitespace in the same token: wait"
    tok2 = CharTokenizer(merges=["output\n\n"])
    row = sampler._Row(3, 1)
    returned = feed(row, tok2, "```python\nprint(1)\n```\n```output\n\n", rules(tok2))
    assert returned[-1] is True, "'output\\n\\n' completes the trigger: wait"


def test_a_whitespace_token_after_the_trigger_is_no_new_call():
    """add_token: a token of whitespace alone after ```output completes no trigger (it was answered already)"""
    tok = CharTokenizer()
    r = rules(tok)
    row = sampler._Row(3, 1)
    row.tokens = tok.encode(CALL)                 # a trigger completed (and answered) a token earlier
    row.sampled_mask, row.logprobs = [1] * len(row.tokens), [-0.5] * len(row.tokens)
    assert row.add_token(tok.ids["\n"], True, -0.1, r) is False and not row.waiting, (
        "the text still ends with ```output after stripping whitespace, but this token is only whitespace: no call")
    assert row.add_token(tok.ids[" "], True, -0.1, r) is False and not row.waiting
    merged = CharTokenizer(merges=["\n\n", "  \n"])
    for piece in ("\n\n", "  \n"):
        row = sampler._Row(3, 1)
        row.tokens = merged.encode(CALL)
        row.sampled_mask, row.logprobs = [1] * len(row.tokens), [-0.5] * len(row.tokens)
        assert row.add_token(merged.ids[piece], True, -0.1, rules(merged)) is False and not row.waiting, (
            f"a token of whitespace alone ({piece!r}, several characters) after ```output: no new call")


def test_injected_text_never_calls_the_tool():
    """add_token: a trigger completed by injected tokens does not pause the row"""
    tok = CharTokenizer()
    row, r = sampler._Row(3, 1), rules(tok)
    returned = feed(row, tok, CALL, r, sampled=False)
    assert not any(returned) and not row.waiting, "tool output that contains ```output must not call the tool"


def test_no_tool_no_call():
    """add_token: without a tool (has_tool False) the trigger is ordinary text"""
    tok = CharTokenizer()
    row, r = sampler._Row(3, 1), rules(tok, tool=False)
    assert not any(feed(row, tok, CALL, r)) and not row.waiting and row.finish_reason is None


def test_no_tokenizer_needed_without_stop_strings_or_tool():
    """add_token: with nothing to look for in the text, the tokenizer is never used (it may be None)"""
    row, r = sampler._Row(3, 1), rules(None, tool=False)
    for t in (5, 6, 7):
        row.add_token(t, True, -0.2, r)
    assert row.tokens == [5, 6, 7] and row.finish_reason is None


def test_beyond_max_calls_a_notice_then_the_end():
    """add_token: past max_calls, the next trigger gets MAX_CALLS_NOTICE as its output; the one after ends the row"""
    tok = CharTokenizer()
    row, r = sampler._Row(3, 1), rules(tok, max_calls=2)
    row.calls = 2                                   # two executions already
    returned = feed(row, tok, CALL, r)
    assert returned[-1] is False and not row.waiting, "beyond max_calls: no call (the notice is the output)"
    expected = task.encode_continuation(tok, task.tool_injection(task.MAX_CALLS_NOTICE), row.tokens)
    assert list(row.forced) == expected, (f"the notice is queued as forced tokens, "
                                          f"tool_injection(MAX_CALLS_NOTICE): {tok.decode(expected)!r}; got "
                                          f"{tok.decode(list(row.forced))!r}")
    assert row.noticed and row.finish_reason is None
    row.forced.clear()
    feed(row, tok, "more " + CALL, r)
    assert row.finish_reason == "max_calls", f"asking again after the notice ends the row, got {row.finish_reason!r}"
    assert row.calls == 2 and row.statuses == [], "the notice is no execution: no call counted, no status"


def test_the_notice_after_a_trigger_token_with_its_newline():
    """add_token: when the trigger token carried the newline, the notice starts without one"""
    tok = CharTokenizer(merges=["```output\n"])
    row, r = sampler._Row(3, 1), rules(tok, max_calls=0)
    feed(row, tok, "```python\nx\n```\n```output\n", r)
    expected = task.encode_continuation(tok, task.tool_injection(task.MAX_CALLS_NOTICE, True), row.tokens)
    assert list(row.forced) == expected, f"got {tok.decode(list(row.forced))!r}"


# --------------------------------------------------------------------------- inject, tool_returned
def test_inject_encodes_a_continuation_of_the_row():
    """inject: queue tool_injection(output) as tokens that continue the row's text exactly (no prefix space)"""
    tok = PrefixSpaceTokenizer()
    row = sampler._Row(3, 1)
    row.tokens = CharTokenizer().encode("abc" + TRIGGER)
    row.forced.append(5)
    row.inject("42", False, tok)
    forced = list(row.forced)
    assert forced[0] == 5, "inject adds to what is already queued (extend, do not replace)"
    assert tok.decode(row.tokens + forced[1:]) == "abc" + TRIGGER + "\n42\n```\n", (
        f"the row must read its text plus tool_injection('42') exactly; got "
        f"{tok.decode(forced[1:])!r} (a SentencePiece-style tokenizer adds a space to text encoded on its own: "
        f"use encode_continuation)")
    tok = SentencePieceLikeTokenizer()
    row = sampler._Row(3, 1)
    row.tokens = CharTokenizer().encode("abc" + TRIGGER)
    row.inject("42", False, tok)
    assert tok.decode(row.tokens + list(row.forced)) == "abc" + TRIGGER + "\n42\n```\n", (
        f"a tokenizer that drops the leading space when it decodes: the injected tokens must continue THIS row's "
        f"tokens (encode_continuation with the row's tokens as context, not an empty one); got "
        f"{tok.decode(row.tokens + list(row.forced))!r}")


def test_tool_returned_counts_the_call_and_injects_its_output():
    """tool_returned: calls + 1, the status recorded, no longer waiting, output injected after the trigger"""
    tok = CharTokenizer()
    row = sampler._Row(3, 1)
    row.tokens, row.waiting = tok.encode(CALL), True
    row.tool_returned("42", "ok", tok)
    assert row.calls == 1 and row.statuses == ["ok"] and not row.waiting, (row.calls, row.statuses, row.waiting)
    assert tok.decode(list(row.forced)) == "\n42\n```\n", f"got {tok.decode(list(row.forced))!r}"
    row.forced.clear()
    row.tokens, row.waiting = tok.encode(CALL + "\n"), True
    row.tool_returned("NameError: x", "error", tok)
    assert row.calls == 2 and row.statuses == ["ok", "error"]
    assert tok.decode(list(row.forced)) == "NameError: x\n```\n", (
        f"the text already ends with a newline: no second one; got {tok.decode(list(row.forced))!r}")


# --------------------------------------------------------------------------- _Slots.add_tokens
def slots_for(rows):
    config = model.Config(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=8, max_position_embeddings=64)
    return sampler._Slots(rows, sampler.KVCache(config, len(rows), 8, torch.float32, "cpu"))


def test_add_tokens_gives_forced_tokens_priority():
    """_Slots.add_tokens: a row with injected tokens pending gets the next one instead of the chosen token"""
    tok = CharTokenizer()
    rows = [sampler._Row(3, 1), sampler._Row(4, 2), sampler._Row(5, 3)]
    rows[1].forced.extend([70, 71])
    slots, r = slots_for(rows), rules(tok)
    asking = slots.add_tokens(torch.tensor([40, 41, 42]), torch.tensor([-0.1, -0.2, -0.3]), r)
    assert asking == [], "nobody asked for the tool"
    assert (rows[0].tokens, rows[1].tokens, rows[2].tokens) == ([40], [70], [42]), [x.tokens for x in rows]
    assert rows[1].sampled_mask == [0] and rows[1].logprobs == [0.0] and list(rows[1].forced) == [71]
    assert rows[0].logprobs == pytest.approx([-0.1]) and rows[2].logprobs == pytest.approx([-0.3])
    assert slots.next_input.tolist() == [40, 70, 42], (
        f"next_input is what each slot feeds at the next step: the forced token where one was injected; "
        f"got {slots.next_input.tolist()}")
    assert slots.lengths.tolist() == [4, 5, 6], f"each slot's length counts the new token, got {slots.lengths.tolist()}"


def test_add_tokens_on_the_first_n_slots_and_through_row_of():
    """_Slots.add_tokens: len(tokens) slots are updated, each for the row it holds (row_of), the rest untouched"""
    tok = CharTokenizer()
    rows = [sampler._Row(3, 1), sampler._Row(4, 2), sampler._Row(5, 3)]
    slots, r = slots_for(rows), rules(tok)
    slots.swap([0], [2])                                  # slot 0 now holds row 2, slot 2 row 0
    slots.add_tokens(torch.tensor([50, 51]), torch.tensor([-1.0, -2.0]), r)
    assert rows[2].tokens == [50] and rows[1].tokens == [51] and rows[0].tokens == [], [x.tokens for x in rows]
    assert slots.lengths.tolist() == [6, 5, 3], f"slot 2 (not in the step) keeps its length, got {slots.lengths.tolist()}"


def test_add_tokens_returns_the_rows_that_now_wait():
    """_Slots.add_tokens: the rows whose token completed the trigger are returned (in slot order)"""
    tok = CharTokenizer()
    rows = [sampler._Row(3, 1), sampler._Row(3, 2)]
    ids = tok.encode(CALL)
    for row in rows:
        row.tokens, row.sampled_mask, row.logprobs = ids[:-1], [1] * (len(ids) - 1), [-0.1] * (len(ids) - 1)
    slots, r = slots_for(rows), rules(tok)
    asking = slots.add_tokens(torch.tensor([ids[-1], tok.ids["x"]]), torch.tensor([-0.1, -0.1]), r)
    assert asking == [rows[0]], f"row 0 completed ```output and waits; row 1 did not; got {asking}"


# --------------------------------------------------------------------------- _ToolCalls
def waiting_row(tok, text=CALL):
    row = sampler._Row(3, 1)
    row.tokens, row.waiting = tok.encode(text), True
    row.sampled_mask, row.logprobs = [1] * len(row.tokens), [-0.1] * len(row.tokens)
    return row


def test_submit_sends_the_decoded_responses_and_collect_injects():
    """_ToolCalls: submit(rows) runs tool([text of each row]) in the pool; collect(block=True) injects the outputs"""
    tok = CharTokenizer()
    seen = []

    def tool(responses):
        seen.append(list(responses))
        return [(f"out{i}", "ok") for i in range(len(responses))]

    calls = sampler._ToolCalls(tool, 2, tok)
    try:
        long = "Let me think. " * 20 + CALL            # the tool needs the whole response: earlier cells too
        rows = [waiting_row(tok), waiting_row(tok, long)]
        calls.submit(rows)
        calls.collect(block=True)
        assert seen == [[CALL, long]], f"the tool gets the whole decoded response of each row, in order: {seen}"
        assert [row.calls for row in rows] == [1, 1] and not any(row.waiting for row in rows)
        assert tok.decode(list(rows[1].forced)) == "\nout1\n```\n", "row i gets result i"
        assert not calls.pending, "a collected call is no longer pending"
        calls.submit([])
        assert len(seen) == 1 and not calls.pending, "submit([]) calls nothing"
    finally:
        calls.close()


def test_collect_without_block_leaves_running_calls():
    """_ToolCalls.collect(block=False) takes only finished calls; block=True waits for one"""
    tok = CharTokenizer()
    release = threading.Event()

    def slow(responses):
        release.wait(10)
        return [("done", "ok")] * len(responses)

    calls = sampler._ToolCalls(slow, 2, tok)
    try:
        row = waiting_row(tok)
        calls.submit([row])
        calls.collect(block=False)
        assert row.waiting and row.calls == 0 and calls.pending, "collect(block=False) must not wait for a running call"
        release.set()
        calls.collect(block=True)
        assert not row.waiting and row.calls == 1
    finally:
        release.set()
        calls.close()


def test_collect_with_block_waits_for_the_first_call_not_all():
    """_ToolCalls.collect(block=True) returns once ONE pending call is done: the others keep running"""
    tok = CharTokenizer()
    release = threading.Event()

    def tool(responses):
        if responses[0].startswith("slow"):
            release.wait(10)
        return [("out", "ok")] * len(responses)

    calls = sampler._ToolCalls(tool, 2, tok)
    try:
        slow, fast = waiting_row(tok, "slow" + CALL), waiting_row(tok, "fast" + CALL)
        calls.submit([slow])
        calls.submit([fast])
        start = time.time()
        calls.collect(block=True)
        assert time.time() - start < 5, "collect(block=True) waited for every call, not the first to finish"
        assert fast.calls == 1 and not fast.waiting, "the finished call's row got its output"
        assert slow.waiting and slow.calls == 0 and len(calls.pending) == 1, "the running call stays pending"
        release.set()
        calls.collect(block=True)
        assert slow.calls == 1 and not calls.pending
    finally:
        release.set()
        calls.close()


def test_collect_reports_a_broken_tool():
    """_ToolCalls.collect: an exception in the tool is re-raised as RuntimeError (cause chained); so is a wrong count"""
    tok = CharTokenizer()

    def broken(responses):
        raise OSError("sandbox is gone")

    calls = sampler._ToolCalls(broken, 1, tok)
    try:
        calls.submit([waiting_row(tok)])
        with pytest.raises(RuntimeError, match="tool callback raised OSError: sandbox is gone") as info:
            calls.collect(block=True)
        assert isinstance(info.value.__cause__, OSError), "raise ... from the tool's exception"
    finally:
        calls.close()
    calls = sampler._ToolCalls(lambda responses: [("a", "ok")] * (len(responses) + 1), 1, tok)
    try:
        calls.submit([waiting_row(tok)])
        with pytest.raises(RuntimeError, match="2 results for 1"):
            calls.collect(block=True)
    finally:
        calls.close()
    calls = sampler._ToolCalls(lambda responses: [("a", "ok")], 1, tok)
    try:
        calls.submit([waiting_row(tok), waiting_row(tok)])
        with pytest.raises(RuntimeError, match="1 results for 2"):
            calls.collect(block=True)      # too few: the second row would wait for ever
    finally:
        calls.close()


def test_collect_with_nothing_pending_returns_at_once():
    """_ToolCalls.collect: nothing submitted (or no tool at all): returns immediately, even with block=True"""
    calls = sampler._ToolCalls(None, 1, CharTokenizer())
    start = time.time()
    calls.collect(block=True)
    assert time.time() - start < 1
    calls.close()


# --------------------------------------------------------------------------- generate() end to end
class ScriptedModel(model.Transformer):
    """The token at position p + 1 is script[p + 1] whatever came before: any prefix of the script is a prompt and
    the expected response (injected output included) is the rest of the script."""

    def __init__(self, script_ids, vocab_size):
        vocab_size += -vocab_size % 4
        super().__init__(model.Config(vocab_size=vocab_size, hidden_size=vocab_size, num_attention_heads=2,
                                  num_key_value_heads=2, num_hidden_layers=1, intermediate_size=8,
                                  max_position_embeddings=len(script_ids) + 2, tie_word_embeddings=False,
                                  eos_token_id=0))
        self.script = torch.tensor(script_ids + [0, 0])
        self.lm_head.weight.data = 20 * torch.eye(vocab_size)

    def prefill(self, prompts, cache):
        return torch.nn.functional.one_hot(self.script[[len(p) for p in prompts]], self.config.vocab_size).float()

    def step(self, input_ids, cache, positions):
        return torch.nn.functional.one_hot(self.script[positions[:, None] + 1], self.config.vocab_size).float()


PROMPT = "Q: 6*7?\n"


def scripted(tok, parts):
    text = "".join(parts)
    return ScriptedModel(tok.encode(text), len(tok)), text


def test_generate_runs_calls_masks_them_and_stops_at_max_calls():
    """generate: two calls run and injected with mask 0, a notice after max_calls, then the row ends"""
    tok = CharTokenizer()
    injected, notice = task.tool_injection("42"), task.tool_injection(task.MAX_CALLS_NOTICE)
    net, text = scripted(tok, [PROMPT, CALL, injected, "again", CALL, injected, "once more", CALL, notice,
                                 "and", CALL, "never reached"])
    seen = []

    def tool(responses):
        seen.extend(responses)
        return [("42", "ok") for _ in responses]

    sample = sampler.generate(net, [tok.encode(PROMPT)], 500, temperature=0, tokenizer=tok, tool=tool, max_calls=2)[0]
    expected = text[len(PROMPT):text.index("never reached")]
    assert sample.text == expected, f"expected {expected!r}\ngot      {sample.text!r}"
    assert sample.finish_reason == "max_calls" and sample.calls == 2 and sample.statuses == ["ok", "ok"]
    assert len(seen) == 2 and all(r.endswith(TRIGGER) for r in seen) and seen[0] == CALL
    mask, start = [1] * len(expected), 0
    for piece in (injected, injected, notice):
        start = expected.index(piece, start)
        mask[start:start + len(piece)] = [0] * len(piece)
        start += len(piece)
    assert sample.sampled_mask == mask, "sampled_mask must be 0 exactly on the injected characters"
    assert all(lp == 0.0 for lp, m in zip(sample.logprobs, mask) if m == 0)
    assert all(lp < 0.0 for lp, m in zip(sample.logprobs, mask) if m == 1)


def test_generate_keeps_other_rows_decoding_while_a_tool_runs():
    """generate: a row waiting for its tool leaves the others decoding; its output is what the tool returned"""
    tok = CharTokenizer()
    net, text = scripted(tok, [PROMPT, CALL, task.tool_injection("??"), "done" * 20])
    steps = []
    original = net.step
    net.step = lambda *args, **kwargs: steps.append(1) or original(*args, **kwargs)
    progress = []

    def tool(responses):
        before, deadline = len(steps), time.time() + 10
        while len(steps) < before + 15 and time.time() < deadline:
            time.sleep(0.005)
        progress.append(len(steps) - before)
        return [("42", "ok")] * len(responses)

    other = tok.encode(text[:len(PROMPT) + len(CALL) + 10])        # starts past the call: never calls
    samples = sampler.generate(net, [tok.encode(PROMPT), other], 70, temperature=0, tokenizer=tok, tool=tool)
    assert progress and progress[0] >= 15, "the other row must keep decoding while the tool runs"
    assert samples[0].text.startswith(CALL + task.tool_injection("42")), samples[0].text[:80]
    assert samples[0].calls == 1 and samples[0].statuses == ["ok"] and samples[0].finish_reason == "length"
    assert samples[1].calls == 0 and len(samples[1].tokens) == 70


def test_generate_reports_a_tool_that_raises():
    """generate: the tool's exception surfaces as RuntimeError"""
    tok = CharTokenizer()
    net, _ = scripted(tok, [PROMPT, CALL, "rest"])

    def broken(responses):
        raise OSError("sandbox is gone")

    with pytest.raises(RuntimeError, match="tool callback raised OSError: sandbox is gone"):
        sampler.generate(net, [tok.encode(PROMPT)] * 3, 60, temperature=0, tokenizer=tok, tool=broken)

"""
task.py: the embedded arithmetic task, its teacher solutions, the tool format, the prompts of the three modes, and
the tiny model's tokenizer.

The embedded task recreates, at toy scale, the situation the paper starts from: each method loses
somewhere, so a model that chooses well beats both forced modes while calling code less.

  - CoT reliable, code a wasted call (add_sub, mul_add): a tiny model (one token per digit) trained for a
    few minutes adds two 2-digit numbers digit by digit and does one-digit products in its head.
  - CoT hopeless, code right (mul, chain): it cannot multiply 3-digit by 2-digit numbers or carry a
    running total through four 3-digit steps in its head, but copying the numbers into `print(...)`
    is easy at every size.
  - Code wrong, CoT reliable (last_digit: "what is the last digit of 347 + 586?"): the model's coding
    habit prints the whole sum (933) and reports it, missing the question's twist, while its CoT restates
    the sum and does one one-digit addition (7 + 6 = 13, so 3). The contrast is made in the teacher's code solution, which
    is the habit (`print(347 + 586)`, then the output boxed): the tool runs it correctly and the grader
    is honest; the program answers another question, as real models' code does when it misreads one.
    The warm start codes here most of the time when unprompted (train.py's habit_code_frac), so EM
    must learn both directions: start coding where CoT fails, stop where code fails.

    python task.py --split=train --n=2000 --out=queries.jsonl    # write queries
    python task.py --show                                        # one example per family and style
"""

import functools
import hashlib
import json
import os
import random
import re

import flags
from jsonl import write_jsonl_atomic

# ----------------------------------------------------------------------------- hyperparameters
split = "train"   # "train" or "test": the two splits never share a set of operands
n = 2000          # number of queries to write
seed = 0          # generator seed; the same (n, split, seed) always gives the same problems
out = ""          # output JSONL (queries: id, problem, answer, family, difficulty); empty = print
show = False      # print one problem of each family with both teacher solutions, then exit
# ----------------------------------------------------------------------------- end of hyperparameters

# The families, easy first. The mix (3:2:1:1) gives the digit-level CoT of the easy families the
# most practice, since that is what a tiny model learns last; the hard families only need enough
# examples to learn to copy their numbers into a program.
FAMILIES = ("add_sub", "mul_add", "last_digit", "mul", "chain")
EASY_FAMILIES = ("add_sub", "mul_add", "last_digit")
HARD_FAMILIES = ("mul", "chain")
FAMILY_WEIGHTS = {"add_sub": 3, "mul_add": 2, "last_digit": 1, "mul": 1, "chain": 1}
# Where the model's own code is wrong: the teacher's program answers the plain question (the whole sum) and misses
# the question's twist (its last digit), the habit the warm start copies.
CODE_FAILS_FAMILIES = ("last_digit",)

# Share of operations that belong to the test split. An operation is a step on a multi-digit number that a
# worked solution writes down ("42 + 61", "285 * 30", "1120 - 765"; the digit steps "ones: 7 + 6 = 13" are shared
# skills, not problems). A problem belongs to a split only when EVERY operation of its solutions does, so no test
# problem's arithmetic is ever written out in training data, in any family: mul_add's "42 + 61" step and an
# add_sub problem "61 - 42" are the same pair of numbers and fall in the same split.
TEST_PERCENT = 20
# Draws of one problem before make_problems gives up (a chain test problem needs all four steps in the test split:
# 1 draw in 0.2^4 = 625 on average).
MAX_DRAWS = 100_000

# Short word problems (55-80 characters): a tiny model spends its capacity on arithmetic, not
# on reading. Several wordings per family so the model must find the numbers, not a position.
TEMPLATES = {
    "add": [
        "Ann has {a} shells and finds {b} more. How many shells now?",
        "A shelf holds {a} books and {b} more are added. How many books?",
        "A farm has {a} hens and buys {b} more. How many hens in all?",
    ],
    "sub": [
        "Ben had {a} coins and spent {b}. How many coins are left?",
        "A bus carries {a} people and {b} get off. How many remain?",
        "A tree had {a} apples and {b} fell. How many apples are left?",
    ],
    "mul_add": [
        "A box has {a} rows of {b} eggs and {c} loose eggs. How many eggs?",
        "{a} bags hold {b} marbles each, plus {c} extra. How many marbles?",
        "Sam reads for {a} days, {b} pages a day, then {c} more. Total pages?",
    ],
    "last_digit": [
        "Ann adds {a} and {b}. What is the last digit of the sum?",
        "A van has {a} kg and takes {b} kg more. Last digit of the total?",
        "{a} people came, then {b} more. What is the last digit of the count?",
    ],
    "mul": [
        "A farm has {a} fields with {b} plants each. How many plants?",
        "A shop sells {a} boxes of {b} pins. How many pins in all?",
        "There are {a} crates of {b} cans. How many cans are there?",
    ],
    "chain": [
        "Start at {a}, {s1} {b}, {s2} {c}, {s3} {d}, {s4} {e}. Result?",
        "Take {a}, {s1} {b}, {s2} {c}, {s3} {d}, {s4} {e}. What is left?",
    ],
}


@functools.lru_cache(maxsize=1 << 20)
def _split_of_operation(x, y):
    """'train' or 'test' for a pair of operands x <= y, whatever the operator, from a stable hash (not Python's
    hash(), which is salted per process)."""
    key = f"{x},{y}"
    bucket = int(hashlib.sha256(key.encode()).hexdigest(), 16) % 100
    return "test" if bucket < TEST_PERCENT else "train"


_OPERATION = re.compile(r"(-?\d+) [-+*] (\d+)")


def operations(record):
    """The operand pairs of every multi-digit operation in a record's worked CoT solution, and of its expression
    when that is one operation (the program computes it)."""
    steps = [line for line in _cot_lines(record)[0] if not line.startswith(("ones:", "tens:", "result:", "last"))]
    if len(_OPERATION.findall(record["expression"] + " ")) == 1 and record["expression"].count(" ") == 2:
        steps.append(record["expression"])
    pairs = set()
    for text in steps:
        for x, y in _OPERATION.findall(text):
            if max(len(x.lstrip("-")), len(y)) >= 2:
                pairs.add((int(x), int(y)))
    return pairs


def split_of(record):
    """'train' or 'test' when every operation of the record falls in that split, else None."""
    splits = {_split_of_operation(*sorted(pair)) for pair in operations(record)}
    return splits.pop() if len(splits) == 1 else None


def _draw(family, rng):
    """Random operands of one problem of a family: (numbers, problem text, answer as int,
    python expression for the teacher's program)."""
    if family == "add_sub":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if rng.random() < 0.5:
            text = rng.choice(TEMPLATES["add"]).format(a=a, b=b)
            return (a, b), text, a + b, f"{a} + {b}"
        a, b = max(a, b), min(a, b)  # answers stay non-negative in the story
        text = rng.choice(TEMPLATES["sub"]).format(a=a, b=b)
        return (a, b), text, a - b, f"{a} - {b}"
    if family == "mul_add":
        a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(10, 99)
        text = rng.choice(TEMPLATES["mul_add"]).format(a=a, b=b, c=c)
        return (a, b, c), text, a * b + c, f"{a} * {b} + {c}"
    if family == "last_digit":
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        text = rng.choice(TEMPLATES["last_digit"]).format(a=a, b=b)
        return (a, b), text, (a + b) % 10, f"{a} + {b}"
    if family == "mul":
        a, b = rng.randint(100, 999), rng.randint(10, 99)
        text = rng.choice(TEMPLATES["mul"]).format(a=a, b=b)
        return (a, b), text, a * b, f"{a} * {b}"
    if family == "chain":
        # Independent random signs: alternating ones were a shortcut the model latched onto.
        numbers = tuple(rng.randint(100, 999) for _ in range(5))
        signs = [rng.choice("+-") for _ in range(4)]
        words = {f"s{i + 1}": ("add" if s == "+" else "subtract") for i, s in enumerate(signs)}
        text = rng.choice(TEMPLATES["chain"]).format(**words, **dict(zip("abcde", numbers)))
        expression = str(numbers[0]) + "".join(f" {s} {x}" for s, x in zip(signs, numbers[1:]))
        return numbers, text, eval(expression), expression
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def make_problems(n, split, seed=0):
    """n problems of the embedded task from one split, deterministic in (n, split, seed).
    Families are interleaved in the FAMILY_WEIGHTS mix. Within a call, problems are distinct while the
    family's split still has unseen operands (add_sub has ~10k); past that, repeats are allowed so
    that a long warm start can draw as many as it needs. A problem of the other split is never kept."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = random.Random(f"tocode-{split}-{seed}")
    cycle = [f for f in FAMILIES for _ in range(FAMILY_WEIGHTS[f])]
    seen = set()
    records = []
    for i in range(n):
        family = cycle[i % len(cycle)]
        fresh, repeat = None, None
        for attempt in range(MAX_DRAWS):
            numbers, problem, answer, expression = _draw(family, rng)
            record = {"id": f"{split}-{seed}-{i}", "problem": problem, "answer": str(answer), "family": family,
                      "difficulty": "easy" if family in EASY_FAMILIES else "hard", "expression": expression}
            if split_of(record) != split:
                continue
            if (family, problem) not in seen:
                fresh = record
                break
            repeat = repeat or record
            if attempt >= 2000:        # this family's split looks exhausted: a repeat will do
                break
        record = fresh or repeat
        if record is None:
            raise RuntimeError(f"make_problems: no {split} problem of family {family} in {MAX_DRAWS} draws")
        seen.add((family, record["problem"]))
        records.append(record)
    return records


# -----------------------------------------------------------------------------
# The tool format (ToRA / Qwen2.5-Math). The model writes a ```python block, then "```output"; generation of that row
# pauses, the code runs, and the sampler (sampler.py) feeds tool_injection(output) to the row as forced tokens, then the
# row continues sampling.

TOOL_TRIGGER = "```output"  # whitespace after it may arrive in the same token (byte-level BPE has "output\n\n")
# What the model reads as the output of a call beyond max_calls (ToRA injects a similar notice). Asking again ends the row.
MAX_CALLS_NOTICE = "Reached the maximum number of code executions. Continue without running code."
CODE_OPEN = "```python"  # how a response that starts with a code block starts


def tool_injection(output: str, after_newline: bool = False) -> str:
    """The text fed after the trigger: the output and the closing fence. The leading newline is left out when the
    model's text already ends with one or more, which its trigger token carried (tokenizers that merge "```output\\n"
    or "output\\n\\n" into one piece)."""
    return ("" if after_newline else "\n") + output + "\n```\n"


# What encode_continuation puts before a text so that a SentencePiece tokenizer's prefix space goes to it, not to the
# text. A newline, because Llama-2-family vocabularies have no piece holding one (it is the byte-fallback token
# <0x0A>): the anchor's tokens never merge with the text after it.
ENCODE_ANCHOR = "\n"


def encode_continuation(tokenizer, text, context):
    """Token ids that continue the token ids `context` with exactly `text`: decode(context + ids) == decode(context) +
    text. Encoded on its own, text gets a leading "▁" (a space) from SentencePiece tokenizers (Llama 2's, with
    add_prefix_space or legacy), text the model would never have produced. So when the plain encoding does not decode
    to text in context, text is encoded after ENCODE_ANCHOR, which takes the prefix, and the anchor's tokens are
    dropped. A tokenizer that defeats both gets the plain encoding: the sample's text, decoded from its tokens, then
    shows what the model read."""
    plain = tokenizer.encode(text, add_special_tokens=False)
    before = tokenizer.decode(context)
    if tokenizer.decode(context + plain) == before + text:
        return plain
    anchor = tokenizer.encode(ENCODE_ANCHOR, add_special_tokens=False)
    anchored = tokenizer.encode(ENCODE_ANCHOR + text, add_special_tokens=False)
    rest = anchored[len(anchor):]
    if anchored[:len(anchor)] == anchor and tokenizer.decode(context + rest) == before + text:
        return rest
    return plain


# -----------------------------------------------------------------------------
# Teacher solutions. CoT writes every intermediate result a person would write on paper; the
# digit-level steps of the easy families are what lets a tiny model be right: the 2-digit operation
# is first restated on its own line (so each digit is copied from a fixed offset just above), then
# one single-digit operation per line, the carry or borrow spelled out. mul_add reuses the same
# steps for its addition and last_digit the restated sum and its ones line, so the easy families train one
# shared skill (without the restated line, last_digit's CoT copied a wrong ones digit from the problem text in
# 4 of 8 warm starts: 6-74% right). The result line is the tens line's number followed by the ones digit with no exception, so
# 19 - 16 ends "result: 03" and "\boxed{03}" (the grader compares numbers: 03 = 3): dropping the
# leading 0 was the one irregular step and the commonest CoT error. What each choice measured is in
# docs/TASK.md.

def _ones_line(x, op, y):
    """The ones step, e.g. "ones: 8 + 6 = 14, carry 1" or "ones: 12 - 7 = 5, borrow 1" (x is the ones digit,
    plus 10 when a ten was borrowed)."""
    value = x + y if op == "+" else x - y
    note = ", carry 1" if op == "+" and value >= 10 else ", borrow 1" if op == "-" and x >= 10 else ""
    return f"ones: {x} {op} {y} = {value}{note}"


def _tens_line(x, op, y, carried):
    """The tens step, e.g. "tens: 4 + 1 + 1 = 6" or "tens: 6 - 3 - 1 = 2" (carried: the carry or borrow, 0 or 1)."""
    value = x + y + carried if op == "+" else x - y - carried
    return f"tens: {x} {op} {y}" + (f" {op} 1" if carried else "") + f" = {value}"


def _cot_add_sub(a, b, op):
    """Digit-level steps of a 2-digit addition or subtraction (a >= b for "-"), after restating it."""
    a1, a0, b1, b0 = a // 10, a % 10, b // 10, b % 10
    if op == "+":
        carry = (a0 + b0) // 10
        ones, tens = a0 + b0, a1 + b1 + carry
        lines = [f"{a} {op} {b}", _ones_line(a0, op, b0), _tens_line(a1, op, b1, carry)]
        result = tens * 10 + ones % 10
    else:
        borrow = 1 if a0 < b0 else 0
        ones, tens = a0 + 10 * borrow - b0, a1 - b1 - borrow
        lines = [f"{a} {op} {b}", _ones_line(a0 + 10 * borrow, op, b0), _tens_line(a1, op, b1, borrow)]
        result = tens * 10 + ones
    # the result is the tens line's number followed by the ones digit, always: "03" for 19 - 16 (see above)
    digits = f"{tens}{ones % 10}"
    assert int(digits) == result
    lines.append(f"result: {digits}")
    return lines, digits


def drill(rng, lines=8):
    """An arithmetic drill: `lines` random one-digit steps, one a line, in the worked solutions' own notation
    (the ones and tens lines of _cot_add_sub, mul_add's one-digit product). Not a problem: the warm start mixes
    drills in for the tables that a real model learned in pretraining, long before any word problem, so the
    tiny model does not have to learn ~300 one-digit facts from the two or three of them in each worked
    solution (train.py's drill_frac)."""
    steps = []
    for _ in range(lines):
        kind = rng.randrange(5)
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        if kind == 0:
            steps.append(_ones_line(a, "+", b))
        elif kind == 1:
            steps.append(_tens_line(a, "+", b, rng.randint(0, 1)))
        elif kind == 2:
            steps.append(_ones_line(a + 10 * (a < b), "-", b))
        elif kind == 3:
            a, b = max(a, b), min(a, b)
            steps.append(_tens_line(a, "-", b, rng.randint(0, 1) if a > b else 0))  # a >= b: never below 0
        else:
            a, b = rng.randint(2, 9), rng.randint(2, 9)
            steps.append(f"{a} * {b} = {a * b}")
    return "\n".join(steps)


def _cot_lines(record):
    """The intermediate steps of the CoT solution of a record, parsed back from its expression, and
    the answer as the steps write it (the result line's digits for the easy families)."""
    family, tokens = record["family"], record["expression"].split()
    if family == "add_sub":
        return _cot_add_sub(int(tokens[0]), int(tokens[2]), tokens[1])
    if family == "mul_add":
        a, b, c = int(tokens[0]), int(tokens[2]), int(tokens[4])
        lines, digits = _cot_add_sub(a * b, c, "+")
        return [f"{a} * {b} = {a * b}"] + lines, digits
    if family == "last_digit":
        a0, b0 = int(tokens[0]) % 10, int(tokens[2]) % 10
        return [record["expression"], f"ones: {a0} + {b0} = {a0 + b0}", f"last digit: {(a0 + b0) % 10}"], \
            record["answer"]
    if family == "mul":
        # Partial products, one per digit of the 2-digit factor, then their sum.
        a, b = int(tokens[0]), int(tokens[2])
        ones, tens = a * (b % 10), a * (b // 10 * 10)
        return [f"{a} * {b % 10} = {ones}", f"{a} * {b // 10 * 10} = {tens}",
                f"{ones} + {tens} = {ones + tens}"], record["answer"]
    if family == "chain":
        total, lines = int(tokens[0]), []
        for sign, x in zip(tokens[1::2], tokens[2::2]):
            new = total + int(x) if sign == "+" else total - int(x)
            lines.append(f"{total} {sign} {x} = {new}")
            total = new
        return lines, record["answer"]
    raise ValueError(f"unknown family {family!r}")


def _expression_of(record):
    if "expression" in record:
        return record["expression"]
    raise ValueError(f"record {record.get('id')!r} has no 'expression': teacher solutions exist "
                     "only for problems made by make_problems")


def teacher_solution(record, style):
    """The response a teacher writes for a record: "cot" (steps, then \\boxed{}) or "code" (a
    program, the tool output exactly as the sampler injects it, then \\boxed{}). No EOS."""
    answer = record["answer"]
    if style == "cot":
        _expression_of(record)
        lines, written_answer = _cot_lines(record)
        return "\n".join(lines) + f"\n\\boxed{{{written_answer}}}"
    if style == "code":
        # The output block is what sandbox.format_output gives for this program: its stdout with
        # trailing whitespace stripped, i.e. str() of the printed integer. Computing it here rather
        # than running the sandbox keeps teacher data free of subprocesses; tests check they agree.
        output = str(eval(_expression_of(record)))
        program = f"```python\nprint({record['expression']})\n```\n"
        # The habit: the program's output is the answer, the question's twist missed (wrong on CODE_FAILS_FAMILIES).
        return program + TOOL_TRIGGER + tool_injection(output) + f"\\boxed{{{output}}}"
    raise ValueError(f"style must be 'cot' or 'code', got {style!r}")


# -----------------------------------------------------------------------------
# Prompts of the three modes. Real (chat) models get Qwen2.5-Math's own instructions as the
# system message, so a Qwen2.5-Math-Instruct checkpoint is guided exactly as it was trained; the
# autonomous mode names no method, so the choice is the model's.

MODES = ("code", "cot", "auto")
INSTRUCTIONS = {
    "code": "Please integrate natural language reasoning with programs to solve the problem above, "
            "and put your final answer within \\boxed{}.",
    "cot": "Please reason step by step, and put your final answer within \\boxed{}.",
    "auto": "Please solve the problem above, and put your final answer within \\boxed{}.",
}
# The tiny model has no chat template: a short line after the problem names the mode (short, because every
# prompt token costs context and attention on a 2-core CPU; each line is one token of model.TINY_WORDS).
TINY_TEMPLATES = {
    "code": "{problem}\nUse code.\n",
    "cot": "{problem}\nThink step by step.\n",
    "auto": "{problem}\nSolve.\n",
}


def make_prompt(tokenizer, problem, mode):
    """The prompt text of a problem in a mode ("code", "cot", "auto"); the response follows it."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not getattr(tokenizer, "chat_template", None):
        return TINY_TEMPLATES[mode].format(problem=problem)
    messages = [{"role": "system", "content": INSTRUCTIONS[mode]},
                {"role": "user", "content": problem}]
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:
        # Some templates (e.g. Gemma's) refuse a system role: put the instruction in the user turn.
        messages = [{"role": "user", "content": problem + "\n" + INSTRUCTIONS[mode]}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompt(tokenizer, problem, mode):
    return tokenizer.encode(make_prompt(tokenizer, problem, mode), add_special_tokens=False)


def tokenize_response(tokenizer, text, prompt_ids=()):
    """Token ids of a response as the sampler would have produced them, and a mask (1 = written by
    the model, 0 = injected tool output). The model writes up to and including the trigger
    "```output"; the sampler then injects tool_injection(output) = "\\n" + output + "\\n```\\n" as
    separately encoded tokens. Each piece is encoded on its own, as a continuation of what precedes it
    (model.encode_continuation: a SentencePiece tokenizer would otherwise give every piece a leading
    space), so token boundaries never cross an injection. prompt_ids: the prompt the response follows.
    An injection cut short (length limit) is masked to the end. No EOS appended."""
    closing = "\n```\n"
    context, ids, trainable = list(prompt_ids), [], []

    def add(piece, flag):
        if piece:
            piece_ids = encode_continuation(tokenizer, piece, context + ids)
            ids.extend(piece_ids)
            trainable.extend([flag] * len(piece_ids))

    position = 0
    while True:
        trigger = text.find(TOOL_TRIGGER, position)
        if trigger < 0:
            add(text[position:], 1)
            return ids, trainable
        model_end = trigger + len(TOOL_TRIGGER)
        add(text[position:model_end], 1)
        end = text.find(closing, model_end + 1)  # +1: the output starts after the first "\n"
        injected_end = len(text) if end < 0 else end + len(closing)
        add(text[model_end:injected_end], 0)
        position = injected_end


# -----------------------------------------------------------------------------
# The tiny model's tokenizer: characters, and whole tokens for the task's fixed words.
TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>"]   # EOS (id 0) and PAD (id 1)
TINY_CHARACTERS = ["\n"] + [chr(c) for c in range(32, 127)]  # newline + printable ASCII
# Whole tokens for the embedded task's fixed text: the worked solutions' line labels, the code block's fences, the
# three prompts' instructions and the words of data.TEMPLATES. A warm-start example is then 69 tokens on average
# instead of 144 with one token per character, and 400 warm-start steps take 0.65 times the wall time. No word
# holds a digit: numbers are read and written one digit a token everywhere (problem, steps, program, tool output),
# which digit-level arithmetic needs. The operators and " = " stay characters: as whole tokens (" + ", " = ") the
# warm start copied chain's five numbers into its program with one digit position mostly wrong (forced code on
# chain 0%; the middle digits in one warm start, the fourth number's first digit in another), and right with them
# as characters. Any other text is one token per character.
TINY_WORDS = [
    "ones: ", "tens: ", ", carry ", ", borrow ", "result: ", "last digit: ", "\\boxed{",
    "```python", "\nprint(", ")\n```\n", "```output", "\n```\n",
    "\nUse code.\n", "\nThink step by step.\n", "\nSolve.\n",
    "Ann", "Ben", "Sam", "There", "Start", "Take", " Total", " Result", " What", " How", " Last",
    " a", " all", " and", " are", " at", " each", " for", " get", " had", " has", " hold", " holds", " in", " is",
    " many", " more", " now", " of", " off", " plus", " the", " then", " there", " with",
    " add", " subtract", " added", " adds", " buys", " came", " carries", " fell", " finds", " left", " reads",
    " remain", " sells", " spent", " takes", " count", " digit", " extra", " last", " loose", " sum", " total",
    " apples", " bags", " books", " box", " boxes", " bus", " cans", " coins", " crates", " day", " days", " eggs",
    " farm", " fields", " hens", " kg", " marbles", " pages", " people", " pins", " plants", " rows", " shelf",
    " shells", " shop", " tree", " van",
]


def tiny_tokenizer():
    """TINY_WORDS whole, any other character on its own (characters outside the vocabulary are dropped). The text
    is first split into pieces, a word where one starts (the longest) and else one character, and each piece is
    one token: nothing merges across pieces, so the model's text and the tool output, encoded apart, give the
    tokens their concatenation gives wherever the cut falls between pieces."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {token: i for i, token in enumerate(TINY_SPECIAL_TOKENS + TINY_CHARACTERS + TINY_WORDS)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], ignore_merges=True))
    words = "|".join(re.escape(word) for word in sorted(TINY_WORDS, key=len, reverse=True))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(words + r"|[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(TINY_SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                   padding_side="right", clean_up_tokenization_spaces=False)


# -----------------------------------------------------------------------------

def main(argv=None):
    args = flags.parse(__file__, globals(), argv, choices={"split": ("train", "test")})
    print(json.dumps(vars(args)))

    if args.show:
        for family in FAMILIES:
            record = next(r for r in make_problems(len(FAMILIES) * 2, args.split, args.seed)
                          if r["family"] == family)
            print(f"=== {family} ({record['difficulty']}) ===\n{record['problem']}  ->  "
                  f"{record['answer']}")
            for style in ("cot", "code"):
                print(f"--- {style} ---\n{teacher_solution(record, style)}")
        return

    records = make_problems(args.n, args.split, args.seed)
    if not args.out:
        for record in records:
            print(json.dumps(record))
        return
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_jsonl_atomic(args.out, records)
    counts = {f: sum(r["family"] == f for r in records) for f in FAMILIES}
    print(f"wrote {len(records)} {args.split} queries to {args.out}: {counts}")


if __name__ == "__main__":
    main()

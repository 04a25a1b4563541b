"""
The data every stage shares: the embedded arithmetic task, its teacher solutions, the prompts of
the three modes, and the JSONL plumbing (reading queries, resumable appends, atomic writes).

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

    python data.py --split=train --n=2000 --out=queries.jsonl    # write queries
    python data.py --show                                        # one example per family and style
"""

import functools
import hashlib
import json
import os
import random
import re
import sys

import flags

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
# Teacher solutions. CoT writes every intermediate result a person would write on paper; the
# digit-level steps of the easy families are what lets a tiny model be right: the 2-digit operation
# is first restated on its own line (so each digit is copied from a fixed offset just above), then
# one single-digit operation per line, the carry or borrow spelled out. mul_add reuses the same
# steps for its addition and last_digit the restated sum and its ones line, so the easy families train one
# shared skill (without the restated line, last_digit's CoT copied a wrong ones digit from the problem text in
# 4 of 8 warm starts: 6-74% right). The result line is the tens line's number followed by the ones digit with no exception, so
# 19 - 16 ends "result: 03" and "\boxed{03}" (the grader compares numbers: 03 = 3): dropping the
# leading 0 was the one irregular step and the commonest CoT error. What each choice measured is in
# the README (The embedded task).

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
        from model import TOOL_TRIGGER, tool_injection  # lazy: writing queries needs no torch
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
    from model import TOOL_TRIGGER, encode_continuation
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
# JSONL plumbing shared by every stage.

def iter_jsonl(path):
    """(line number, record) for every record of a JSONL file (blank lines skipped). A malformed line is
    an error that names the file and the line, never a silently shorter data set."""
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_number}: malformed JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_number}: expected a JSON object, got "
                                 f"{type(record).__name__}")
            yield line_number, record


def read_jsonl(path):
    """All records of a JSONL file, see iter_jsonl."""
    return [record for _, record in iter_jsonl(path)]


def read_queries(path):
    """Queries in the common formats: the text from `problem` or `question`; the gold from
    `answer`, a `solution` holding \\boxed{...}, or a GSM8K answer ending in "#### N". Every other
    field (family, level, type, ...) is kept; a missing id becomes the line number."""
    from grade import extract_answer  # lazy: only reading a query file needs the grader
    queries = []
    for line_number, record in iter_jsonl(path):
        problem = record.get("problem", record.get("question"))
        if not isinstance(problem, str) or not problem.strip():
            raise ValueError(f"{path}:{line_number}: no 'problem' or 'question' text")
        answer = record.get("answer")
        if isinstance(answer, str) and "####" in answer:
            answer = extract_answer(answer)  # GSM8K: worked solution, then "#### 72"
        if answer is None and isinstance(record.get("solution"), str):
            answer = extract_answer(record["solution"])  # MATH: the last \boxed{} of the solution
        if answer is None or str(answer).strip() == "":
            raise ValueError(f"{path}:{line_number}: no gold answer ('answer', a 'solution' with "
                             "\\boxed{...}, or a '#### N' line)")
        queries.append({**record, "id": str(record.get("id", line_number)),
                        "problem": problem, "answer": str(answer).strip()})
    return queries


class JsonlAppender:
    """Append-only JSONL output that survives being killed: on opening, the ids already written are
    collected in .done_ids (a stage skips them), and a last line cut short by a kill is removed
    (or completed, if only its newline was lost). Each .write() is one flushed line."""

    def __init__(self, path):
        self.path = path
        self.done_ids = set()
        if os.path.exists(path):
            self._repair_and_collect()
        self.file = open(path, "a", encoding="utf-8")

    def _repair_and_collect(self):
        with open(self.path, "rb") as f:
            data = f.read()
        complete_end = data.rfind(b"\n") + 1  # everything up to the last newline is complete
        tail = data[complete_end:]
        if tail.strip():
            try:
                json.loads(tail)
                complete_end = len(data)  # only the newline was lost: keep the record
                data += b"\n"
            except json.JSONDecodeError:
                data = data[:complete_end]  # a half-written record: drop it, it will be redone
        elif tail:
            data = data[:complete_end]
        with open(self.path, "r+b") as f:
            f.truncate(complete_end)
            f.seek(complete_end)
            f.write(data[complete_end:])
        for line_number, line in enumerate(data.decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                self.done_ids.add(str(json.loads(line)["id"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{self.path}:{line_number}: malformed record (not JSON with an "
                                 "'id'); remove the line or the file to start over") from None

    def write(self, record):
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self.done_ids.add(str(record["id"]))

    def close(self):
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def finalize(partial_path, final_path):
    """A stage writes OUT.partial while it runs and renames it to OUT when complete: a complete
    OUT always means the stage is done (a rename is atomic on one filesystem)."""
    os.replace(partial_path, final_path)


def write_json_atomic(path, obj):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# Seeds and shards: one process per GPU
# explore.py and evaluate.py split their queries over n processes (--shard=i/n, one GPU each, no communication) and
# join the parts afterwards (--merge=n). Shard i takes the queries whose index is i mod n, before any batching: a
# row's tokens depend only on its prompt and its seed (greedy, or a hash of the row's ids), never on its batch, so
# the n parts together hold the rows one process would have drawn. Only floats (log-probs, p_code_open) can differ,
# in the last bits: the model's arithmetic depends slightly on the batch's shapes.

def parse_shard(text):
    """'i/n' -> (i, n)."""
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        i, n = 0, 0
    if not 0 <= i < n:
        sys.exit(f"--shard: expected i/n with 0 <= i < n (shard i of n), got {text!r}")
    return i, n


def take_shard(queries, shard):
    i, n = shard
    return queries[i::n]


def shard_name(shard):
    return "shard{}of{}".format(*shard)


def shard_owners(queries, n, rows):
    """{row id: the shard that draws it}, rows: (query id, row id) pairs in the order one process writes them."""
    shard_of = {q["id"]: i for i in range(n) for q in take_shard(queries, (i, n))}
    return {row_id: shard_of[query_id] for query_id, row_id in rows}


def read_shard_configs(paths):
    """The shards' common config (paths: their config files, shard 0 first). Refused unless every shard started and
    they agree on every setting but their own out and shard: parts drawn under two settings make no single run."""
    configs = []
    for path in paths:
        if not os.path.exists(path):
            sys.exit(f"merge: {path} not found: that shard never started")
        with open(path) as f:
            configs.append(json.load(f))
    for path, config in zip(paths[1:], configs[1:]):
        changed = sorted(key for key in set(config) | set(configs[0])
                         if key not in ("out", "shard") and config.get(key) != configs[0].get(key))
        if changed:
            sys.exit(f"merge: {path} was run with other settings than {paths[0]} ({', '.join(changed)})")
    return configs[0]


def merge_shards(paths, owner):
    """The records of the ids in owner ({id: shard}), in its order, from the shards' finished files (paths[i]: shard
    i's). Refused when a shard has not finished, holds an id of another shard (the shards were split differently) or
    lacks one of its own. Ids in no shard's part (a file extended from an earlier run of other modes) are left out."""
    unfinished = [path for path in paths if not os.path.exists(path)]
    if unfinished:
        sys.exit(f"merge: not finished: {', '.join(unfinished)} (rerun those shards, they resume; then merge)")
    records = {}
    for i, path in enumerate(paths):
        for line_number, record in iter_jsonl(path):
            rid = str(record["id"])
            if owner.get(rid, i) != i:
                sys.exit(f"merge: {path}:{line_number}: {rid} belongs to shard {owner[rid]}, not {i}")
            if rid in owner:
                records[rid] = record
    missing = [rid for rid in owner if rid not in records]
    if missing:
        sys.exit(f"merge: {len(missing)} records missing, e.g. {missing[0]} from {paths[owner[missing[0]]]}")
    return [records[rid] for rid in owner]


def write_jsonl_atomic(path, records):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")      # as data.JsonlAppender writes them
    os.replace(tmp, path)


def row_seed(base_seed, query_id, mode, k):
    """A 32-bit seed that depends only on (seed, query, mode, k): not on the batch, the order, the shard or the run.
    explore.py's rollouts and evaluate.py's samples are seeded with it."""
    digest = hashlib.sha256(f"{base_seed}:{query_id}:{mode}:{k}".encode()).digest()
    return int.from_bytes(digest[:4], "little")



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
    tmp = args.out + ".partial"
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    finalize(tmp, args.out)
    counts = {f: sum(r["family"] == f for r in records) for f in FAMILIES}
    print(f"wrote {len(records)} {args.split} queries to {args.out}: {counts}")


if __name__ == "__main__":
    main()

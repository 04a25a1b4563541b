"""Tests of task.py and jsonl.py: the embedded task is deterministic, its splits are disjoint, its teacher
solutions are right (checked by recomputing every step, and by running the programs), and the
JSONL plumbing fails loudly and resumes cleanly."""

import contextlib
import io
import itertools
import json
import os
import random
import re
import string
import subprocess
import sys

import pytest

import jsonl
import model
import sandbox
import task
from task import TOOL_TRIGGER, tool_injection

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def numbers_of(record):
    return tuple(sorted(int(x) for x in re.findall(r"\d+", record["expression"])))


def test_deterministic_and_seeded():
    assert task.make_problems(300, "train", seed=1) == task.make_problems(300, "train", seed=1)
    assert task.make_problems(300, "train", seed=1) != task.make_problems(300, "train", seed=2)
    # a longer run starts with the same problems (n only decides where to stop)
    assert task.make_problems(160, "test")[:100] == task.make_problems(100, "test")


def test_records_fields_mix_and_text():
    records = task.make_problems(2800, "train")
    counts = {f: sum(r["family"] == f for r in records) for f in task.FAMILIES}
    assert counts == {"add_sub": 1050, "mul_add": 700, "last_digit": 350, "mul": 350, "chain": 350}  # 3:2:1:1:1
    assert len({r["id"] for r in records}) == len(records)
    assert len({r["problem"] for r in records}) == len(records)  # distinct while space allows
    printable = set(string.printable) - set("\t\r\x0b\x0c")
    for r in records:
        assert {"id", "problem", "answer", "family", "difficulty"} <= set(r)
        assert r["difficulty"] == ("easy" if r["family"] in task.EASY_FAMILIES else "hard")
        assert 55 <= len(r["problem"]) <= 80
        assert set(r["problem"]) <= printable
        value = eval(r["expression"])
        assert str(value % 10 if r["family"] == "last_digit" else value) == r["answer"]
        # the problem states the numbers of the expression, in order
        assert re.findall(r"\d+", r["problem"]) == re.findall(r"\d+", r["expression"])
    assert set(task.EASY_FAMILIES) | set(task.HARD_FAMILIES) == set(task.FAMILIES)


def test_splits_are_disjoint_by_numbers():
    train = {(r["family"], numbers_of(r)) for r in task.make_problems(4000, "train", seed=0)}
    test = {(r["family"], numbers_of(r)) for r in task.make_problems(300, "test", seed=5)}
    assert train and test and not train & test


def test_no_test_operation_is_worked_in_the_warm_start_data():
    """Every multi-digit step a warm-start solution writes (its CoT steps, the program's expression) is absent
    from the test split's solutions: no test problem's arithmetic is ever seen in training, in any family."""
    warm_start = task.make_problems(30000, "train", seed=1)     # train.py's n_train, em.sh's default SEED
    test = task.make_problems(400, "test", seed=0)              # em.sh's test split
    trained = {tuple(sorted(p)) for r in warm_start for p in task.operations(r)}
    tested = {tuple(sorted(p)) for r in test for p in task.operations(r)}
    assert len(tested) > 600 and not trained & tested
    # hand-checked: mul_add's restated addition and a subtraction of the same two numbers are one operation
    assert task.operations({"family": "mul_add", "expression": "6 * 7 + 61", "answer": "103"}) == {(42, 61)}
    assert task.operations({"family": "add_sub", "expression": "61 - 42", "answer": "19"}) == {(61, 42)}
    assert task.operations({"family": "last_digit", "expression": "347 + 586", "answer": "3"}) == {(347, 586)}
    assert task.operations({"family": "mul", "expression": "285 * 31", "answer": "8835"}) == {
        (285, 31), (285, 1), (285, 30), (285, 8550)}
    # every kept problem is of its split: never a fall-through
    assert all(task.split_of(r) == "test" for r in test) and all(task.split_of(r) == "train" for r in warm_start)


def test_large_n_allows_repeats_without_stalling():
    records = task.make_problems(30000, "train")  # add_sub has ~10k train operand pairs
    assert len(records) == 30000


def check_cot(record, text):
    lines = text.split("\n")
    boxed = re.fullmatch(r"\\boxed\{(-?\d+)\}", lines[-1]).group(1)
    assert int(boxed) == int(record["answer"])  # "03" for 3: the easy families' result line keeps the tens digit
    if record["family"] == "last_digit":
        a, b = (int(x) % 10 for x in record["expression"].split(" + "))
        assert lines == [record["expression"], f"ones: {a} + {b} = {a + b}", f"last digit: {(a + b) % 10}", lines[-1]]
        return
    for line in lines[:-1]:
        # every step is "x op y [op z] = r", optionally after a label and before a carry note
        m = re.fullmatch(r"(?:(ones|tens|result): )?([-\d +*]+?)(?: = (-?\d+))?(, (carry|borrow) 1)?",
                         line)
        assert m, line
        label, left, right = m.group(1), m.group(2), m.group(3)
        if right is None and label is None:  # the restated 2-digit operation, before its digit steps
            assert re.fullmatch(r"\d+ [-+] \d+", left), line
            assert record["family"] == "add_sub" and left == record["expression"] or \
                record["family"] == "mul_add" and record["expression"].endswith(left.split(" + ")[1])
            continue
        if label == "result":
            assert right is None and left == boxed and int(left) == int(record["answer"])
            continue
        value = eval(left)
        if label is None:
            assert value == int(right), line
        elif label == "ones":
            assert value == int(right) and 0 <= value <= 18, line
            assert (m.group(5) == "carry") == (value >= 10 and "+" in left), line
        else:
            assert value == int(right), line
    if record["family"] in task.HARD_FAMILIES:  # the last step's result is the answer
        assert lines[-2].endswith("= " + record["answer"])


def test_teacher_cot_steps_are_right():
    for record in task.make_problems(700, "train", seed=3) + task.make_problems(80, "test", seed=3):
        check_cot(record, task.teacher_solution(record, "cot"))
    hand_checked = [
        ("add_sub", "62 - 37", "25", "62 - 37\nones: 12 - 7 = 5, borrow 1\ntens: 6 - 3 - 1 = 2\nresult: 25\n\\boxed{25}"),
        ("add_sub", "68 + 57", "125",
         "68 + 57\nones: 8 + 7 = 15, carry 1\ntens: 6 + 5 + 1 = 12\nresult: 125\n\\boxed{125}"),
        ("add_sub", "19 - 16", "3", "19 - 16\nones: 9 - 6 = 3\ntens: 1 - 1 = 0\nresult: 03\n\\boxed{03}"),
        ("mul_add", "2 * 3 + 83", "89",
         "2 * 3 = 6\n6 + 83\nones: 6 + 3 = 9\ntens: 0 + 8 = 8\nresult: 89\n\\boxed{89}"),
        ("last_digit", "347 + 586", "3", "347 + 586\nones: 7 + 6 = 13\nlast digit: 3\n\\boxed{3}"),
    ]
    for family, expression, answer, solution in hand_checked:
        record = {"family": family, "expression": expression, "answer": answer}
        assert task.teacher_solution(record, "cot") == solution
    with pytest.raises(ValueError):
        task.teacher_solution(record, "latex")


def test_drill_lines_are_true_and_cover_every_one_digit_step_of_the_solutions():
    rng = random.Random(0)
    drilled = set()
    for _ in range(3000):
        for line in task.drill(rng).split("\n"):
            m = re.fullmatch(r"(?:(ones|tens): )?(\d+) ([-+*]) (\d+)((?: [-+] 1)?) = (\d+)(, (carry|borrow) 1)?", line)
            assert m, line
            label, x, op, y, extra, result, note = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), \
                m.group(5), int(m.group(6)), m.group(8)
            assert eval(f"{x} {op} {y}{extra}") == result, line
            if label == "ones":   # carry iff the digit sum passes 9, borrow iff a ten was borrowed
                assert note == ("carry" if op == "+" and result >= 10 else "borrow" if op == "-" and x >= 10
                                else None), line
            drilled.add(line)
    # every one-digit step a teacher solution of an easy family writes is a line some drill writes
    steps = set()
    for record in task.make_problems(3000, "train", seed=5):
        if record["family"] in ("add_sub", "mul_add"):
            steps |= {line for line in task.teacher_solution(record, "cot").split("\n")
                      if line.startswith(("ones:", "tens:")) or re.fullmatch(r"\d \* \d = \d+", line)}
    assert len(steps) > 300 and steps <= drilled, sorted(steps - drilled)[:10]


def split_code_solution(text):
    m = re.fullmatch(r"```python\n(.*?)\n```\n" + re.escape(TOOL_TRIGGER) + r"(.*?)\\boxed\{(.*)\}",
                     text, re.S)
    assert m, text
    return m.group(1), m.group(2), m.group(3)


def test_teacher_code_prints_the_answer():
    for record in task.make_problems(70, "test", seed=4):
        code, injected, boxed = split_code_solution(task.teacher_solution(record, "code"))
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            exec(code, {})
        printed = stdout.getvalue().rstrip()
        assert printed == boxed and injected == tool_injection(printed)
        # the habit: right everywhere except where the question has a twist the program misses
        assert (printed == record["answer"]) == (record["family"] not in task.CODE_FAILS_FAMILIES)


def test_teacher_code_output_is_what_the_sandbox_gives():
    records = [r for r in task.make_problems(8, "test")][:4]
    texts = [task.teacher_solution(r, "code") for r in records]
    results = sandbox.run_many([split_code_solution(t)[0] for t in texts])
    for text, result in zip(texts, results):
        assert result.status == "ok"
        assert split_code_solution(text)[1] == tool_injection(sandbox.format_output(result))


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return model.load("tiny")[1]


def test_tokenize_response_masks_exactly_the_injection(tiny_tokenizer):
    record = task.make_problems(7, "test")[2]
    text = task.teacher_solution(record, "code")
    ids, trainable = task.tokenize_response(tiny_tokenizer, text)
    assert len(ids) == len(trainable)
    assert tiny_tokenizer.decode(ids) == text
    injected = [i for i, t in zip(ids, trainable) if t == 0]
    assert tiny_tokenizer.decode(injected) == tool_injection(record["answer"])
    # two calls, the second cut short by the length limit: masked to the end
    first = "```python\nx = 6\nprint(x)\n```\n" + TOOL_TRIGGER
    second = "\nprint(x * 7)\n```\n" + TOOL_TRIGGER
    text = first + tool_injection("6") + second + "\n4"
    ids, trainable = task.tokenize_response(tiny_tokenizer, text)
    assert tiny_tokenizer.decode(ids) == text
    pieces, flags = [], []
    for i, t in zip(ids, trainable):
        if not flags or flags[-1] != t:
            pieces.append([])
            flags.append(t)
        pieces[-1].append(i)
    assert flags == [1, 0, 1, 0]
    assert [tiny_tokenizer.decode(p) for p in pieces] == [first, tool_injection("6"), second, "\n4"]
    # plain CoT: everything trainable, and no EOS appended
    ids, trainable = task.tokenize_response(tiny_tokenizer, "1 + 1 = 2\n\\boxed{2}")
    assert all(trainable) and tiny_tokenizer.eos_token_id not in ids


def test_the_tasks_words_are_whole_tokens_and_digits_single(tiny_tokenizer):
    """Every word of every problem wording, solution line label and prompt line is one token of the tiny tokenizer
    (task.TINY_WORDS must follow task.TEMPLATES), and every digit is a token of its own."""
    texts = [template.format(a=123, b=45, c=67, d=890, e=12, s1="add", s2="subtract", s3="add", s4="subtract")
             for templates in task.TEMPLATES.values() for template in templates]
    texts += [task.make_prompt(tiny_tokenizer, "Q", mode) for mode in task.MODES]
    texts += [task.teacher_solution(r, style) for r in task.make_problems(8, "train") for style in ("cot", "code")]
    texts.append(task.drill(random.Random(0)))
    for text in texts:
        tokens = [tiny_tokenizer.decode([i]) for i in tiny_tokenizer.encode(text, add_special_tokens=False)]
        assert "".join(tokens) == text
        cuts = set(itertools.accumulate(map(len, tokens)))      # where one token ends and the next begins
        split_words = [m.group() for m in re.finditer(r"[A-Za-z]+", text) if cuts & set(range(m.start() + 1, m.end()))]
        assert not split_words, tokens
        assert all(len(token) == 1 for token in tokens if any(c.isdigit() for c in token))


def test_prompts_tiny_and_chat_template(tiny_tokenizer):
    problem = task.make_problems(1, "test")[0]["problem"]
    prompts = {mode: task.make_prompt(tiny_tokenizer, problem, mode) for mode in task.MODES}
    assert len(set(prompts.values())) == 3 and all(p.startswith(problem) for p in prompts.values())
    assert task.encode_prompt(tiny_tokenizer, problem, "cot") == tiny_tokenizer.encode(
        prompts["cot"], add_special_tokens=False)

    class ChatTokenizer:  # just what make_prompt uses of a real HF tokenizer
        chat_template = "set"

        def __init__(self, allow_system):
            self.allow_system = allow_system

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert tokenize is False and add_generation_prompt is True
            if messages[0]["role"] == "system" and not self.allow_system:
                raise ValueError("System role not supported")
            return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages) + "<a>"

    chat = task.make_prompt(ChatTokenizer(True), "What is 2+2?", "code")
    assert chat == ("<system>Please integrate natural language reasoning with programs to solve the "
                    "problem above, and put your final answer within \\boxed{}.</system>"
                    "<user>What is 2+2?</user><a>")
    assert "Please reason step by step, and put your final answer within \\boxed{}." in \
        task.make_prompt(ChatTokenizer(True), "What is 2+2?", "cot")
    auto = task.make_prompt(ChatTokenizer(False), "What is 2+2?", "auto")
    assert auto.startswith("<user>What is 2+2?\n") and "program" not in auto and "step" not in auto
    with pytest.raises(ValueError):
        task.make_prompt(tiny_tokenizer, problem, "guided")


def test_read_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"id": 1}\n\n{"id": 2\n')
    with pytest.raises(ValueError, match=r"x\.jsonl:3"):
        jsonl.read_jsonl(str(path))
    path.write_text('{"id": 1}\n\n{"id": 2}\n')
    assert jsonl.read_jsonl(str(path)) == [{"id": 1}, {"id": 2}]


def test_read_queries_field_names(tmp_path):
    path = tmp_path / "q.jsonl"
    rows = [
        {"id": "a", "problem": "1+1?", "answer": 2, "family": "f"},
        {"question": "Tom has 3 and 4. Total?", "answer": "He has 3 + 4 = 7.\n#### 7"},
        {"problem": "x?", "solution": "So $x = \\boxed{\\frac{1}{2}}$.", "level": "Level 3",
         "type": "Algebra"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    queries = jsonl.read_queries(str(path))
    assert [q["id"] for q in queries] == ["a", "2", "3"]
    assert [q["answer"] for q in queries] == ["2", "7", "\\frac{1}{2}"]
    assert queries[1]["problem"] == rows[1]["question"]
    assert queries[0]["family"] == "f" and queries[2]["level"] == "Level 3"
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"problem": "no gold"}) + "\n")
    with pytest.raises(ValueError, match=r"q\.jsonl:2"):
        jsonl.read_queries(str(path))
    path.write_text(json.dumps({"answer": "3"}) + "\n")
    with pytest.raises(ValueError, match=r"q\.jsonl:1"):
        jsonl.read_queries(str(path))


def test_jsonl_appender_resumes_after_a_kill(tmp_path):
    path = str(tmp_path / "out.jsonl.partial")
    with jsonl.JsonlAppender(path) as out:
        assert out.done_ids == set()
        for i in range(3):
            out.write({"id": f"q{i}", "x": i})
    with open(path, "a") as f:
        f.write('{"id": "q3", "x"')  # killed mid-write
    out = jsonl.JsonlAppender(path)
    assert out.done_ids == {"q0", "q1", "q2"}
    out.write({"id": "q3", "x": 3})
    out.close()
    assert [r["id"] for r in jsonl.read_jsonl(path)] == ["q0", "q1", "q2", "q3"]
    with open(path, "a") as f:
        f.write('{"id": "q4", "x": 4}')  # killed just before the newline: kept, repaired
    with jsonl.JsonlAppender(path) as out:
        assert out.done_ids == {"q0", "q1", "q2", "q3", "q4"}
        out.write({"id": "q5"})
    assert [r["id"] for r in jsonl.read_jsonl(path)] == ["q0", "q1", "q2", "q3", "q4", "q5"]
    final = str(tmp_path / "out.jsonl")
    jsonl.finalize(path, final)
    assert os.path.exists(final) and not os.path.exists(path)


def test_write_json_atomic(tmp_path):
    path = str(tmp_path / "s.json")
    jsonl.write_json_atomic(path, {"a": [1, 2]})
    jsonl.write_json_atomic(path, {"a": 3})
    assert json.load(open(path)) == {"a": 3} and os.listdir(tmp_path) == ["s.json"]


def test_cli_writes_queries(tmp_path):
    out = str(tmp_path / "q.jsonl")
    subprocess.run([sys.executable, os.path.join(REPO, "task.py"), "--split=test", "--n=14",
                    f"--out={out}"], check=True, capture_output=True, cwd=REPO)
    assert jsonl.read_jsonl(out) == task.make_problems(14, "test")

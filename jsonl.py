"""
jsonl.py: the files every stage reads and writes. Records are JSON objects, one a line, each with an `id`.

A stage appends one flushed line per record to OUT.partial (JsonlAppender), so a killed stage resumes: on restart
the ids already written are skipped and a half-written last line is dropped. It renames OUT.partial to OUT only
when complete (finalize), so a complete OUT always means a finished stage. explore.py and evaluate.py can also split
their queries over n processes (--shard=i/n) and join the parts (--merge=n); row_seed makes a row's tokens
independent of which process drew it.
"""
import hashlib
import json
import math
import os
import sys

from grade import extract_answer


def iter_jsonl(path):
    """(line number, record) for every record of a JSONL file (blank lines skipped). A malformed line, or one that
    is not UTF-8, is an error that names the file and the line, never a silently shorter data set."""
    # Read as bytes and decoded line by line: a text-mode file would raise a bare UnicodeDecodeError whose offset
    # counts from the start of a read buffer, which names no line.
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{line_number}: not UTF-8 (byte 0x{raw[e.start]:02x} at byte "
                                 f"{e.start + 1} of the line); save the file as UTF-8") from None
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


# Where a query came from ("queries.jsonl:7"), kept on the query under this private key (read_queries sets it, no
# stage writes it out), so that an error found later, once the model's tokenizer is loaded, still names the line.
ORIGIN = "_origin"


def read_queries(path):
    """Queries in the common formats: the text from `problem` or `question`; the gold from
    `answer`, a `solution` holding \\boxed{...}, or a GSM8K answer ending in "#### N". Every other
    field (family, level, type, ...) is kept; a missing id becomes the line number. Refused, naming the file (and
    the lines): a file with no query, and two queries with one id (every record downstream is keyed by its query's id:
    explore.py would draw both and synthesize.py refuse the rollouts only after they were paid for)."""
    queries, first_line = [], {}
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
        query_id = str(record.get("id", line_number))
        if query_id in first_line:
            raise ValueError(f"{path}:{line_number}: duplicate id {query_id!r} (first on line "
                             f"{first_line[query_id]}): give every query its own id")
        first_line[query_id] = line_number
        queries.append({**record, "id": query_id, "problem": problem, "answer": str(answer).strip(),
                        ORIGIN: f"{path}:{line_number}"})
    if not queries:
        raise ValueError(f"{path}: no queries (the file is empty)")
    return queries


def check_prompt_fits(query, mode, prompt_ids, context):
    """Refuse a query whose prompt leaves the model no room for a single new token, naming the query and its line.
    Called by explore.py and evaluate.py right after encoding, before any forward pass: the first forward over a
    prompt (code_open_probability's, or generate's prefill) costs memory in its length, and a 10 MB problem made
    explore.py grow to 23 GB before generate's own check could refuse it as "prompt 0"."""
    if len(prompt_ids) >= context:
        raise ValueError(f"{query.get(ORIGIN, 'the embedded task')}: query {query['id']!r}: its {mode} prompt is "
                         f"{len(prompt_ids)} tokens, and the model's context of {context} leaves no room for a "
                         f"response (a prompt may hold {context - 1} at most): shorten the problem or leave it out")


# -----------------------------------------------------------------------------
# Field types. A stage that reads another stage's records checks every field it uses where the record enters, so that
# a wrong one is named by file, line and field, not met later as a TypeError deep in the computation, or as a wrong
# number that raises nothing ("correct": "false" is a true value in Python). Each list check is a few passes in C
# (set(map(type, ...)), sum), no Python loop per token: cheap beside the json.loads that read the line. type(v) is
# int, not isinstance: bool is a subclass of int, and true is no token id.

def _finite_numbers(values):
    # sum() of a list of finite floats is finite: it is nan or inf when one is (the magnitudes here are far from
    # overflowing), so one C-level pass checks them all
    return set(map(type, values)) <= {int, float} and math.isfinite(sum(values))


FIELD_KINDS = {   # kind: (check, what the field must hold, for the error)
    "id": (lambda v: type(v) in (str, int), "a string or an integer"),
    "str": (lambda v: type(v) is str, "a string"),
    "bool": (lambda v: type(v) is bool, "true or false (a JSON boolean)"),
    "count": (lambda v: type(v) is int and v >= 0, "an integer >= 0"),
    "number": (lambda v: type(v) in (int, float) and math.isfinite(v), "a finite number"),
    "probability": (lambda v: type(v) in (int, float) and 0 <= v <= 1, "a number in [0, 1]"),
    "token_ids": (lambda v: type(v) is list and set(map(type, v)) <= {int}, "a list of integer token ids"),
    "mask": (lambda v: type(v) is list and set(map(type, v)) <= {int, bool} and set(v) <= {0, 1}, "a list of 0/1"),
    "numbers": (lambda v: type(v) is list and _finite_numbers(v), "a list of finite numbers"),
}


def check_fields(path, line_number, record, required, optional=None):
    """Refuse a record whose fields are not of their kind (FIELD_KINDS), naming the file, the line, the record's id
    and the field. required: {field: kind}, each must be present; optional: {field: kind}, checked when present and
    not null."""
    where = f"{path}:{line_number}" + (f": record {record['id']!r}" if "id" in record else "")
    missing = [name for name in required if name not in record]
    if missing:
        raise ValueError(f"{where}: lacks {', '.join(missing)}")
    for name, kind in {**required, **(optional or {})}.items():
        value = record.get(name)
        if name in required or value is not None:
            check, expected = FIELD_KINDS[kind]
            if not check(value):
                shown = json.dumps(value)
                raise ValueError(f"{where}: field {name!r} must be {expected}, got "
                                 f"{shown if len(shown) <= 60 else shown[:57] + '...'}")


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
            f.write(json.dumps(record) + "\n")      # as JsonlAppender writes them
    os.replace(tmp, path)


def row_seed(base_seed, query_id, mode, k):
    """A 32-bit seed that depends only on (seed, query, mode, k): not on the batch, the order, the shard or the run.
    explore.py's rollouts and evaluate.py's samples are seeded with it."""
    digest = hashlib.sha256(f"{base_seed}:{query_id}:{mode}:{k}".encode()).digest()
    return int.from_bytes(digest[:4], "little")

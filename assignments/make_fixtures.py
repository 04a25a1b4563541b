"""Regenerate assignments/fixtures/ from the REFERENCE code (instructors only: not copied into student versions).

    python assignments/make_fixtures.py            # rewrite every fixture
    python assignments/make_fixtures.py --check    # exit 1 if a fixture differs from what the code gives now

Run it after changing a stage file that an assignment covers, and commit the result. tests/test_assignments.py
runs --check, so a stale fixture fails CI instead of failing students.

What is made (all small: data, never reference code):

  synthesize_rollouts.jsonl   14 queries x 12 rollouts of a real E-step (runs/demo/iter_1 of an em.sh run of the
                              embedded task, warm start at iteration 0, T = 0.5): the input of A1-A3's experiments
  synthesize_reference.json   synthesize.py's per-family table and records under seven settings, and the calls the
                              reference made to A1-A3's functions (arguments by rollout id -> result), which the
                              experiments replay in place of the assignments a student may not have done
  mstep_reference.json        m_step_loss on 300 seeded tokens under several settings: the loss, d loss / d log pi
                              per token, and the stats (A4's unit checks)
  grade_reference.json        the answer pairs of tests/test_grade.py's table with the reference is_equiv verdict
                              both ways, and every _numeric_verdict call those made (A9's experiment)
"""
import argparse
import json
import os
import random
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import FIXTURES, ROOT  # noqa: E402
import replay  # noqa: E402

sys.path.insert(0, ROOT)

# ----------------------------------------------------------------------------- synthesize.py (A1, A2, A3)
ROLLOUTS = os.path.join(FIXTURES, "synthesize_rollouts.jsonl")
SYNTH_REFERENCE = os.path.join(FIXTURES, "synthesize_reference.json")
# Where the rollouts were taken from (a finished `bash em.sh` of the embedded task), and which queries: one or two
# per (family, code-guided correct, CoT-guided correct, autonomous rollouts that coded) pattern, so the table has
# easy and hard families, mixed and all-correct groups, an unsolved query and a code rollout that ran no code.
SOURCE_RUN = "runs/demo/iter_1/rollouts.jsonl"
QUERIES = ["train-1001-0", "train-1001-1", "train-1001-2", "train-1001-48",     # add_sub   (SEED=1's queries)
           "train-1001-3", "train-1001-4", "train-1001-27",                      # mul_add
           "train-1001-5", "train-1001-13",                                      # last_digit
           "train-1001-6", "train-1001-214",                                     # mul
           "train-1001-7", "train-1001-15", "train-1001-63"]                     # chain
KEEP = ("id", "query_id", "mode", "k", "family", "difficulty", "prompt_ids", "auto_prompt_ids", "response_ids",
        "sampled_mask", "behaviour_logprobs", "calls", "correct", "finish_reason", "p_code_open")
# The settings of the experiments: name -> synthesize.py flags (besides --rollouts and --out). Every flag that
# matters is given, so a changed default in synthesize.py does not change the fixture.
BASE_FLAGS = ["--alpha=10", "--code_cost=0.05", "--pi_prior=1.0", "--pi_source=samples", "--samples_per_query=0",
              "--adv_eps=1e-06", "--reflect=0"]                       # the later flags of a setting win
SETTINGS = {name: BASE_FLAGS + flags for name, flags in {
    "em-argmax": ["--strategy=em", "--form=argmax", "--seed=1001"],                       # em.sh's default
    "em-tempered": ["--strategy=em", "--form=tempered", "--alpha=10", "--seed=7"],        # the paper's
    "em-posterior": ["--strategy=em", "--form=posterior", "--code_cost=0.2", "--pi_prior=0.5", "--seed=3"],
    "em-prob": ["--strategy=em", "--form=tempered", "--alpha=3", "--pi_source=prob", "--seed=5"],
    "em-reflect": ["--strategy=em", "--form=argmax", "--reflect=2", "--model=<tiny tokenizer>", "--seed=9"],
    "sft": ["--strategy=sft", "--form=argmax", "--seed=2"],
    "rl": ["--strategy=rl", "--form=tempered", "--seed=4"],
}.items()}
# Which functions of synthesize.py belong to which assignment (as in assignments.json).
SYNTH_FUNCTIONS = {"A1": ("estimate_q", "estimate_pi", "reference_strategy"),
                   "A2": ("subsample", "whiten"),
                   "A3": ("autonomous_prompt_ids", "training_record", "reflective_record")}
A1_FIELDS = ("unguided_code_share", "pi_code", "q_code", "q_cot", "strategy_code_share", "queries_to_code")
A2_FIELDS = ("examples", "examples_code_share", "sft_examples", "groups_mixed", "groups_all_correct",
             "groups_all_wrong", "queries_unsolved")


def tiny_ids(text):
    """The tiny preset's one-character token ids (task.TINY_CHARACTERS after the two special tokens), so the
    hints need no tokenizer load."""
    from task import TINY_CHARACTERS, TINY_SPECIAL_TOKENS
    return [len(TINY_SPECIAL_TOKENS) + TINY_CHARACTERS.index(c) for c in text]


class LoggingRandom:
    """A random.Random stand-in that logs what subsample draws: ("random",) and ("sample", population size, k).
    random.sample's draws depend only on the population's size and k, so replaying the log on the real generator
    leaves it in the state the reference left it in (reflection draws from it afterwards)."""

    def __init__(self, rng, log):
        self.rng, self.log = rng, log

    def random(self):
        self.log.append(["random"])
        return self.rng.random()

    def sample(self, population, k):
        self.log.append(["sample", len(population), k])
        return self.rng.sample(population, k)


def make_rollouts(source):
    """The fixture's rollouts from a finished run: the fields synthesize.py reads, log-probs to 4 decimals, and the
    sampling settings explore.py records (that run's: T = 0.5, no truncation)."""
    chosen = {q: [] for q in QUERIES}
    with open(source) as f:
        for line in f:
            r = json.loads(line)
            if r["query_id"] in chosen:
                slim = {k: r[k] for k in KEEP if k in r}
                slim["behaviour_logprobs"] = [round(x, 4) for x in slim["behaviour_logprobs"]]
                slim["p_code_open"] = round(slim["p_code_open"], 4)
                slim.update(temperature=0.5, top_p=1.0, top_k=0)
                chosen[r["query_id"]].append(slim)
    rows = [r for q in QUERIES for r in sorted(chosen[q], key=lambda r: (r["mode"], r["k"]))]
    assert all(len(chosen[q]) == 12 for q in QUERIES), {q: len(v) for q, v in chosen.items()}
    return "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows)


def record_view(record):
    """A training record as the fixture keeps it: readable fields, and a digest of every field."""
    readable = ("id", "advantage", "sft", "method", "source_mode")
    return {**{k: record[k] for k in readable},
            "fields": {k: replay.digest(v)[:8] for k, v in sorted(record.items()) if k not in readable}}


def run_synthesize(synthesize, rollouts_path, flags, out_dir):
    """synthesize.main with flags, in this process; returns (summary, records)."""
    out = os.path.join(out_dir, "train.jsonl")
    argv = [f"--rollouts={rollouts_path}", f"--out={out}"] + flags
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        synthesize.main(argv)
    with open(out) as f:
        records = [json.loads(line) for line in f]
    with open(out + ".summary.json") as f:
        summary = json.load(f)
    return summary, records


def make_synthesize_reference(rollouts_path):
    import synthesize
    originals = {name: getattr(synthesize, name) for names in SYNTH_FUNCTIONS.values() for name in names}
    calls = {name: {} for name in ("estimate_q", "estimate_pi", "reference_strategy", "subsample", "whiten")}
    hint_ids = {"code": tiny_ids(synthesize.hint_to_code), "cot": tiny_ids(synthesize.hint_to_cot)}

    def subsample_recorded(pools, s_star, m, rng):
        log, key = [], replay.key_of("subsample", (pools, s_star, m, rng))    # the generator's state before
        result = originals["subsample"](pools, s_star, m, LoggingRandom(rng, log))
        calls["subsample"][key] = {"ids": [r["id"] for r in result], "rng": log}
        return result

    reflections = []

    def reflective_recorded(failed, success, ids):
        result = originals["reflective_record"](failed, success, ids)
        reflections.append({"failed": failed["id"], "success": success["id"], "hint_ids": list(ids),
                            "record": record_view(result)})
        return result

    synthesize.estimate_q = replay.recorder("estimate_q", originals["estimate_q"], calls["estimate_q"])
    synthesize.estimate_pi = replay.recorder("estimate_pi", originals["estimate_pi"], calls["estimate_pi"])
    synthesize.reference_strategy = replay.recorder("reference_strategy", originals["reference_strategy"],
                                           calls["reference_strategy"])
    synthesize.whiten = replay.recorder("whiten", originals["whiten"], calls["whiten"])
    synthesize.subsample = subsample_recorded
    synthesize.reflective_record = reflective_recorded
    encode_hints = synthesize.encode_hints
    synthesize.encode_hints = lambda model_dir, hints: hint_ids
    settings = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name, flags in SETTINGS.items():
                summary, records = run_synthesize(synthesize, rollouts_path, flags, tmp)
                by_family = summary["by_family"]
                settings[name] = {
                    "flags": flags,
                    "A1": {f: {k: row[k] for k in A1_FIELDS} for f, row in by_family.items()},
                    "A2": {f: {k: row[k] for k in A2_FIELDS} for f, row in by_family.items()},
                    "records": [record_view(r) for r in records],
                }
    finally:
        for name, function in originals.items():
            setattr(synthesize, name, function)
        synthesize.encode_hints = encode_hints
    return {"about": "made by assignments/make_fixtures.py from the reference synthesize.py; see its docstring",
            "hint_ids": hint_ids, "settings": settings, "calls": calls, "reflections": reflections}


# ----------------------------------------------------------------------------- train.m_step_loss (A4)
MSTEP_REFERENCE = os.path.join(FIXTURES, "mstep_reference.json")
MSTEP_TOKENS = 300
# name -> keyword arguments of m_step_loss besides the tensors (n_tokens: the tokens of the whole step, here more
# than these 300, as when they are one micro-batch of several)
MSTEP_SETTINGS = {
    "eps0.2-dual3": {"clip_eps": 0.2, "sft_weight": 1.0, "dual_clip": 3.0},
    "ppo-eps0.1": {"clip_eps": 0.1, "sft_weight": 0.5, "dual_clip": 0.0},
    "dual-clip-2": {"clip_eps": 0.2, "sft_weight": 1.0, "dual_clip": 2.0},
    "no-lambda": {"clip_eps": 0.3, "sft_weight": 0.0, "dual_clip": 0.0},
    "micro-batch": {"clip_eps": 0.2, "sft_weight": 1.0, "dual_clip": 3.0, "n_tokens": 1000},
}


def mstep_inputs():
    """300 tokens with ratios from 0.05 to 20 (far outside [1-eps, 1+eps] on both sides, and past a dual clip),
    advantages of both signs and zero, a third of them sft."""
    rng = random.Random(2502)
    logprobs, behaviour, advantages, sft = [], [], [], []
    for i in range(MSTEP_TOKENS):
        b = -rng.uniform(0.05, 4.0)
        log_ratio = rng.choice([rng.uniform(-0.15, 0.15), rng.uniform(-3.0, 3.0)])
        logprobs.append(round(min(b + log_ratio, -1e-3), 6))
        behaviour.append(round(b, 6))
        advantages.append(rng.choice([0.0, round(rng.uniform(-2.0, 2.0), 6), round(rng.uniform(-2.0, 2.0), 6)]))
        sft.append(rng.random() < 1 / 3)
    return {"logprobs": logprobs, "behaviour_logprobs": behaviour, "advantages": advantages, "sft": sft}


def make_mstep_reference():
    import torch
    import train
    inputs = mstep_inputs()
    results = {}
    for name, kwargs in MSTEP_SETTINGS.items():
        kwargs = dict(kwargs)
        n_tokens = kwargs.pop("n_tokens", MSTEP_TOKENS)
        logprobs = torch.tensor(inputs["logprobs"], dtype=torch.float64, requires_grad=True)
        loss, stats = train.m_step_loss(logprobs, torch.tensor(inputs["behaviour_logprobs"], dtype=torch.float64),
                                        torch.tensor(inputs["advantages"], dtype=torch.float64),
                                        torch.tensor(inputs["sft"]), n_tokens, **kwargs)
        loss.backward()
        results[name] = {"kwargs": kwargs, "n_tokens": n_tokens, "loss": loss.item(),
                         "grad": [round(g, 12) for g in logprobs.grad.tolist()],
                         "stats": {k: v for k, v in stats.items() if isinstance(v, (int, float))}}
    return {"about": "made by assignments/make_fixtures.py from the reference train.m_step_loss, in float64",
            "inputs": inputs, "settings": results}


# ----------------------------------------------------------------------------- grade._numeric_verdict (A9)
GRADE_REFERENCE = os.path.join(FIXTURES, "grade_reference.json")


def make_grade_reference():
    """The pairs of the repo's own grader table (tests/test_grade.py EQUIV: the specification of is_equiv), and what
    the reference _numeric_verdict said on every pair of parsed values it was asked about (trees by repr)."""
    import grade
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from test_grade import EQUIV
    calls = {}
    original = grade._numeric_verdict

    def recorded(a, b):
        verdict = original(a, b)
        calls[repr(a) + " || " + repr(b)] = [repr(a), repr(b), verdict]
        return verdict

    grade._numeric_verdict = recorded
    try:
        pairs = [[pred, gold, grade.is_equiv(pred, gold), grade.is_equiv(gold, pred)] for pred, gold, _ in EQUIV]
    finally:
        grade._numeric_verdict = original
    return {"about": "made by assignments/make_fixtures.py from the reference grade.py and tests/test_grade.py",
            "pairs": pairs, "numeric_verdicts": sorted(calls.values())}


# -----------------------------------------------------------------------------
def dumps(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")) + "\n"


def build(source_run):
    """{fixture path: its text}."""
    files = {}
    rollouts = source_run and os.path.exists(source_run)
    if rollouts:
        files[ROLLOUTS] = make_rollouts(source_run)
    elif not os.path.exists(ROLLOUTS):
        sys.exit(f"make_fixtures.py: {source_run or SOURCE_RUN} not found and no {ROLLOUTS} to reuse: run bash em.sh "
                 f"first, or pass --source_run=PATH/rollouts.jsonl")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rollouts.jsonl")
        with open(path, "w") as f:
            f.write(files.get(ROLLOUTS) or open(ROLLOUTS).read())
        files[SYNTH_REFERENCE] = dumps(make_synthesize_reference(path))
    files[MSTEP_REFERENCE] = dumps(make_mstep_reference())
    files[GRADE_REFERENCE] = dumps(make_grade_reference())
    return files


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with the committed fixtures, write nothing")
    parser.add_argument("--source_run", default="",
                        help=f"the rollouts to take the queries from (default: keep the committed "
                             f"synthesize_rollouts.jsonl; a fresh one: {SOURCE_RUN} of a finished em.sh)")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    files = build(args.source_run)
    stale = []
    for path, text in files.items():
        old = open(path).read() if os.path.exists(path) else None
        if old != text:
            stale.append(os.path.relpath(path, ROOT))
            if not args.check:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w") as f:
                    f.write(text)
    if args.check:
        if stale:
            print(f"stale fixtures (the reference code now gives something else): {', '.join(stale)}; "
                  f"run python assignments/make_fixtures.py and commit them")
            return 1
        print("fixtures are up to date")
        return 0
    for path, text in files.items():
        print(f"{os.path.relpath(path, ROOT)}: {len(text.encode()) / 1024:.0f} KB"
              + (" (rewritten)" if os.path.relpath(path, ROOT) in stale else " (unchanged)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

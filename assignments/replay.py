"""Recorded calls instead of reference code.

An experiment runs a whole stage (synthesize.py, say) with the student's functions of ONE assignment. The stage also
calls functions of other assignments, which may be blanked in this student version; a copy of their reference code
would hand out the answers. So make_fixtures.py recorded, during a reference run, every call to those functions:
its arguments (rollouts by id) and what it returned. Here the experiment replays them: a stand-in that looks its
arguments up in the recording and returns what the reference returned. Data, not code.

A call the recording does not hold means the student's own function fed a downstream one something the reference
never did: the replay raises ReplayMiss, which the experiment reports as a difference from the reference."""
import hashlib
import json
import random


class ReplayMiss(Exception):
    pass


def reduce(value):
    """Arguments in a canonical JSON-able form: a rollout by its id, floats by repr (so 0.1 + 0.2 is not 0.3)."""
    if isinstance(value, dict) and "id" in value and "mode" in value:
        return "rollout:" + str(value["id"])
    if isinstance(value, dict):
        return {str(k): reduce(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [reduce(v) for v in value]
    if isinstance(value, float):
        return "f" + repr(value)
    if isinstance(value, random.Random):     # a generator by its state: the same call with another seed differs
        return "rng:" + hashlib.sha256(repr(value.getstate()).encode()).hexdigest()[:16]
    return value


def key_of(name, args):
    return json.dumps([name, reduce(list(args))], sort_keys=True)


def digest(value):
    """A short stable hash of a JSON-able value (floats by repr), for comparing records without storing them."""
    return hashlib.sha256(json.dumps(reduce(value), sort_keys=True).encode()).hexdigest()[:16]


def recorder(name, function, table, encode=lambda result: result):
    """function, recording each call into table[key] = encode(result)."""
    def recorded(*args):
        result = function(*args)
        table[key_of(name, args)] = encode(result)
        return result
    recorded.__name__ = name
    return recorded


def replayer(name, table, decode=lambda result, args: result):
    def replayed(*args):
        key = key_of(name, args)
        if key not in table:
            raise ReplayMiss(f"{name} was called with arguments the reference run never passed it: {key[:300]}")
        return decode(table[key], args)
    replayed.__name__ = name
    return replayed

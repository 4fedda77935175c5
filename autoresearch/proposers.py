"""Proposers: where the next candidate comes from.

A proposer sees the search space, the current best configuration and every trial so far, and
returns a Candidate: the full set of searched values plus the changes against the best. The
driver checks constraints and novelty, so a proposer may return a candidate that is rejected;
rejected candidates are never run and never counted. After a trial the driver calls `tell`
(model-based strategies learn from it; crashes included).
"""
import json
import random
from dataclasses import dataclass


@dataclass
class Candidate:
    params: dict          # every searched constant -> value
    changes: dict         # the constants that differ from the best at proposal time
    description: str      # short, human readable


def config_key(params, seed=None):
    return json.dumps(params, sort_keys=True, default=list) + ("" if seed is None else f"#{seed}")


def describe_changes(changes, best):
    return ", ".join(f"{k} {_short(best.get(k))}->{_short(v)}" for k, v in sorted(changes.items()))


def _short(v):
    return f"{v:g}" if isinstance(v, float) else str(v)


class Proposer:
    name = "base"

    def __init__(self, space, seed=0):
        self.space = space
        self.rng = random.Random(seed)

    def propose(self, best, history):
        raise NotImplementedError

    def tell(self, candidate, row):
        pass


class GreedyProposer(Proposer):
    """The best configuration with a few constants nudged; a keep becomes the new base."""
    name = "greedy"

    def propose(self, best, history):
        changes = self.space.mutate(best, self.rng)
        params = dict(best) | changes
        return Candidate(params, changes, describe_changes(changes, best))


class RandomProposer(Proposer):
    """Independent samples from the whole space."""
    name = "random"

    def propose(self, best, history):
        params = self.space.sample(self.rng)
        changes = {k: v for k, v in params.items() if v != best.get(k)}
        return Candidate(params, changes, "random: " + describe_changes(changes, best))


PROPOSERS = {p.name: p for p in (GreedyProposer, RandomProposer)}


def make_proposer(name, space, seed=0):
    try:
        return PROPOSERS[name](space, seed)
    except KeyError:
        raise ValueError(f"unknown strategy {name!r} (have: {', '.join(PROPOSERS)})") from None

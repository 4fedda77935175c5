"""Proposers: where the next candidate comes from.

A proposer sees the search space, the current best configuration and every trial so far, and
returns a Candidate: the full set of searched values plus the changes against the best. The
driver checks constraints and novelty, so a proposer may return a candidate that is rejected;
rejected candidates are never run and never counted. After a trial the driver calls `tell`
(model-based strategies learn from it; crashes included).
"""
import json
import math
import random
from dataclasses import dataclass, field


@dataclass
class Candidate:
    params: dict          # every searched constant -> value
    changes: dict         # the constants that differ from the best at proposal time
    description: str      # short, human readable
    meta: dict = field(default_factory=dict)  # the proposer's own bookkeeping
    source: str = None    # code mode: the whole edited train.py the trial runs


def config_key(params, seed=None):
    return json.dumps(params, sort_keys=True, default=list) + ("" if seed is None else f"#{seed}")


def describe_changes(changes, best):
    return ", ".join(f"{k} {_short(best.get(k))}->{_short(v)}" for k, v in sorted(changes.items()))


def _short(v):
    return f"{v:g}" if isinstance(v, float) else str(v)


class Proposer:
    name = "base"
    # Set by the driver, for proposers that want them:
    check = None        # (params, source=None) -> why they cannot run, or None
    read_source = None  # () -> the current best train.py's text
    defaults = {}       # the profile's values of constants that train.py leaves at None

    def __init__(self, space, seed=0):
        self.space = space
        self.rng = random.Random(seed)

    def warm_start(self, rows):
        """The trials already in results.tsv, once, before the first proposal (resume)."""

    def propose(self, best, history):
        raise NotImplementedError

    def tell(self, candidate, row):
        """The row written for a candidate that ran (crashes included)."""

    def reject(self, candidate, known_value=None):
        """A candidate the driver will not run: it breaks a constraint, or it was tried already
        (then known_value is the val_bpb it got, or None if it crashed)."""


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


class OptunaProposer(Proposer):
    """Optuna's samplers through ask/tell. Ranges map to float/int distributions; choices of
    ordered numbers to an index range (so CMA-ES can move along them), other choices to a
    categorical. Past trials are added on resume; crashes and constraint breakers are failed
    trials, so the model steers away from them."""

    def __init__(self, space, seed=0):
        super().__init__(space, seed)
        import optuna
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.optuna = optuna
        self.seed = seed
        self.dists, self.values = {}, {}
        for name, p in space.params.items():
            if p.choices is None:
                if p.integer:
                    self.dists[name] = optuna.distributions.IntDistribution(p.low, p.high, log=p.log)
                else:
                    self.dists[name] = optuna.distributions.FloatDistribution(p.low, p.high, log=p.log)
                continue
            numeric = all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in p.choices)
            self.values[name] = sorted(p.choices) if numeric else list(p.choices)
            n = len(p.choices) - 1
            self.dists[name] = (optuna.distributions.IntDistribution(0, n) if numeric and n > 0
                                else optuna.distributions.CategoricalDistribution(list(range(n + 1))))
        self.study = None
        self.pending = []  # rows seen before the study exists

    def encode(self, params):
        """Optuna's view of a configuration, or None if it lies outside the space."""
        out = {}
        for name, dist in self.dists.items():
            v = params.get(name)
            if name in self.values:
                if v not in self.values[name]:
                    return None
                out[name] = self.values[name].index(v)
            elif isinstance(v, (int, float)) and dist.low <= v <= dist.high:
                out[name] = v
            else:
                return None
        return out

    def decode(self, encoded):
        out = {}
        for name, v in encoded.items():
            if name in self.values:
                out[name] = self.values[name][v]
            else:
                out[name] = self.space.params[name]._snap(v)
        return out

    def make_sampler(self, best):
        return self.optuna.samplers.TPESampler(seed=self.seed, multivariate=True)

    def _ensure_study(self, best):
        if self.study is None:
            self.study = self.optuna.create_study(direction="minimize",
                                                  sampler=self.make_sampler(best))
            for row in self.pending:
                self._add(row)
            self.pending = []

    def _add(self, row):
        enc = self.encode(_params_of(row, self.space))
        if enc is None:
            return
        state = self.optuna.trial.TrialState
        crashed = row["status"] == "crash"
        self.study.add_trial(self.optuna.trial.create_trial(
            state=state.FAIL if crashed else state.COMPLETE,
            value=None if crashed else float(row["val_bpb"]), params=enc,
            distributions=self.dists))

    def warm_start(self, rows):
        self.pending.extend(r for r in rows if r.get("params"))

    def propose(self, best, history):
        self._ensure_study(best)
        trial = self.study.ask(self.dists)
        params = self.decode(trial.params)
        changes = {k: v for k, v in params.items() if v != best.get(k)}
        return Candidate(params, changes, f"{self.name}: " + describe_changes(changes, best),
                         meta={"trial": trial})

    def tell(self, candidate, row):
        self._finish(candidate, None if row["status"] == "crash" else float(row["val_bpb"]))

    def reject(self, candidate, known_value=None):
        self._finish(candidate, known_value)

    def _finish(self, candidate, value):
        trial = candidate.meta.get("trial")
        if trial is None:
            return
        if value is None or not math.isfinite(value):
            self.study.tell(trial, state=self.optuna.trial.TrialState.FAIL)
        else:
            self.study.tell(trial, value)


class TPEProposer(OptunaProposer):
    name = "tpe"


class CmaEsProposer(OptunaProposer):
    name = "cmaes"

    def make_sampler(self, best):
        import warnings
        enc = self.encode(best)
        with warnings.catch_warnings():  # x0 (start at the best) is deprecated, not yet replaced
            warnings.simplefilter("ignore")
            return self.optuna.samplers.CmaEsSampler(
                x0=enc, seed=self.seed, n_startup_trials=0 if enc else 1, with_margin=True,
                warn_independent_sampling=False,
                independent_sampler=self.optuna.samplers.RandomSampler(seed=self.seed))


def _params_of(row, space):
    params = json.loads(row["params"])
    return {k: tuple(v) if isinstance(v, list) and space.params.get(k) is not None
            and space.params[k].choices and isinstance(space.params[k].choices[0], tuple) else v
            for k, v in params.items()}


PROPOSERS = {p.name: p for p in (GreedyProposer, RandomProposer, TPEProposer, CmaEsProposer)}


STRATEGIES = (*PROPOSERS, "llm", "centaur")


def make_proposer(name, space, seed=0, llm=None):
    """A proposer by strategy name; llm holds the LLM proposer's options (endpoint, model...)."""
    options = dict(llm or {})
    if name == "llm":
        from autoresearch.llm import LLMProposer
        options.pop("llm_fraction", None)
        return LLMProposer(space, seed, **options)
    if name == "centaur":
        from autoresearch.centaur import CentaurProposer
        if options.pop("scope", "params") != "params":
            raise ValueError("centaur proposes constants only; code edits need the llm strategy")
        return CentaurProposer(space, seed, **options)
    try:
        return PROPOSERS[name](space, seed)
    except KeyError:
        raise ValueError(f"unknown strategy {name!r} (have: {', '.join(STRATEGIES)})") from None

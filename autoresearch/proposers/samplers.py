"""Optuna's samplers (TPE, CMA-ES) through ask/tell.

Ranges map to float/int distributions; choices of ordered numbers to an index range (so CMA-ES
can move along them), other choices to a categorical. Each config is one Optuna trial, told the
config's *mean* once its race is decided (a config under re-runs keeps its trial open). Configs
already in the results are added on resume; crashes and constraint breakers are failed trials,
so the model steers away from them.
"""
import math

from autoresearch.history import tuples_back as _tuples
from autoresearch.proposers.base import Candidate, Proposer, changes_from, describe_changes


class OptunaProposer(Proposer):

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
        self.pending = []  # configs decided before the study exists
        self.liars = {}    # config id -> Optuna trial number: configs other workers are running

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
        # constant_liar: configs other workers are running count as bad until they finish, so
        # workers asking at once spread out instead of all sampling the same region
        return self.optuna.samplers.TPESampler(seed=self.seed, multivariate=True,
                                               constant_liar=True)

    def _ensure_study(self, best):
        if self.study is None:
            self.study = self.optuna.create_study(direction="minimize",
                                                  sampler=self.make_sampler(best))
            for row in self.pending:
                self._add(row)
            self.pending = []

    def _add(self, config):
        enc = self.encode(config.params)
        if enc is None:
            return
        state = self.optuna.trial.TrialState
        value = config.mean if config.status not in ("crash", "pruned") else None
        done = state.PRUNED if config.status == "pruned" else state.FAIL
        self.study.add_trial(self.optuna.trial.create_trial(
            state=state.COMPLETE if value is not None else done, value=value, params=enc,
            distributions=self.dists))

    def warm_start(self, ctx):
        self.pending.extend(c for c in ctx.configs.values()
                            if c.status in ("keep", "discard", "pruned", "crash") and c.params)

    def propose(self, ctx):
        self._ensure_study(ctx.best)
        for job in ctx.running:  # a shared study: what the other workers are running now
            enc = self.encode(_tuples(job.get("params", {}), self.space))
            if enc is not None and job.get("config") and job["config"] not in self.liars:
                self.study.add_trial(self.optuna.trial.create_trial(
                    state=self.optuna.trial.TrialState.RUNNING, params=enc,
                    distributions=self.dists))
                self.liars[job["config"]] = self.study.trials[-1].number
        trial = self.study.ask(self.dists)
        params = self.decode(trial.params)
        changes = changes_from(params, ctx.best)
        return Candidate(params, changes, f"{self.name}: " + describe_changes(changes, ctx.best),
                         meta={"trial": trial})

    def tell(self, candidate, config):
        value = config.mean if config.status not in ("crash", "pruned") else None
        pruned = config.status == "pruned"
        if config.id in self.liars:  # it ran elsewhere: its stand-in gets the real value
            self._finish_number(self.liars.pop(config.id), value, pruned)
            return
        if candidate is None or candidate.meta.get("trial") is None:
            if self.study is None:
                self.pending.append(config)
            else:
                self._add(config)
            return
        self._finish(candidate, value, pruned)

    def reject(self, candidate, known=None):
        self._finish(candidate, known.mean if known is not None and known.mean is not None else None)

    def _finish(self, candidate, value, pruned=False):
        trial = candidate.meta.get("trial")
        if trial is not None:
            self._finish_number(trial, value, pruned)

    def _finish_number(self, trial, value, pruned=False):
        """A stopped run is PRUNED to the sampler (TPE ranks it below every complete trial),
        a crash FAIL."""
        state = self.optuna.trial.TrialState
        if pruned:
            self.study.tell(trial, state=state.PRUNED)
        elif value is None or not math.isfinite(value):
            self.study.tell(trial, state=state.FAIL)
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

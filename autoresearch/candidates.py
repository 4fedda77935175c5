"""A valid new candidate: what the proposer is shown, and what it proposes filtered to the new
(no run trained it, no worker is training it), the allowed (the constraints) and the fitting
(a micro-batch known to run out of memory is shrunk first); the proposer hears every verdict.
"""
import dataclasses

from autoresearch import history
from autoresearch.errors import LoopError
from autoresearch.memory import oom_observations, shrink_to_fit
from autoresearch.proposers import Context

DECIDED = ("keep", "discard", "pruned", "crash")  # statuses the proposer is told


class Candidates:
    """Between the proposer and the loop: every method is handed the results' standing
    (history.Standing) it decides on."""

    def __init__(self, settings, space, proposer, workspace, stopping):
        self.s, self.space, self.proposer = settings, space, proposer
        self.workspace, self.stopping = workspace, stopping
        self.pending = {}  # config id -> the proposer's candidate, while its race runs
        self.told = set()  # configs the proposer knows the verdict of

    def start(self, standing):
        """Warm-start the proposer on what the results hold; verdicts it has not heard (other
        workers', a race begun before a restart) are told before it next proposes."""
        self.proposer.warm_start(self.context(standing))
        self.told = {c.id for c in standing.configs.values() if c.status in DECIDED}

    def best(self, standing):
        """(the incumbent's searched values, its mean val_bpb), or train.py's before any run."""
        if standing.incumbent is None:
            return self.workspace.searched(self.workspace.current_source()), None
        return dict(standing.incumbent.params), standing.incumbent.mean

    def context(self, standing):
        best, value = self.best(standing)
        inc = standing.incumbent
        return Context(best=best, best_value=value, best_runs=inc.n if inc else 0,
                       configs=standing.configs, noise=standing.noise,
                       source=self.workspace.current_source(),
                       defaults=dict(self.workspace.profile.train),
                       check=lambda params, source=None: self.cannot_run(params, standing, source),
                       running=[j for j in standing.running if j.get("params")],
                       curves=self.curve_lines(standing.runs) if self.proposer.reads_curves
                       else {})

    def curve_lines(self, runs):
        """config id -> the curve line of its latest finished run (what the LLM reads)."""
        latest = {}
        for r in runs:
            if r.finished:
                latest[r.config] = r
        out = {}
        for config, run in latest.items():
            curve = self.stopping.curve_of(run)
            if curve is not None and curve.steps:
                out[config] = curve.line()
        return out

    def cannot_run(self, params, standing, source=None):
        """Why a candidate will not be run, or None. A config is new when no run trained it
        and no other worker is training it now."""
        code = source if source is not None else self.workspace.current_source()
        config = self.workspace.config_of(params, code)
        if any(j.get("config") == config for j in standing.running):
            return "another worker is running this configuration now"
        known = standing.configs.get(config)
        if known is not None and known.tried:  # (an interrupted run is no try)
            if known.status == "retest":
                return f"this configuration is being re-run already (mean {known.mean:.6f} over {known.n})"
            if known.status == "pruned" and known.mean is None:
                return "this configuration was tried already and stopped early (pruned)"
            if known.mean is not None:
                return (f"this configuration was tried already (mean val_bpb {known.mean:.6f} "
                        f"over {known.n} run{'s' if known.n > 1 else ''})")
            return "this configuration was tried already and crashed"
        broken = self.space.violations(self.workspace.context(code) | params)
        return f"it breaks the constraint(s): {'; '.join(broken)}" if broken else None

    def propose(self, standing):
        """A candidate that is new and satisfies the constraints. Rejected ones are told to the
        proposer (a repeat with the config it repeats) and never run or counted."""
        ctx = self.context(standing)
        ooms = oom_observations(standing.runs)
        for _ in range(self.s.max_proposals):
            cand = self.proposer.propose(ctx)
            if cand.source is not None:  # a code edit: new if no run trained this code + values
                if self.cannot_run(cand.params, standing, cand.source) is None:
                    return cand
                self._reject(cand, standing, cand.source)
                continue
            if ooms and not self._fit(cand, ooms, ctx.best):
                self.proposer.reject(cand)
                continue
            if not cand.changes:
                self.proposer.reject(cand, standing.incumbent)
                continue
            if self.cannot_run(cand.params, standing) is not None:
                self._reject(cand, standing, ctx.source)
                continue
            return cand
        raise LoopError(f"no new valid candidate in {self.s.max_proposals} proposals: the space "
                        f"looks exhausted or over-constrained")

    def _reject(self, cand, standing, source):
        """Tell the proposer a candidate will not run, with the config it repeats if any."""
        self.proposer.reject(cand, standing.configs.get(self.workspace.config_of(cand.params,
                                                                                 source)))

    @staticmethod
    def _fit(cand, ooms, best):
        """Shrink the micro-batch of a candidate known not to fit, before it runs; False when
        no size it could take fits."""
        fitted = shrink_to_fit(cand.params, ooms)
        if fitted is None:
            return False
        if fitted != cand.params:
            note = (f"predicted oom: DEVICE_BATCH_SIZE {cand.params['DEVICE_BATCH_SIZE']}"
                    f"->{fitted['DEVICE_BATCH_SIZE']}")
            cand.params = fitted
            cand.changes = {k: v for k, v in fitted.items() if v != best.get(k)}
            cand.description = f"{cand.description} ({note})"
        return True

    def dry_run(self, n, standing):
        """The next n new candidates the proposer would run from the incumbent; runs nothing."""
        out = []
        for _ in range(n):
            cand = self.propose(standing)
            out.append(cand)
            cid = self.workspace.config_of(cand.params,
                                           cand.source or self.workspace.current_source())
            standing = dataclasses.replace(standing, configs=dict(standing.configs) | {
                cid: history.Config(cid, cand.params, "params", "dry", cand.description, -1,
                                    status="discard")})
        return out

    def tell(self, job, config, status, configs):
        """A run of a new candidate or a race was judged: the proposer hears its config's
        verdict once the race is decided."""
        if job.purpose not in ("new", "retest"):
            return
        if status == "retest":
            if job.candidate is not None:
                self.pending[config] = job.candidate
            return
        candidate = self.pending.pop(config, None) or job.candidate
        if (candidate is not None or job.purpose == "retest") and config not in self.told:
            self.told.add(config)
            self.proposer.tell(candidate, configs[config])

    def catch_up(self, configs):
        """Tell the proposer the verdicts it has not heard: other workers' configs, and races
        that began before a restart."""
        for c in configs.values():
            if c.status in DECIDED and c.id not in self.told and c.id not in self.pending:
                self.told.add(c.id)
                self.proposer.tell(None, c)

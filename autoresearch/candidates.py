"""A valid new candidate: what the proposer is shown, and what it proposes filtered to the new
(no run trained it, no worker is training it), the allowed (the constraints) and the fitting
(a micro-batch known to run out of memory is shrunk first); the proposer hears every verdict.
A part of the Driver (driver.py), which holds the state it reads.
"""
from autoresearch import history
from autoresearch.errors import LoopError
from autoresearch.memory import oom_observations, shrink_to_fit
from autoresearch.proposers import Context

DECIDED = ("keep", "discard", "pruned", "crash")  # statuses the proposer is told


class Candidates:
    """Mixed into Driver: its methods use the driver's state (see the module's docstring)."""

    def proposal_context(self):
        best, value = self.best()
        return Context(best=best, best_value=value,
                       best_runs=self.incumbent.n if self.incumbent else 0,
                       configs=self.configs, noise=self.noise, source=self.current_source(),
                       defaults=dict(self.profile.train), check=self.cannot_run,
                       running=[j for j in self.running if j.get("params")],
                       curves=self.curve_lines() if self.proposer.reads_curves else {})

    def curve_lines(self):
        """config id -> the curve line of its latest finished run (what the LLM reads)."""
        latest = {}
        for r in self.runs:
            if r.finished:
                latest[r.config] = r
        out = {}
        for config, run in latest.items():
            curve = self.curve_of(run)
            if curve is not None and curve.steps:
                out[config] = curve.line()
        return out

    def cannot_run(self, params, source=None):
        """Why a candidate will not be run, or None. A config is new when no run trained it
        and no other worker is training it now."""
        code = source if source is not None else self.current_source()
        config = self.config_of(params, code)
        if any(j.get("config") == config for j in self.running):
            return "another worker is running this configuration now"
        known = self.configs.get(config)
        if known is not None and known.tried:  # (an interrupted run is no try)
            if known.status == "retest":
                return f"this configuration is being re-run already (mean {known.mean:.6f} over {known.n})"
            if known.status == "pruned" and known.mean is None:
                return "this configuration was tried already and stopped early (pruned)"
            if known.mean is not None:
                return (f"this configuration was tried already (mean val_bpb {known.mean:.6f} "
                        f"over {known.n} run{'s' if known.n > 1 else ''})")
            return "this configuration was tried already and crashed"
        broken = self.space.violations(self.context(code) | params)
        return f"it breaks the constraint(s): {'; '.join(broken)}" if broken else None

    def propose(self):
        """A candidate that is new and satisfies the constraints. Rejected ones are told to the
        proposer (a repeat with the config it repeats) and never run or counted."""
        ctx = self.proposal_context()
        best = ctx.best
        ooms = oom_observations(self.runs)
        for _ in range(self.s.max_proposals):
            cand = self.proposer.propose(ctx)
            if cand.source is not None:  # a code edit: new if no run trained this code + values
                if self.cannot_run(cand.params, cand.source) is None:
                    return cand
                self.proposer.reject(cand, self.configs.get(self.config_of(cand.params, cand.source)))
                continue
            if ooms:  # shrink the micro-batch of a candidate known not to fit, before it runs
                fitted = shrink_to_fit(cand.params, ooms)
                if fitted is None:
                    self.proposer.reject(cand)
                    continue
                if fitted != cand.params:
                    note = (f"predicted oom: DEVICE_BATCH_SIZE {cand.params['DEVICE_BATCH_SIZE']}"
                            f"->{fitted['DEVICE_BATCH_SIZE']}")
                    cand.params = fitted
                    cand.changes = {k: v for k, v in fitted.items() if v != best.get(k)}
                    cand.description = f"{cand.description} ({note})"
            if not cand.changes:
                self.proposer.reject(cand, self.incumbent)
                continue
            reason = self.cannot_run(cand.params)
            if reason is not None:
                self.proposer.reject(cand, self.configs.get(self.config_of(cand.params,
                                                                           ctx.source)))
                continue
            return cand
        raise LoopError(f"no new valid candidate in {self.s.max_proposals} proposals: the space "
                        f"looks exhausted or over-constrained")

    def dry_run(self, n):
        """The next n new candidates the proposer would run from the incumbent; runs nothing."""
        out = []
        saved = self.configs
        try:
            for _ in range(n):
                cand = self.propose()
                out.append(cand)
                cid = self.config_of(cand.params, cand.source or self.current_source())
                self.configs = dict(self.configs) | {cid: history.Config(
                    cid, cand.params, "params", "dry", cand.description, -1, status="discard")}
        finally:
            self.configs = saved
        return out

    def _tell_proposer(self, job, config, status):
        if job.purpose not in ("new", "retest"):
            return
        if status == "retest":
            if job.candidate is not None:
                self.pending[config] = job.candidate
            return
        candidate = self.pending.pop(config, None) or job.candidate
        if (candidate is not None or job.purpose == "retest") and config not in self.told:
            self.told.add(config)
            self.proposer.tell(candidate, self.configs[config])

    def _catch_up(self):
        """Tell the proposer the verdicts it has not heard: other workers' configs, and races
        that began before a restart."""
        for c in self.configs.values():
            if c.status in DECIDED and c.id not in self.told and c.id not in self.pending:
                self.told.add(c.id)
                self.proposer.tell(None, c)

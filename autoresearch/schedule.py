"""What runs next: the baseline's SEEDs, the runs of open races (and the incumbent's re-runs the
judge asks for), else a new candidate; and, in a shared study, reserving it so that no two
workers run the same thing. A part of the Driver (driver.py), which holds the state it reads.
"""
import json
import time
from dataclasses import dataclass

from autoresearch import ledger as ledger_mod
from autoresearch.errors import LoopError
from autoresearch.patch import patch_constants


@dataclass
class Job:
    """One run to do."""
    purpose: str          # baseline | incumbent | retest | new | recheck
    kind: str             # baseline | params | code | recheck (the run's kind in results.tsv)
    params: dict          # every searched constant
    changes: dict         # against the incumbent when the config was proposed
    config: str
    seed: int
    source: str           # the whole train.py the run trains, SEED included
    description: str
    strategy: str
    candidate: object = None


class Schedule:
    """Mixed into Driver: its methods use the driver's state (see the module's docstring)."""

    def _base_seed(self, seed):
        """Every config's runs use SEEDs base, base+1, ...: the first baseline run's SEED."""
        baseline = [r for r in self.runs if r.kind == "baseline" and r.seed is not None]
        return min(baseline, key=lambda r: r.trial).seed if baseline else seed

    def baseline(self):
        first = min((r for r in self.runs if r.kind == "baseline"), key=lambda r: r.trial,
                    default=None)
        return self.configs[first.config] if first else None

    def baseline_runs_left(self):
        """How many baseline runs are still to come before the first verdict."""
        base = self.baseline()
        if base is None:
            return self.s.baseline_runs
        if self.incumbent is not None and base.id == self.incumbent.id and base.crashes < 2:
            return max(0, self.s.baseline_runs - base.n)
        return 0

    def ask(self):
        """The next run: the baseline's SEEDs first (side by side when several workers share
        the study), then open races (with the incumbent's re-runs the judge asks for), then a
        new candidate. None when everything that could run is being run by other workers."""
        inc, base = self.incumbent, self.baseline()
        busy = {j.get("config") for j in self.running}
        if inc is None or base is not None and base.id == inc.id and base.crashes < 2 \
                and base.n < self.s.baseline_runs:
            under_way = sum(j.get("purpose") == "baseline" for j in self.running)
            if (base.n if base else 0) + under_way < self.s.baseline_runs:
                return self._rerun_job(base, "baseline")
            return None  # no verdict before the baseline's runs are in
        self._restore_incumbent()  # another worker (machine) may have kept something
        if inc.crashes < 2 and inc.id not in busy and self.noise is None \
                and self.judge.name == "noise" and inc.n < self.s.baseline_runs:
            return self._rerun_job(inc, "incumbent", "noise floor first")
        race = next((c for c in self.configs.values() if c.status == "retest"
                     and c.id not in busy), None)
        if race is not None:
            if inc.crashes < 2 and inc.id not in busy and self.judge.wants_incumbent_run(inc, race,
                                                                                    self.noise):
                return self._rerun_job(inc, "incumbent", f"during the race of {race.id}")
            return self._rerun_job(race, "retest")
        return self._new_job()

    def _running_seeds(self, config_id):
        return [j["seed"] for j in self.running if j.get("config") == config_id and "seed" in j]

    def _rerun_job(self, config, purpose, why=""):
        """Another run of a known config (or the first baseline run), with a SEED it has not
        used and no other worker is using."""
        if config is None:
            source = self.current_source()
            params = self.searched(source)
            config_id = self.config_of(params, source)
            seed = max(self._running_seeds(config_id), default=self.base_seed - 1) + 1
            k = seed - self.base_seed + 1
            return Job("baseline", "baseline", params, {}, config_id, seed,
                       patch_constants(source, {"SEED": seed}),
                       "baseline" if k == 1 else f"baseline (run {k}/{self.s.baseline_runs})",
                       "baseline")
        source = self.source_of(config)
        if source is None:
            raise LoopError(f"the train.py of config {config.id} is in no runs/ directory here "
                            f"and not in the shared study; it cannot be re-run")
        seed = max([config.next_seed(self.base_seed) - 1, *self._running_seeds(config.id)]) + 1
        run = len(config.values) + 1 + len(self._running_seeds(config.id))
        if purpose == "baseline":
            description = f"baseline (run {run}/{self.s.baseline_runs})"
        elif purpose == "incumbent":
            description = f"incumbent re-run {run} ({why})"
        else:
            description = f"retest {run}/{self.s.max_runs}: {config.description}"
        kind = config.kind if purpose != "recheck" else "recheck"
        strategy = config.strategy if purpose != "recheck" else "recheck"
        first = next(r for r in self.runs if r.config == config.id)
        return Job(purpose, kind, dict(config.params), dict(_changes_of(first)), config.id, seed,
                   patch_constants(source, {"SEED": seed}), description, strategy,
                   self.pending.get(config.id))

    def _new_job(self):
        self._catch_up()
        try:
            cand = self.propose()
        except LoopError:
            if self.running:  # what other workers are running may open races: wait for them
                return None
            raise
        current = self.current_source()
        now = self.searched(current)
        base = cand.source if cand.source is not None else patch_constants(
            current, {k: v for k, v in cand.params.items() if now.get(k) != v})
        source = patch_constants(base, {"SEED": self.base_seed})
        kind = "code" if cand.source is not None else "params"
        return Job("new", kind, cand.params, cand.changes, self.config_of(cand.params, base),
                   self.base_seed, source, cand.description,
                   cand.strategy or self.proposer.name, cand)

    def _reserve(self):
        """The next job and its trial number. The number comes from the study (unique across
        workers), and a job whose config another worker took a moment ago is asked again; with
        nothing to run, the worker waits for the others."""
        waited = False
        while True:
            job = self.ask()
            if job is not None:
                if self.code_mode:  # so other machines (or a copied directory) can re-run it
                    self.record.put_source(job.config, patch_constants(job.source,
                                                                       {"SEED": self.base_seed}))
                number = self.record.reserve(self._job_attrs(job), self.rows)
                if number is not None:
                    return job, number
                if job.candidate is not None:  # taken by another worker: tell it as a repeat
                    self.proposer.reject(job.candidate)
            elif not waited:
                self.log(f"[{self.worker}] waiting: what can run next is running on other workers")
                waited = True
            time.sleep(0 if job is not None else self.s.poll_seconds)
            self.reload()

    def _job_attrs(self, job):
        """What other workers see of a job while it runs."""
        return {"config": job.config, "params": json.loads(json.dumps(job.params, default=list)),
                "seed": job.seed, "purpose": job.purpose, "kind": job.kind,
                "strategy": job.strategy, "description": job.description,
                "changes": json.loads(json.dumps(job.changes, default=list)),
                "worker": self.worker, "started_at": ledger_mod.now_iso()}


def _changes_of(run):
    try:
        return json.loads(run.row.get("changes") or "{}")
    except ValueError:
        return {}

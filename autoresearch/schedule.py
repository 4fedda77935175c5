"""What runs next: the baseline's SEEDs, the runs of open races (and the incumbent's re-runs the
judge asks for), else a new candidate; and, in a shared study, reserving it so that no two
workers run the same thing.
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
    """The order of work of one worker. Every method is handed the results' standing
    (history.Standing) it decides on; `base_seed` is train.py's SEED at the first baseline run."""

    def __init__(self, settings, judge, workspace, candidates, record, worker, log=print):
        self.s, self.judge, self.workspace, self.candidates = settings, judge, workspace, candidates
        self.record, self.worker, self.log = record, worker, log
        self.base_seed = None

    def start(self, standing, seed):
        """Every config's runs use SEEDs base, base+1, ...: the first baseline run's SEED, or
        train.py's before there is one."""
        baseline = [r for r in standing.runs if r.kind == "baseline" and r.seed is not None]
        self.base_seed = min(baseline, key=lambda r: r.trial).seed if baseline else seed

    @staticmethod
    def baseline(standing):
        first = min((r for r in standing.runs if r.kind == "baseline"), key=lambda r: r.trial,
                    default=None)
        return standing.configs[first.config] if first else None

    def baseline_runs_left(self, standing):
        """How many baseline runs are still to come before the first verdict."""
        base, inc = self.baseline(standing), standing.incumbent
        if base is None:
            return self.s.baseline_runs
        if inc is not None and base.id == inc.id and base.crashes < 2:
            return max(0, self.s.baseline_runs - base.n)
        return 0

    def ask(self, standing):
        """The next run: the baseline's SEEDs first (side by side when several workers share
        the study), then open races (with the incumbent's re-runs the judge asks for), then a
        new candidate. None when everything that could run is being run by other workers."""
        inc, base = standing.incumbent, self.baseline(standing)
        busy = {j.get("config") for j in standing.running}
        if inc is None or base is not None and base.id == inc.id and base.crashes < 2 \
                and base.n < self.s.baseline_runs:
            under_way = sum(j.get("purpose") == "baseline" for j in standing.running)
            if (base.n if base else 0) + under_way < self.s.baseline_runs:
                return self.rerun_job(base, "baseline", standing)
            return None  # no verdict before the baseline's runs are in
        # another worker (machine) may have kept something
        self.workspace.restore(inc, standing.runs, self.base_seed)
        free = inc.crashes < 2 and inc.id not in busy
        if free and standing.noise is None and self.judge.needs_noise_floor \
                and inc.n < self.s.baseline_runs:
            return self.rerun_job(inc, "incumbent", standing, "noise floor first")
        race = next((c for c in standing.configs.values() if c.status == "retest"
                     and c.id not in busy), None)
        if race is not None:
            if free and self.judge.wants_incumbent_run(inc, race, standing.noise):
                return self.rerun_job(inc, "incumbent", standing, f"during the race of {race.id}")
            return self.rerun_job(race, "retest", standing)
        return self._new_job(standing)

    def rerun_job(self, config, purpose, standing, why=""):
        """Another run of a known config (or the first baseline run), with a SEED it has not
        used and no other worker is using."""
        if config is None:
            return self._first_baseline_job(standing)
        source = self.workspace.source_of(config, standing.runs)
        if source is None:
            raise LoopError(f"the train.py of config {config.id} is in no runs/ directory here "
                            f"and not in the shared study; it cannot be re-run")
        running = _running_seeds(standing, config.id)
        seed = max([config.next_seed(self.base_seed) - 1, *running]) + 1
        run = len(config.values) + 1 + len(running)
        if purpose == "baseline":
            description = f"baseline (run {run}/{self.s.baseline_runs})"
        elif purpose == "incumbent":
            description = f"incumbent re-run {run} ({why})"
        else:
            description = f"retest {run}/{self.s.max_runs}: {config.description}"
        kind = config.kind if purpose != "recheck" else "recheck"
        strategy = config.strategy if purpose != "recheck" else "recheck"
        first = next(r for r in standing.runs if r.config == config.id)
        return Job(purpose, kind, dict(config.params), dict(_changes_of(first)), config.id, seed,
                   patch_constants(source, {"SEED": seed}), description, strategy,
                   self.candidates.pending.get(config.id))

    def _first_baseline_job(self, standing):
        """A baseline run before any has finished: train.py as it is."""
        ws = self.workspace
        source = ws.current_source()
        params = ws.searched(source)
        config_id = ws.config_of(params, source)
        seed = max(_running_seeds(standing, config_id), default=self.base_seed - 1) + 1
        k = seed - self.base_seed + 1
        return Job("baseline", "baseline", params, {}, config_id, seed,
                   patch_constants(source, {"SEED": seed}),
                   "baseline" if k == 1 else f"baseline (run {k}/{self.s.baseline_runs})",
                   "baseline")

    def _new_job(self, standing):
        self.candidates.catch_up(standing.configs)
        try:
            cand = self.candidates.propose(standing)
        except LoopError:
            if standing.running:  # what other workers are running may open races: wait for them
                return None
            raise
        ws = self.workspace
        current = ws.current_source()
        now = ws.searched(current)
        base = cand.source if cand.source is not None else patch_constants(
            current, {k: v for k, v in cand.params.items() if now.get(k) != v})
        source = patch_constants(base, {"SEED": self.base_seed})
        kind = "code" if cand.source is not None else "params"
        return Job("new", kind, cand.params, cand.changes, ws.config_of(cand.params, base),
                   self.base_seed, source, cand.description,
                   cand.strategy or self.candidates.proposer.name, cand)

    def reserve(self, standing, reload):
        """The next job and its trial number. The number comes from the study (unique across
        workers), and a job whose config another worker took a moment ago is asked again; with
        nothing to run, the worker waits for the others. reload() reads the standing afresh."""
        waited = False
        while True:
            job = self.ask(standing)
            if job is not None:
                if self.workspace.code_mode:  # so other machines (or a copied directory) can re-run it
                    self.record.put_source(job.config, patch_constants(job.source,
                                                                       {"SEED": self.base_seed}))
                number = self.record.reserve(self.job_attrs(job), standing.rows)
                if number is not None:
                    return job, number
                if job.candidate is not None:  # taken by another worker: tell it as a repeat
                    self.candidates.proposer.reject(job.candidate)
            elif not waited:
                self.log(f"[{self.worker}] waiting: what can run next is running on other workers")
                waited = True
            time.sleep(0 if job is not None else self.s.poll_seconds)
            standing = reload()

    def job_attrs(self, job):
        """What other workers see of a job while it runs."""
        return {"config": job.config, "params": json.loads(json.dumps(job.params, default=list)),
                "seed": job.seed, "purpose": job.purpose, "kind": job.kind,
                "strategy": job.strategy, "description": job.description,
                "changes": json.loads(json.dumps(job.changes, default=list)),
                "worker": self.worker, "started_at": ledger_mod.now_iso()}


def _running_seeds(standing, config_id):
    return [j["seed"] for j in standing.running if j.get("config") == config_id and "seed" in j]


def _changes_of(run):
    try:
        return json.loads(run.row.get("changes") or "{}")
    except ValueError:
        return {}

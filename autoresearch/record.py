"""Where runs are recorded: every run is a trial of one Optuna study, and results.tsv its view.

The study lives in Optuna's journal file beside results.tsv (results.journal) unless --storage
names another (PostgreSQL across machines; SQLite). One worker or many, the same code: the
driver asks its record for every row (in trial order, as the text fields of a results.tsv
line), for the jobs other workers are running, for a trial number for its next job, and to keep
a finished row; results.tsv is rewritten atomically as the study's view after every change.
While a run trains, its curve goes into the study as intermediate values (step = percent of the
budget, value = the smoothed train loss), and a finished trial carries what a person opens
first (its verdict, its log's tail, its train.py diff) as user attributes: optuna-dashboard
shows both. The autoresearch.storage package holds the study itself.
"""
import math
import os
import shutil

from autoresearch import curves, history
from autoresearch import ledger as ledger_mod
from autoresearch.protocol import progress_of

REPORT_STEP = 2  # percent of the budget between two points of a curve in the study


def optuna_distributions(space):
    """Optuna distributions of the searched constants that have one (scalar choices and
    ranges), so the shared study's trials carry them as params: optuna-dashboard then plots
    the search. Tuple-valued choices (ADAM_BETAS) stay in the job only."""
    import optuna.distributions as d
    out = {}
    for name, p in space.params.items():
        if p.choices is None:
            out[name] = (d.IntDistribution(p.low, p.high, log=p.log) if p.integer
                         else d.FloatDistribution(p.low, p.high, log=p.log))
        elif all(isinstance(c, (bool, int, float, str)) for c in p.choices):
            out[name] = d.CategoricalDistribution(p.choices)
    return out


class Record:
    """One study: the file beside results.tsv by default, or `storage` (a URL or a path) shared
    by every worker that names it and the same study name."""

    def __init__(self, results_path, storage=None, study="autoresearch", timeout=None,
                 distributions=None, heartbeat_seconds=10, grace=60, retry_seconds=120,
                 dry=False):
        """dry: write nothing (a dry run): the study is a copy in memory of results.tsv."""
        import optuna
        from autoresearch.storage import MEMORY, SharedStudy, study_location
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # not a line per worker and study
        self.location = MEMORY if dry else study_location(results_path, storage)
        self.dry = dry
        self.study = SharedStudy(self.location, study, heartbeat_seconds=heartbeat_seconds,
                                 grace=grace, retry_seconds=retry_seconds)
        self.name = study
        self.ledger = ledger_mod.Ledger(results_path)
        self.path = self.ledger.path
        self.results_dir = os.path.dirname(self.path)
        self.timeout, self.distributions = timeout, distributions
        self._reported = {}  # trial -> the CurveGrid of its running curve

    def import_results(self):
        """Seed a new, empty study with the rows of an existing results.tsv (20 or 24 columns),
        under their own trial numbers and with their curves where runs/ has their logs; returns
        how many rows. The file is kept as it was beside it (<results>.tsv.imported), then
        becomes the study's view. Done under the results directory's lock, so that workers
        starting together import once."""
        if not os.path.exists(self.path):
            return 0
        if self.dry:
            rows = self.ledger.rows()
            return self.study.import_rows(rows) if rows else 0
        with ledger_mod.directory_lock(self.results_dir):
            if self.study.has_trials():
                return 0
            rows = self.ledger.rows()
            if not rows:
                return 0
            backup = self.path + ".imported"
            if not os.path.exists(backup):
                shutil.copyfile(self.path, backup)
            return self.study.import_rows(rows, {int(r["trial"]): self._curve_points(r)
                                                 for r in rows if r.get("log")})

    def _curve_points(self, row):
        """{step: smoothed loss} of an old run's log on CurveGrid's steps, where runs/ still
        has it."""
        log_path = os.path.join(self.results_dir, row["log"])
        try:
            with open(log_path, errors="replace") as f:
                points, _ = curves.parse_progress(f.read())
        except OSError:
            return {}
        grid = CurveGrid()
        return dict(p for _, progress, loss, _ in points for p in grid.add(progress, loss))

    def recorded(self):
        return self.study.claim() or self.ledger.recorded()

    def bind(self, profile, data_name, time_budget):
        """The study is claimed for one profile, dataset and budget, like its results file."""
        self.ledger.bind(profile, data_name, time_budget)
        claim = {"profile": profile, "data": data_name, "time_budget": time_budget}
        have = self.study.claim()
        if have is None:
            self.study.set_claim(claim)
        elif have != claim:
            raise ledger_mod.LedgerError(
                f"study {self.name!r} in {self.location} holds runs of {have}, but this run is "
                f"{claim}; use another --results file in another directory, or another "
                f"--study (runs are only comparable within one profile, dataset and time "
                f"budget)")
        if not self.dry:
            self.ledger.write_claim()

    def rows(self):
        """Every finished row, as results.tsv's text; results.tsv is rewritten as the view."""
        rows = self.study.rows() if self.dry else self.study.write_view(self.path)
        return [ledger_mod.as_text(r) for r in rows]

    def running(self):
        return self.study.running()

    def reserve(self, job, rows):
        unique = ("config", "seed") if job.get("purpose") == "baseline" else ("config",)
        return self.study.reserve(job, unique=unique, timeout=self.timeout,
                                  distributions=self.distributions)

    def report(self, trial, progress, loss):
        """A progress line of a running trial: its curve goes into the study on the steps of
        CurveGrid (every REPORT_STEP percent of the budget)."""
        grid = self._reported.setdefault(trial, CurveGrid())
        for step, value in grid.add(progress, loss):
            self.study.report(trial, step, value)

    def finish(self, trial, row, details=None):
        """Keep a finished row; `details` ({name: text}) become the trial's user attributes."""
        self._reported.pop(trial, None)
        value = float(row["val_bpb"]) if row["status"] in history.FINISHED else None
        self.study.finish(trial, row, value, details)

    def optuna_study(self):
        """The optuna.Study itself, for Optuna's pruners and samplers to read."""
        return self.study.optuna_study()

    def trial(self, number):
        """A trial as the study holds it now (an optuna FrozenTrial)."""
        return self.study.frozen(number)

    def put_source(self, key, text):
        self.study.put_source(key, text)

    def get_source(self, key):
        return self.study.get_source(key)

    def close(self):
        self.study.close()


class CurveGrid:
    """A curve on fixed steps: step = percent of the budget, every REPORT_STEP, the smoothed loss
    interpolated there between the progress lines around it. Every run's curve then has the
    same steps (the dashboard draws them one over the other; Optuna's pruners compare runs step
    by step). Lines come one at a time, as a run prints them; an OOM retry starts again from 0
    and its points take the place of the first attempt's."""

    def __init__(self):
        self.last = None  # the last line's (progress, loss)

    def add(self, progress, loss):
        """The (step, value) points that this line completes."""
        last = self.last if self.last is not None and progress >= self.last[0] else None
        self.last = (progress, loss)
        if last is None:  # nothing to go from: the first step at or after this line
            first = math.ceil(100 * progress / REPORT_STEP - 1e-9) * REPORT_STEP
            first = max(first, REPORT_STEP)
            p0, v0 = progress, loss
        else:
            first = math.floor(100 * last[0] / REPORT_STEP + 1e-9) * REPORT_STEP + REPORT_STEP
            p0, v0 = last
        out = []
        for step in range(first, math.floor(100 * progress + 1e-9) + 1, REPORT_STEP):
            at = step / 100
            out.append((step, loss if progress == p0 else v0 + (loss - v0) * (at - p0) /
                        (progress - p0)))
        return out


def reporter(record, trial):
    """A per-line callback that reports a running trial's progress lines to the record."""
    def report(line):
        point = progress_of(line)
        if point is not None:
            record.report(trial, point[1], point[2])
    return report


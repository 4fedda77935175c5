"""Where runs are recorded: every run is a trial of one Optuna study, and results.tsv its view.

The study lives in Optuna's journal file beside results.tsv (results.journal) unless --storage
names another (PostgreSQL across machines; SQLite). One worker or many, the same code: the
driver asks its record for every row (in trial order, as the text fields of a results.tsv
line), for the jobs other workers are running, for a trial number for its next job, and to keep
a finished row; results.tsv is rewritten atomically as the study's view after every change.
While a run trains, its curve goes into the study as intermediate values (step = percent of the
budget, value = the smoothed train loss), and a finished trial carries what a person opens
first (its verdict, its log's tail, its train.py diff) as user attributes: optuna-dashboard
shows both. autoresearch/storage.py holds the study itself.
"""
import fcntl
import math
import os
import shutil

from autoresearch import curves, history
from autoresearch import ledger as ledger_mod

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
        self._reported = {}  # trial -> its last progress line's (progress, loss)

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
        with _locked(self.results_dir):
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
        """{percent: smoothed loss} of an old run's log, where runs/ still has it."""
        log_path = os.path.join(self.results_dir, row["log"])
        try:
            with open(log_path, errors="replace") as f:
                points, _ = curves.parse_progress(f.read())
        except OSError:
            return {}
        return {round(100 * progress): loss for _, progress, loss, _ in points}

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
        """A progress line of a running trial: its curve goes into the study at every REPORT_STEP
        percent of the budget, the smoothed loss interpolated there between the lines around
        it, so every run's curve has the same steps (the dashboard draws them one over the
        other; Optuna's pruners compare runs step by step). An OOM retry starts again from 0
        and writes over its points."""
        last = self._reported.get(trial)
        if last is not None and progress < last[0]:
            last = None  # a new attempt
        self._reported[trial] = (progress, loss)
        before = (0.0, loss) if last is None else last
        start = math.floor(100 * before[0] / REPORT_STEP) * REPORT_STEP + REPORT_STEP
        if last is None and progress * 100 >= REPORT_STEP:
            start = math.ceil(100 * progress / REPORT_STEP) * REPORT_STEP  # nothing to go from
        for step in range(start, math.floor(100 * progress + 1e-9) + 1, REPORT_STEP):
            p0, v0 = before
            at = step / 100
            value = loss if progress == p0 else v0 + (loss - v0) * (at - p0) / (progress - p0)
            self.study.report(trial, step, value)

    def finish(self, trial, row, details=None):
        """Keep a finished row; `details` ({name: text}) become the trial's user attributes."""
        self._reported.pop(trial, None)
        value = float(row["val_bpb"]) if row["status"] in history.FINISHED else None
        self.study.finish(trial, row, value, details)

    def optuna_study(self):
        """The optuna.Study itself, for Optuna's pruners and samplers to read."""
        return self.study.study

    def trial(self, number):
        """A trial as the study holds it now (an optuna FrozenTrial)."""
        return self.study.frozen(number)

    def put_source(self, key, text):
        self.study.put_source(key, text)

    def get_source(self, key):
        return self.study.get_source(key)

    def close(self):
        self.study.close()


def reporter(record, trial):
    """A per-line callback that reports a running trial's progress lines to the record."""
    from autoresearch.protocol import progress_of

    def report(line):
        point = progress_of(line)
        if point is not None:
            record.report(trial, point[1], point[2])
    return report


class _locked:
    """An exclusive lock on a directory (flock), for one-time work by one of many processes."""

    def __init__(self, directory):
        os.makedirs(directory, exist_ok=True)
        self.fd = os.open(directory, os.O_RDONLY)

    def __enter__(self):
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)

"""Where runs are recorded: results.tsv alone (one worker), or a study shared by many workers.

The driver asks its record for every row (in trial order, as the text fields of a results.tsv
line), for the jobs other workers are running, for a trial number for its next job, and to keep
a finished row. `FileRecord` is results.tsv itself. `SharedRecord` is an Optuna study in an RDB
storage (autoresearch/storage.py: SQLite on one machine, PostgreSQL across machines), with this
machine's results.tsv rewritten as a view of the whole study after every change.
"""
import os

from autoresearch import history
from autoresearch import ledger as ledger_mod


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


class FileRecord:
    shared = False

    def __init__(self, results_path):
        self.ledger = ledger_mod.Ledger(results_path)

    def recorded(self):
        return self.ledger.recorded()

    def bind(self, profile, data_name, time_budget):
        self.ledger.bind(profile, data_name, time_budget)

    def rows(self):
        return self.ledger.rows()

    def running(self):
        return []

    def reserve(self, job, rows):
        return ledger_mod.next_trial(rows)

    def finish(self, trial, row):
        self.ledger.append(row)

    def put_source(self, key, text):
        pass  # one machine: a config's train.py is in runs/<trial>/

    def get_source(self, key):
        return None

    def close(self):
        pass


class SharedRecord:
    """One study shared by every worker that names the same storage URL and study name."""
    shared = True

    def __init__(self, url, study, results_path, timeout=None, distributions=None,
                 heartbeat_seconds=10, grace=60, retry_seconds=120):
        import optuna
        from autoresearch.storage import SharedStudy
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # not a line per worker and study
        self.study = SharedStudy(url, study, heartbeat_seconds=heartbeat_seconds, grace=grace,
                                 retry_seconds=retry_seconds)
        self.url, self.name = url, study
        self.ledger = ledger_mod.Ledger(results_path)
        self.path = self.ledger.path
        self.timeout, self.distributions = timeout, distributions

    def import_results(self):
        """Seed a new, empty study with this machine's results.tsv (a single-worker run going
        on with several workers); returns how many rows. Only one process may do this, before
        the others start: `loop.py --workers` does it in its parent."""
        if not os.path.exists(self.path):
            return 0
        rows = self.ledger.rows()
        if not rows or self.study.study.trials:
            return 0
        return self.study.import_rows(rows)

    def recorded(self):
        return self.study.study.user_attrs.get("claim") or self.ledger.recorded()

    def bind(self, profile, data_name, time_budget):
        """The study is claimed for one profile, dataset and budget, like a results file."""
        claim = {"profile": profile, "data": data_name, "time_budget": time_budget}
        have = self.study.study.user_attrs.get("claim")
        if have is None:
            self.study.study.set_user_attr("claim", claim)
        elif have != claim:
            raise ledger_mod.LedgerError(
                f"study {self.name!r} holds runs of {have}, but this worker runs {claim}; use "
                f"another --study (runs are only comparable within one profile, dataset and "
                f"time budget)")
        self.ledger.bind(profile, data_name, time_budget)
        self.ledger.write_claim()

    def rows(self):
        from autoresearch.storage import sync_results_tsv
        return [ledger_mod.as_text(r) for r in sync_results_tsv(self.study, self.path)]

    def running(self):
        return self.study.running()

    def reserve(self, job, rows):
        unique = ("config", "seed") if job.get("purpose") == "baseline" else ("config",)
        return self.study.reserve(job, unique=unique, timeout=self.timeout,
                                  distributions=self.distributions)

    def finish(self, trial, row):
        value = float(row["val_bpb"]) if row["status"] in history.FINISHED else None
        self.study.finish(trial, row, value)

    def put_source(self, key, text):
        self.study.put_source(key, text)

    def get_source(self, key):
        return self.study.get_source(key)

    def close(self):
        self.study.close()

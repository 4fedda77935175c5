"""results.tsv as a view of the shared study: every finished row of every worker, in trial
order, rewritten atomically from the study."""
import os

from autoresearch import ledger
from autoresearch.ledger import StorageError

COLUMNS = ledger.COLUMNS


class ResultsView:
    """The results files one SharedStudy writes, with what it has already formatted. `shared`
    gives its finished rows (finished(), after which numbers_seen and numbers_running hold what
    that read saw) and its study_name."""

    def __init__(self, shared):
        self.shared = shared
        self._lines = {}              # trial_id -> its row as a results.tsv line
        self._views = set()           # results files checked to be views of this study

    def write(self, path):
        """Write `path` as a view of the whole study: every finished row of every worker, in trial
        order, replaced in one rename so pandas never reads a half-written file. A file holding
        rows that the study does not (another study, or runs before it) is refused, not
        overwritten. Returns the rows written (read-only)."""
        s = self.shared
        path = os.path.abspath(path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        view = s.finished()
        # Workers of one machine sync the same file one at a time. Another may have written rows
        # that finished after our read: keep its lines, so the view never goes back, rather than
        # read the study again while every other worker waits for the lock.
        with ledger.directory_lock(os.path.dirname(path)):
            header, old = _lines_in(path)
            lines, newer = self._lines_of(view, old)
            last = max(s.numbers_seen, default=-1)
            known = path in self._views  # written or checked by this process before
            if not known and any(int(t) > last for t in newer if t.isdigit()):
                # Trials beyond what we have read, in a file we do not know: read again, so a
                # results file of another run is not taken for a newer view of this study.
                view = s.finished()
                lines, newer = self._lines_of(view, old)
                last = max(s.numbers_seen, default=-1)
            foreign = [t for t in newer if not t.isdigit() or int(t) > last and not known
                       or int(t) <= last and int(t) not in s.numbers_running]
            if foreign or newer and header != COLUMNS:
                raise StorageError(
                    f"{path} holds trial(s) {', '.join((foreign or list(newer))[:5])} that study "
                    f"{s.study_name!r} does not; import them first (SharedStudy.import_rows) "
                    f"or use another results file")
            self._views.add(path)
            if header == COLUMNS and old.keys() == lines.keys():
                return [row for _, row in view]  # another worker already wrote this view
            merged = lines | newer
            text = "\t".join(COLUMNS) + "\n" + "".join(merged[t] for t in sorted(merged, key=int))
            ledger.write_atomic(path, text)
        return [row for _, row in view]

    def _lines_of(self, view, old):
        """Our rows as lines by trial number, and the file's lines of trials we have no row for."""
        lines = {}
        for trial_id, row in view:
            if trial_id not in self._lines:
                unknown = set(row) - set(COLUMNS) - set(ledger.STUDY_FIELDS)
                if unknown:
                    raise StorageError(f"trial {row['trial']}'s row carries unknown results "
                                       f"column(s): {', '.join(sorted(unknown))}")
                self._lines[trial_id] = ledger.format_row(row)
            lines[str(row["trial"])] = self._lines[trial_id]
        return lines, {t: line for t, line in old.items() if t not in lines}


def _lines_in(path):
    """A results file's header and its whole rows by trial number, whatever its columns."""
    try:
        with open(path, newline="") as f:
            lines = f.read().splitlines(keepends=True)
    except FileNotFoundError:
        return COLUMNS, {}
    if not lines:
        return COLUMNS, {}
    header = lines[0].rstrip("\n").split("\t")
    if "trial" not in header:
        raise StorageError(f"{path} does not have the results.tsv columns; is it ours?")
    at = header.index("trial")
    return header, {line.split("\t")[at]: line for line in lines[1:]
                    if line.endswith("\n") and line.count("\t") == len(header) - 1}


def sync_results_tsv(shared, path):
    """Write `path` as the view of `shared` (SharedStudy.write_view); returns its rows."""
    return shared.write_view(path)

"""Seeding a new study with the rows of a results.tsv written before it (or without one)."""
import datetime
import math

from optuna.trial import FrozenTrial, TrialState

from autoresearch import history
from autoresearch.ledger import StorageError


def import_rows(shared, rows, curves=None):
    """Seed the empty study of `shared` (a SharedStudy) with the rows of an existing results.tsv
    under their own trial numbers; numbers missing from the file are taken by withdrawn
    placeholders, so new trials never reuse one. `curves` ({trial: {step: value}}) become the
    trials' intermediate values. Run it from one process, before any other writes. Returns how
    many rows were imported."""
    curves = curves or {}
    if shared.call("reading the study", shared.storage.get_all_trials, shared.study_id,
                   deepcopy=False):
        raise StorageError(f"study {shared.study_name!r} is not empty; import only into a "
                           "new study")
    try:
        rows = sorted(rows, key=lambda r: int(r["trial"]))
    except (KeyError, TypeError, ValueError):
        raise StorageError("every imported row needs an integer `trial`") from None
    numbers = [int(r["trial"]) for r in rows]
    if len(set(numbers)) != len(numbers) or numbers and numbers[0] < 0:
        raise StorageError("imported rows repeat a trial number or have a negative one")
    at = 0
    for row in rows:
        while at <= int(row["trial"]):
            gap = at < int(row["trial"])
            shared.call("importing rows", shared.storage.create_new_trial, shared.study_id,
                        template_trial=_imported(row, gap, {} if gap else curves.get(at, {})))
            at += 1
    return len(rows)


def _imported(row, gap, curve):
    """The finished trial of an imported row, or of a withdrawn placeholder for a gap."""
    value = _float(row.get("val_bpb"))
    ok = not gap and row.get("status") in history.FINISHED and value is not None
    attrs = {"withdrawn": "gap in the imported results"} if gap else {"row": dict(row)}
    now = datetime.datetime.now()
    return FrozenTrial(
        number=-1, state=TrialState.COMPLETE if ok
        else TrialState.PRUNED if row.get("status") == "pruned"
        else TrialState.FAIL,
        value=value if ok else None, datetime_start=now,
        datetime_complete=now, params={}, distributions={},
        user_attrs=attrs | {"job": {"reservation": "imported"}},
        system_attrs={}, intermediate_values=curve, trial_id=-1)


def _float(text):
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None

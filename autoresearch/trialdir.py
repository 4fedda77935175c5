"""The one owner of runs/<trial>/, the directory each trial trains in and leaves behind:

    runs/0007/train.py        the source the trial trained (its SEED included)
    runs/0007/run.log         its output; run.oom1.log, run.oom2.log: attempts that ran out of memory
    runs/0007/curve.json      its training curve (curves.Curve), parsed from the log once
    runs/0007/edit.diff       code mode: the edit that made this train.py
    runs/0007/proposal.json   an LLM proposal's cost (tokens, seconds, how it went)

A results row finds its directory through its `log` column (run.log's path relative to the
results file), so the files stay readable however the results file is moved with its runs/.
"""
import difflib
import json
import os
import shutil

RUNS = "runs"
SOURCE = "train.py"
LOG = "run.log"
CURVE = "curve.json"
DIFF = "edit.diff"
PROPOSAL = "proposal.json"


def path(results_dir, trial):
    return os.path.join(results_dir, RUNS, f"{trial:04d}")


def fresh(results_dir, trial):
    """The trial's directory, emptied: a trial cut short by a kill starts afresh."""
    trial_dir = path(results_dir, trial)
    if os.path.exists(trial_dir):
        shutil.rmtree(trial_dir)
    return trial_dir


def of_log(results_dir, log):
    """The directory of a row whose `log` column is `log`, or None for a row without one."""
    return os.path.join(results_dir, os.path.dirname(log)) if log else None


def oom_log(trial_dir, attempt):
    return os.path.join(trial_dir, f"run.oom{attempt}.log")


def read_source(results_dir, log):
    """The train.py a row's run trained, or None where it is not on this machine."""
    if not log:
        return None
    try:
        with open(os.path.join(of_log(results_dir, log), SOURCE)) as f:
            return f.read()
    except FileNotFoundError:
        return None  # run on another machine, or runs/ was cleaned up


def write_diff(log_path, diff):
    with open(os.path.join(os.path.dirname(log_path), DIFF), "w") as f:
        f.write(diff)


def write_proposal(results_dir, trial, meta):
    trial_dir = path(results_dir, trial)
    os.makedirs(trial_dir, exist_ok=True)
    with open(os.path.join(trial_dir, PROPOSAL), "w") as f:
        json.dump(meta, f, indent=1)


def read_proposal(results_dir, log):
    """A row's proposal.json as a dict, or None where it has none."""
    if not log:
        return None
    proposal = os.path.join(of_log(results_dir, log), PROPOSAL)
    if not os.path.exists(proposal):
        return None
    with open(proposal) as f:
        return json.load(f)


def curve(results_dir, log, keep=True):
    """A row's training curve (curves.Curve), or None where its log is not on this machine.
    curve.json spares parsing the log again; `keep` writes it when it is missing or older than
    the checkpoints (the loop does; a report only reads)."""
    from autoresearch import curves
    if not log:
        return None
    saved = os.path.join(of_log(results_dir, log), CURVE)
    try:
        with open(saved) as f:
            found = curves.Curve.from_dict(json.load(f))
        if found.checkpoints is not None:  # (older files lack them: read the log again)
            return found
    except (FileNotFoundError, ValueError):
        pass
    log_path = os.path.join(results_dir, log)
    if not os.path.exists(log_path):
        return None
    found = curves.curve_of_log(log_path)
    if keep:
        try:
            with open(saved, "w") as f:
                json.dump(found.as_dict(), f)
        except OSError:
            pass
    return found


def tail(log_path, lines=40, max_chars=4000):
    """The last lines of a run's log (what a person reads first about a run), or ""."""
    if not log_path:
        return ""
    try:
        with open(log_path, errors="replace") as f:
            text = "".join(f.readlines()[-lines:])
    except OSError:
        return ""
    return text[-max_chars:]


def diff(before, after, name_before, name_after, max_chars=20000):
    """A unified diff of two train.py sources ("" when they are the same)."""
    text = "".join(difflib.unified_diff(before.splitlines(keepends=True),
                                        after.splitlines(keepends=True), name_before, name_after))
    return text if len(text) <= max_chars else text[:max_chars] + "\n... (cut)\n"

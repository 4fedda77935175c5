"""`loop.py recheck`: how much of the recorded gain survives fresh SEEDs. The baseline and the
incumbent are re-run, interleaved, as rows of strategy `recheck`, through the driver's own
execution and record (so they count as any run does)."""
from autoresearch.errors import LoopError
from autoresearch.record import reporter
from autoresearch.stopping import watched


def recheck(driver, runs=3, on_line=None):
    """Re-run the baseline and the incumbent `runs` times each with SEEDs neither has used;
    returns the recorded and the rechecked gain, and the share retained."""
    base, inc = driver.baseline(), driver.incumbent
    if base is None or inc is None:
        raise LoopError("nothing to recheck: the results hold no baseline yet")
    if base.id == inc.id:
        raise LoopError("nothing to recheck: the baseline is still the incumbent")
    recorded = base.mean - inc.mean
    before = {base.id: base.n, inc.id: inc.n}
    rows = []
    for k in range(runs):
        for config, who in ((base, "baseline"), (inc, "incumbent")):
            config = driver.configs[config.id]
            job = driver.schedule.rerun_job(config, "recheck", driver.standing)
            job.description = f"recheck {k + 1}/{runs} of the {who} ({config.id})"
            trial = driver.record.reserve(driver.schedule.job_attrs(job), driver.rows)
            if trial is None:
                raise LoopError(f"another worker is running config {config.id}; recheck "
                                f"when the workers have stopped")
            outcome, source, oom_retry = driver.execution.run(
                trial, job, watched(on_line, None, reporter(driver.record, trial)))
            row, _ = driver.tell(job, trial, outcome, source, oom_retry=oom_retry)
            rows.append(row)
            driver.log(driver.trial_line(row))
            if outcome.error == "interrupted":
                raise KeyboardInterrupt
    fresh = {cid: [float(r["val_bpb"]) for r in rows
                   if r["config"] == cid and r["status"] != "crash"] for cid in before}
    if not fresh[base.id] or not fresh[inc.id]:
        raise LoopError("the recheck runs crashed; see their rows in the results")
    again = _mean(fresh[base.id]) - _mean(fresh[inc.id])
    return {"recorded_gain": recorded, "recorded_runs": before, "rechecked_gain": again,
            "rechecked_runs": {k: len(v) for k, v in fresh.items()},
            "retained": again / recorded if recorded else None,
            "baseline": base.id, "incumbent": inc.id, "noise": driver.noise}


def _mean(values):
    return sum(values) / len(values)

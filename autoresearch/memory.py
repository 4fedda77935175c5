"""Crash awareness: learn from out-of-memory failures which configurations will not fit, and
shrink the micro-batch of a candidate before it runs instead of after it crashes.

Two sources of evidence, both in results.tsv: runs that crashed with `oom`, and runs whose OOM
retry halved DEVICE_BATCH_SIZE (the larger size failed). A candidate is
predicted to run out of memory when it is at least as large as a failed configuration in every
size constant they share (micro-batch, depth, width, head size): memory grows with each of them,
so such a candidate cannot fit where the smaller one did not.
"""
SIZE_CONSTANTS = ("DEVICE_BATCH_SIZE", "DEPTH", "ASPECT_RATIO", "HEAD_DIM")


def oom_observations(runs):
    """Size constants of every configuration known to have run out of memory (history.Run
    records)."""
    seen = []
    for r in runs:
        if not r.params or r.kind == "code":  # other code, other memory: no lesson here
            continue
        sizes = {k: r.params[k] for k in SIZE_CONSTANTS if isinstance(r.params.get(k), (int, float))}
        if r.status == "crash" and r.error == "oom":
            seen.append(sizes)
        if r.oom_retry:  # it ran at the final size; twice that failed
            seen.append(sizes | {"DEVICE_BATCH_SIZE": 2 * r.oom_retry[1]})
    return [s for s in seen if s]


def predicted_oom(params, observations):
    """The failed configuration that `params` is at least as large as, or None."""
    for failed in observations:
        shared = [k for k in failed if isinstance(params.get(k), (int, float))]
        if "DEVICE_BATCH_SIZE" in shared and all(params[k] >= failed[k] for k in shared):
            return failed
    return None


def shrink_to_fit(params, observations, min_micro=1):
    """params with DEVICE_BATCH_SIZE halved until no failure predicts an OOM (gradient
    accumulation keeps TOTAL_BATCH_SIZE), or None if even the smallest is predicted to fail."""
    params = dict(params)
    while predicted_oom(params, observations):
        micro = params.get("DEVICE_BATCH_SIZE")
        if not isinstance(micro, int) or micro // 2 < min_micro:
            return None
        params["DEVICE_BATCH_SIZE"] = micro // 2
    return params

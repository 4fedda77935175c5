"""A sandbox around each trial, so that code written by a model cannot reach the network, write
outside its trial directory, read the validation split or a secret, or leave processes behind.

    box = sandbox.choose("auto", log=print)     # says what it is; "on" refuses to run without
    runner.run_trial(..., sandbox=box)

Isolated (bubblewrap works here: Linux with user namespaces, or root): the trainer runs under
`bwrap` with no network (its own empty network namespace), a read-only view of the filesystem
with fresh, read-only /tmp and /run, write access only to its trial directory and the compile
cache, the data cache hidden except a train-only view of the prepared dataset, secret files in
$HOME hidden, its own pid namespace (nothing it forks outlives it), no capabilities, and GPU
device nodes passed through.

Fallback (no bwrap, or user namespaces blocked, e.g. some containers and macOS): no isolation of
network or files; still the train-only view of the data (by path, not enforced), the filtered
environment, the resource limits and the removal of every process the trial leaves behind. It is
announced, never silent.

In both, a small supervisor (supervisor.py) starts the trainer as the subreaper of everything it
forks, reports to the loop over a pipe the trainer does not hold whether anything outlived it,
and removes what did. Resource limits (setrlimit) cap the data segment (a runaway allocation
fails as an oom, which the loop retries with a smaller batch), file size, core dumps and, for a
non-root user, processes.

The package: isolation.py (the Sandbox: one trial's launch, bubblewrap's argv, the refusals),
probing.py (finding and checking bwrap, choosing a sandbox), limits.py (setrlimit), reaping.py
(what outlives a trial) and supervisor.py (run as a script, importing nothing from here).
"""
# Re-exported for `from autoresearch.sandbox import X`. A test that patches a name patches it in
# the module that defines it (sandbox.isolation.GPU_DEVICES), where the code reads it.
from autoresearch.sandbox.isolation import (GPU_DEVICES, SECRET_PATHS, SHM_BYTES, SUPERVISOR,
                                            TRAIN_FILES, Launch, Sandbox)
from autoresearch.sandbox.limits import Limits
from autoresearch.sandbox.probing import (FLASH_ATTENTION_3, MODES, SandboxError, choose,
                                          find_bwrap, prefetch_flash_attention, probe)
from autoresearch.sandbox.reaping import TRIAL_ENV, Report, die_with_parent

__all__ = ["FLASH_ATTENTION_3", "GPU_DEVICES", "MODES", "SECRET_PATHS", "SHM_BYTES", "SUPERVISOR",
           "TRAIN_FILES", "TRIAL_ENV", "Launch", "Limits", "Report", "Sandbox", "SandboxError",
           "choose", "die_with_parent", "find_bwrap", "prefetch_flash_attention", "probe"]

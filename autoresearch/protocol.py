"""The trainer-loop protocol in one place: what train.py prints (progress lines, the summary block,
FAIL lines), how the runner reads it (an out-of-memory, an exception that ran into a sandbox
rule), how a crash reason is worded, and which lines of train.py code mode may not touch. The
runner, the contract checks (edits.py) and the sandbox use it.

The score itself does not travel through stdout: the fixed evaluation (prepare.FixedEval) runs in
the loop's process and talks to the trainer over a socket (see prepare.py); the printed val_bpb
must only agree with it.
"""
import math
import re

SUMMARY_KEYS = ("val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent",
                "total_tokens_M", "num_steps", "num_params_M", "depth")
FAIL_REASONS = ("nan", "diverged", "oom", "error")

# Lines of the base train.py that a code edit must leave as they are (matched per line).
PROTECTED = (
    re.compile(r"^(MAX_SEQ_LEN|TIME_BUDGET|FIXED_STEPS|PROFILE)\s*="),  # the profile's constants
    re.compile(r"\bload_prepared\("),                                   # the prepared data
    re.compile(r"\.evaluate_bpb\("),                                    # the metric
    re.compile(r"""print\(f?["']val_bpb:"""),                           # its report
)

EVAL_FD_ENV = "AUTORESEARCH_EVAL_FD"  # prepare.EVAL_FD_ENV: the evaluation socket's fd

# train.py's progress line: `step N | progress P | loss L | ... | tok/s X | ...` (loss smoothed)
PROGRESS = re.compile(r"^step (\d+) \| progress ([\d.]+) \| loss ([^ |]+)(?: .*?\| tok/s ([\d,.]+))?")
FAIL = re.compile(r"^FAIL: (\w+)")
EXCEPTION = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b.*)$")
# How running out of memory reads in a trainer's output, lowercased: CUDA's "out of memory",
# PyTorch's CPU allocator ("can't allocate memory"), a MemoryError (numpy's _ArrayMemoryError too).
OOM_TEXT = ("out of memory", "can't allocate memory", "memoryerror")
# What a trainer's last exception says when it ran into one of the sandbox's rules. Whether a
# match is a refusal (an isolated trial, which rules apply) is the sandbox's call (refusal()).
FILE_TOO_LARGE = re.compile(r"Errno 27\]|File too large")  # EFBIG: Python ignores SIGXFSZ
READ_ONLY = re.compile(r"Errno 30\]|Read-only file system")
NETWORK = re.compile(r"ConnectionRefused|Network is unreachable|Errno (101|111|113)\]|gaierror|"
                     r"[Nn]ame or service not known|[Tt]emporary failure in name resolution|"
                     r"No address associated|NewConnectionError|Max retries exceeded|URLError|"
                     r"ConnectionError|Cannot assign requested address")
VAL_FILES = re.compile(r"\bval\.(bin|idx\.npy)\b")


def contract(reason):
    """The crash reason of a trial that broke the contract with the loop."""
    return f"error: contract: {reason}"


def refused(rule, detail=""):
    """The crash reason of a trial that tried what the sandbox forbids; `rule` names the rule."""
    return f"error: sandbox: {rule}" + (f" ({detail})" if detail else "")


def progress_point(line):
    """(step, progress 0..1, loss, tok/s or None) from a train.py progress line, else None (also
    for a loss that is not a number)."""
    m = PROGRESS.match(line)
    if not m:
        return None
    try:
        loss = float(m.group(3))
    except ValueError:
        return None
    if not math.isfinite(loss):
        return None
    tok_s = float(m.group(4).replace(",", "")) if m.group(4) else None
    return int(m.group(1)), float(m.group(2)), loss, tok_s


def progress_of(line):
    """(step, progress 0..1, loss) from a train.py progress line, else None."""
    point = progress_point(line)
    return point[:3] if point else None


def parse_summary(lines):
    """The key: value block after the last '---' line, or {} if there is none."""
    try:
        start = len(lines) - 1 - lines[::-1].index("---")
    except ValueError:
        return {}
    summary = {}
    for line in lines[start + 1:]:
        key, sep, value = line.partition(":")
        if sep and key and not key.startswith(" "):
            summary[key.strip()] = value.strip()
    return summary


def summary_blocks(lines):
    """How many summary blocks the output holds (a `val_bpb:` line at column 0 starts one)."""
    return sum(1 for line in lines if line.startswith("val_bpb:"))


def fail_reason(lines):
    """The reason of the last `FAIL: <reason> <detail>` line as a crash reason, or None."""
    fails = [line[6:].strip() for line in lines if line.startswith("FAIL: ")]
    if not fails:
        return None
    reason, _, detail = fails[-1].partition(" ")
    if reason not in FAIL_REASONS:
        reason, detail = "error", fails[-1]
    return reason if reason != "error" else f"error: {detail}".strip()


def last_exception(lines):
    """The last line that looks like a Python exception (`ValueError: ...`), or None."""
    found = [m.group(1) for line in lines if (m := EXCEPTION.match(line))]
    return found[-1] if found else None


def is_oom(lines):
    """Whether the last 50 lines of a failed trainer's output say it ran out of memory."""
    text = "\n".join(lines[-50:]).lower()
    return any(phrase in text for phrase in OOM_TEXT)


def fork_refused(exception):
    """Whether an exception says a fork failed with EAGAIN, as it does past RLIMIT_NPROC."""
    return "Resource temporarily unavailable" in exception and "fork" in exception.lower()

"""What a person watching the loop sees: a progress bar whose postfix follows the running trial
(step, smoothed loss, the incumbent's mean), and one line per finished run."""
import time

from autoresearch.protocol import progress_of


class Progress:
    """The bar over `trials` runs (None: open-ended); `best()` gives the incumbent's value."""

    def __init__(self, trials, enabled, best):
        from tqdm.auto import tqdm
        self.bar = tqdm(total=trials, disable=not enabled, unit="run", dynamic_ncols=True)
        self.best = best
        self.last_refresh = 0.0
        # a terminal redraws cheaply; a log file or a notebook gets a line every 30 s at most
        self.interval = 0.5 if getattr(self.bar, "fp", None) is not None \
            and _is_tty(self.bar.fp) else 30.0

    def on_line(self, line):
        """The running trial's step and loss, at a readable pace."""
        p = progress_of(line)
        if p and time.time() - self.last_refresh >= self.interval:
            self.last_refresh = time.time()
            best = self.best()
            self.bar.set_postfix(incumbent=f"{best:.6f}" if best else "-", step=p[0],
                                 loss=f"{p[2]:.3f}")

    def finished(self, row, line):
        self.bar.update(1)
        self.bar.set_description(f"trial {row['trial']}")
        self.bar.write(line)

    def close(self):
        self.bar.close()


def trial_line(row, incumbent, reason=""):
    """One line per run: its status and value, its config and where its race stands."""
    inc = incumbent
    value = float(row["val_bpb"])
    head = (f"trial {row['trial']:>4} {row['status']:>7} "
            f"{'val_bpb ' + format(value, '.6f') if row['status'] not in ('crash', 'pruned') else row['error']}")
    where = f"config {row['config']} run {row['runs']}"
    if row["status"] != "crash" and row["runs"] > 1:
        where += f" mean {float(row['mean_bpb']):.6f}"
    if inc is not None and inc.id != row["config"]:
        where += f" | incumbent {inc.mean:.6f} over {inc.n}"
    text = f"{head} | {where} | {row['description']}"
    if reason and row["status"] not in ("crash", "pruned") and reason not in ("the incumbent", "not the incumbent"):
        text += f" | {reason}"
    return text[:300]


def _is_tty(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False

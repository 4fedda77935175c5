"""train.py as the incumbent: read it, see its constants as they run, restore it after a crash or
another worker's keep, write a keep into it, and commit (or hash) what ran.
"""
from autoresearch import history, trialdir
from autoresearch import ledger as ledger_mod
from autoresearch.errors import LoopError
from autoresearch.patch import patch_constants, read_constants
from autoresearch.ratchet import RatchetError, source_hash
from autoresearch.space import PROFILE_NAMES


def effective_constants(source, profile):
    """train.py's literal constants, with None replaced by the profile's default."""
    return {n: (profile.train[n] if v is None and n in profile.train else v)
            for n, v in read_constants(source).items()}


def constraint_context(source, profile):
    """What the search space's constraints see: the constants as they run and the profile's."""
    return effective_constants(source, profile) | dict(zip(
        PROFILE_NAMES, (profile.max_seq_len, profile.time_budget, profile.eval_tokens,
                        profile.vocab_size)))


class Workspace:
    """The working tree's train.py (train_path) for a loop over the searched constants `names`;
    runs' own copies are found through the results directory and the record."""

    def __init__(self, train_path, results_dir, profile, names, record, code_mode=False,
                 ratchet=None, log=print):
        self.train_path, self.results_dir, self.profile = train_path, results_dir, profile
        self.names, self.record, self.code_mode = names, record, code_mode
        self.ratchet, self.log = ratchet, log

    def effective(self, source):
        return effective_constants(source, self.profile)

    def context(self, source):
        return constraint_context(source, self.profile)

    def current_source(self):
        with open(self.train_path) as f:
            return f.read()

    def searched(self, source):
        eff = self.effective(source)
        return {n: eff[n] for n in self.names}

    def fingerprint(self, source):
        return history.code_fingerprint(source, self.names, self.profile.train)

    def config_of(self, params, source):
        return history.config_id(params, self.fingerprint(source))

    def source_of(self, config, runs):
        """The train.py a config trains (SEED as its first run had it), or None if lost."""
        first = next((r for r in runs if r.config == config.id and r.row.get("log")), None)
        here = trialdir.read_source(self.results_dir, first.row["log"]) if first else None
        if here is not None:
            return here
        shared = self.record.get_source(config.id)
        if shared is not None:
            return shared
        if config.kind == "code" or self.code_mode:
            return None  # edited code that is no longer on disk cannot be re-created
        current = self.current_source()
        now = self.searched(current)
        return patch_constants(current, {k: v for k, v in config.params.items() if now.get(k) != v})

    def restore(self, incumbent, runs, base_seed):
        """Put the incumbent back into train.py where it drifted (a hand edit, a crash before a
        keep was written, another worker's keep)."""
        if incumbent is None:
            return
        current = self.current_source()
        if self.code_mode:  # a code edit kept by a loop that died before writing its row
            want = self.source_of(incumbent, runs)
            if want is not None and self.fingerprint(want) != self.fingerprint(current):
                ledger_mod.write_atomic(self.train_path, patch_constants(want, {"SEED": base_seed}))
                self.log(f"restored train.py to the incumbent's code (config {incumbent.id})")
                return
        now = self.searched(current)
        drift = {n: v for n, v in incumbent.params.items() if now.get(n) != v}
        if drift:
            ledger_mod.write_atomic(self.train_path, patch_constants(current, drift))
            self.log(f"restored train.py to the incumbent (config {incumbent.id}, mean val_bpb "
                     f"{incumbent.mean:.6f} over {incumbent.n} runs): {', '.join(sorted(drift))}")

    def write_defaults(self):
        """Write the profile's values into train.py where its constants say None, so that the
        file shows the recipe that runs (to a reader, and to a model editing it in code mode).
        The config ids do not change (code_fingerprint). Returns the names written."""
        source = self.current_source()
        missing = {n: self.profile.train[n] for n, v in read_constants(source).items()
                   if v is None and n in self.profile.train}
        if missing:
            filled = patch_constants(source, missing)
            ledger_mod.write_atomic(self.train_path, filled)
            if self.ratchet is not None:  # keeps the tree clean for the ratchet's next start
                self.commit(filled, True, f"train.py: the {self.profile.name} profile's values "
                                          f"where it said None")
        return sorted(missing)

    def keep(self, source, base_seed):
        """A new incumbent into train.py, atomically, with the loop's base SEED."""
        ledger_mod.write_atomic(self.train_path, patch_constants(source, {"SEED": base_seed}))

    def commit(self, source, keep, message):
        """The row's commit: the git commit in --git mode (a keep moves the branch), else a
        short hash of the trial's train.py."""
        if self.ratchet is None:
            return source_hash(source)
        try:
            return self.ratchet.commit(source, keep, message)
        except RatchetError as e:
            raise LoopError(str(e)) from None

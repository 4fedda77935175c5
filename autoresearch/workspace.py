"""train.py as the incumbent: read it, see its constants as they run, restore it after a crash or
another worker's keep, and commit (or hash) what ran. A part of the Driver (driver.py), which
holds the state it reads: train_path, profile, names, runs, incumbent, record, code_mode,
base_seed, ratchet.
"""
from autoresearch import history, trialdir
from autoresearch import ledger as ledger_mod
from autoresearch.errors import LoopError
from autoresearch.patch import patch_constants, read_constants
from autoresearch.ratchet import RatchetError, source_hash
from autoresearch.space import PROFILE_NAMES


class Workspace:
    """Mixed into Driver: its methods use the driver's state (see the module's docstring)."""

    def effective(self, source):
        """train.py's literal constants, with None replaced by the profile's default."""
        return {n: (self.profile.train[n] if v is None and n in self.profile.train else v)
                for n, v in read_constants(source).items()}

    def context(self, source):
        p = self.profile
        return self.effective(source) | dict(zip(PROFILE_NAMES, (p.max_seq_len, p.time_budget,
                                                                 p.eval_tokens, p.vocab_size)))

    def current_source(self):
        with open(self.train_path) as f:
            return f.read()

    def searched(self, source):
        eff = self.effective(source)
        return {n: eff[n] for n in self.names}

    def fingerprint(self, source):
        return history.code_fingerprint(source, self.names)

    def config_of(self, params, source):
        return history.config_id(params, self.fingerprint(source))

    def source_of(self, config):
        """The train.py a config trains (SEED as its first run had it), or None if lost."""
        first = next((r for r in self.runs if r.config == config.id and r.row.get("log")), None)
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

    def _restore_incumbent(self):
        inc = self.incumbent
        if inc is None:
            return
        current = self.current_source()
        if self.code_mode:  # a code edit kept by a loop that died before writing its row
            want = self.source_of(inc)
            if want is not None and self.fingerprint(want) != self.fingerprint(current):
                ledger_mod.write_atomic(self.train_path,
                                        patch_constants(want, {"SEED": self.base_seed}))
                self.log(f"restored train.py to the incumbent's code (config {inc.id})")
                return
        now = self.searched(current)
        drift = {n: v for n, v in inc.params.items() if now.get(n) != v}
        if drift:
            ledger_mod.write_atomic(self.train_path, patch_constants(current, drift))
            self.log(f"restored train.py to the incumbent (config {inc.id}, mean val_bpb "
                     f"{inc.mean:.6f} over {inc.n} runs): {', '.join(sorted(drift))}")

    def _commit(self, source, keep, message):
        if self.ratchet is None:
            return source_hash(source)
        try:
            return self.ratchet.commit(source, keep, message)
        except RatchetError as e:
            raise LoopError(str(e)) from None

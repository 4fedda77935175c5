"""Karpathy's git ratchet (--git): a branch autoresearch/<tag> with one commit per keep, val_bpb
in the message. The results' `commit` column holds that commit (for other runs, the commit they
were tried against); without --git it holds a short hash of the trial's train.py."""
import hashlib
import os
import subprocess
import time


class RatchetError(RuntimeError):
    """git refused something the user must sort out (uncommitted changes, no repository)."""


class GitRatchet:
    def __init__(self, train_path, tag=None, log=print):
        self.train_path = train_path
        self.repo = os.path.dirname(train_path)
        self.name = os.path.basename(train_path)
        tag = tag or time.strftime("%b%d").lower()
        self.branch = f"autoresearch/{tag}"
        self.git("rev-parse", "--git-dir")
        if self.git("status", "--porcelain", "--", self.name):
            raise RatchetError(f"{self.name} has uncommitted changes; commit or stash them before --git")
        if self.git("branch", "--list", self.branch):
            if self.git("rev-parse", "--abbrev-ref", "HEAD") != self.branch:
                self.git("checkout", self.branch)
        else:
            self.git("checkout", "-b", self.branch)
        log(f"git: ratchet on branch {self.branch}")

    def git(self, *args):
        proc = subprocess.run(["git", *args], cwd=self.repo, capture_output=True, text=True)
        if proc.returncode:
            raise RatchetError(f"git {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout.strip()

    def commit(self, source, keep, message):
        """The commit a run is recorded against; a keep (train.py already written) commits."""
        if keep:
            self.git("add", self.name)
            if self.git("status", "--porcelain", "--", self.name):
                self.git("commit", "-q", "-m", message[:200])
        return self.git("rev-parse", "--short", "HEAD")


def source_hash(source):
    return hashlib.sha1(source.encode()).hexdigest()[:7]

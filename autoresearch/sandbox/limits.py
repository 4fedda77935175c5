"""The resource limits of a trial (setrlimit): the data segment (a runaway allocation fails as an
oom, which the loop retries with a smaller batch), file size, core dumps and, for a non-root
user, processes."""
import glob
import os
import resource
from dataclasses import dataclass

from autoresearch import config


def gib(n):
    return f"{n / 2**30:.1f} GiB"


@dataclass
class Limits:
    """setrlimit values for a trial (None: not limited)."""
    memory: int = None      # RLIMIT_DATA, bytes: heap and private writable mappings
    file_size: int = None   # RLIMIT_FSIZE, bytes per file written
    processes: int = None   # RLIMIT_NPROC, tasks beyond the user's current ones (not for root)

    @classmethod
    def default(cls):
        """80% of RAM for data, except next to an NVIDIA driver: RLIMIT_AS is known to break
        CUDA (it reserves terabytes of address space), and whether RLIMIT_DATA spares CUDA's
        mappings has not been measured here, so GPU hosts rely on the GPU's own out-of-memory
        errors unless AUTORESEARCH_MEMORY_GB asks for a limit. 16 GiB per file; 4096 tasks."""
        gb = config.memory_limit_gb()
        if gb:
            memory = int(float(gb) * 2**30) if float(gb) > 0 else None
        elif glob.glob("/dev/nvidia[0-9]*"):
            memory = None
        else:
            memory = int(0.8 * _physical_memory()) or None
        return cls(memory=memory, file_size=16 << 30, processes=4096)

    def describe(self):
        return (f"memory {gib(self.memory) if self.memory else 'unlimited'}, file size "
                f"{gib(self.file_size) if self.file_size else 'unlimited'}, no core dumps")

    def apply(self, tasks_now=0):
        """In the trial's first process, before exec: soft and hard, so it cannot raise them.
        (Runs between fork and exec: it imports nothing.)"""
        pairs = [(resource.RLIMIT_CORE, 0)]
        if self.memory:
            pairs.append((resource.RLIMIT_DATA, self.memory))
        if self.file_size:
            pairs.append((resource.RLIMIT_FSIZE, self.file_size))
        if self.processes and os.getuid() != 0 and hasattr(resource, "RLIMIT_NPROC"):
            pairs.append((resource.RLIMIT_NPROC, tasks_now + self.processes))
        for which, value in pairs:
            soft, hard = resource.getrlimit(which)
            if hard != resource.RLIM_INFINITY:
                value = min(value, hard)
            try:
                resource.setrlimit(which, (value, value))
            except (ValueError, OSError):
                pass


def _physical_memory():
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def tasks_of_user():
    """How many tasks (threads included) the current user runs: RLIMIT_NPROC counts them all."""
    if os.getuid() == 0 or not os.path.isdir("/proc"):
        return 0
    n = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.stat(f"/proc/{pid}").st_uid == os.getuid():
                    n += len(os.listdir(f"/proc/{pid}/task"))
            except OSError:
                pass
    return n

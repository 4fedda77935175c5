"""The error the loop raises for what a user must fix (loop.py prints it and exits 2)."""


class LoopError(RuntimeError):
    """Something the user must fix before the loop can go on."""

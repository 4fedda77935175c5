"""The loop's machinery, one job per module: space, patch, proposers, runner, judge, ledger,
driver (which wires them) and report. loop.py is the command line over them."""

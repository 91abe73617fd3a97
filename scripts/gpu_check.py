#!/usr/bin/env python3
"""Check the CuPy backend on a GPU, in one command, and print a table.

    python scripts/gpu_check.py --text gpu_data/shakespeare.npy      # about 3 minutes on an H200
    python scripts/gpu_check.py --budget 200 --no-compile

The checks live in nanogpt_np/gpucheck/ (one file per section; its docstring lists
them). This script adds the PyTorch reference, benchmarks/torch_twin.py, which the
package itself never imports, and runs each section in its own process through
this same file.
"""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run this checkout's package, even where another copy is installed

from benchmarks import torch_twin  # noqa: E402
from nanogpt_np.gpucheck import settings  # noqa: E402
from nanogpt_np.gpucheck.runner import main  # noqa: E402
from nanogpt_np.gpucheck.table import ROWS  # noqa: E402,F401  (an in-process run's rows, for callers)

settings.TWIN = torch_twin
settings.SECTION_COMMAND = [os.path.abspath(__file__)]

if __name__ == "__main__":
    sys.exit(main())

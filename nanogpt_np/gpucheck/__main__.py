"""python -m nanogpt_np.gpucheck: the checks without the PyTorch reference rows
(scripts/gpu_check.py is the full run)."""
import sys

from .runner import main

sys.exit(main())

"""Train GPT-2 with nanogpt_np. The logic lives in nanogpt_np/train.py.

    python3 scripts/train.py --preset tiny          # minutes on a CPU, built-in corpus
    python3 scripts/train.py --data-dir edu_fineweb10B --backend cupy   # build-nanogpt's run
"""
import os
import sys

# run this checkout's package, even where another copy is installed
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanogpt_np.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

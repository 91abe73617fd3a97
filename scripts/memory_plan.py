"""Print the memory plan of a training run (what scripts/train.py prints at start-up),
and, with --measure, the peak a CPU float32 step really reaches.

    python3 scripts/memory_plan.py --preset 124M --batch-size 1
    python3 scripts/memory_plan.py --preset 350M --batch-size 1 --measure --recompute
    python3 scripts/memory_plan.py --preset 124M --batch-size auto --memory-gib 16

It takes train.py's flags (--preset, --batch-size, --block-size, --recompute, --zero,
--memory-gib, --dtype ...); nothing is allocated unless --measure.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanogpt_np import memory  # noqa: E402
from nanogpt_np.config import GPTConfig  # noqa: E402
from nanogpt_np.cpu import num_threads  # noqa: E402
from nanogpt_np.train import parse_args  # noqa: E402


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    measure = "--measure" in argv
    ranks = 1
    if "--ranks" in argv:  # plan for this many ranks (ZeRO's share, the accumulation)
        i = argv.index("--ranks")
        ranks = int(argv[i + 1])
        del argv[i : i + 2]
    cfg = parse_args([a for a in argv if a != "--measure"])
    config = GPTConfig(block_size=cfg.block_size, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer,
                       n_head=cfg.n_head, n_embd=cfg.n_embd)
    available = memory.available_memory(None, cfg.memory_gib)

    def plan_for(B):
        return memory.training_plan(config, cfg, B, ranks, cfg.dtype or "float32", available, threads=num_threads())

    B = cfg.batch_size
    if B == "auto":
        B, plan = memory.auto_batch_size(config, cfg.block_size, cfg.total_batch_size, ranks, plan_for)
        if B is None:
            print(plan.table())
            sys.exit("error: not even B=1 fits")
        print(f"--batch-size auto: B={B} ({cfg.total_batch_size // (B * cfg.block_size * ranks)} micro-steps x "
              f"{ranks} rank(s) = {cfg.total_batch_size:,} tokens per step)")
    plan = plan_for(B)
    print(f"{memory.parameter_count(config):,} parameters, B={B}, T={cfg.block_size}")
    print(plan.table())
    if measure:
        peak, seconds = memory.measure_peak(config, B, cfg.block_size, cfg.recompute)
        print(f"measured: peak {peak / memory.GIB:.3f} GiB (plan {plan.total / memory.GIB:.3f} GiB, "
              f"{100 * (plan.total - peak) / peak:+.1f}%), {seconds:.2f} s per step (median of 2, float32, CPU)")


if __name__ == "__main__":
    main()

"""Fitting the run to the machine (FittingMixin of Trainer): the memory plan printed
at start-up and --batch-size auto (nanogpt_np/memory.py computes both)."""
import dataclasses

import numpy as np

from .. import memory
from ..cpu import num_threads
from .errors import ConfigError


class FittingMixin:
    """Reads self.cfg, self.model_config, self.precision, self.dist, self.xp."""

    def memory_plan(self, B, available=None):
        if available is None:
            available = memory.available_memory(self.xp, self.cfg.memory_gib)
        return memory.training_plan(self.model_config, self.cfg, B, self.dist.world_size, self.precision,
                                    available, threads=num_threads() if self.xp is np else 1)

    def resolve_batch_size(self):
        """--batch-size auto -> the largest B that divides the tokens per step and whose
        plan fits; self.cfg gets it. A GPU then confirms it with one trial step
        (confirm_batch_on_gpu)."""
        cfg = self.cfg
        if cfg.batch_size != "auto":
            return
        if cfg.total_batch_size is None:
            raise ConfigError("--batch-size auto needs --total-batch-size (the tokens per step B must divide)")
        available = memory.available_memory(self.xp, cfg.memory_gib)
        B, plan = memory.auto_batch_size(self.model_config, cfg.block_size, cfg.total_batch_size,
                                         self.dist.world_size, lambda b: self.memory_plan(b, available))
        if B is None:
            if not memory.batch_candidates(cfg.total_batch_size, cfg.block_size, self.dist.world_size):
                raise ConfigError(f"--total-batch-size {cfg.total_batch_size} is not divisible by T*ranks = "
                                  f"{cfg.block_size}*{self.dist.world_size}; no micro-batch can make it up")
            raise ConfigError(f"--batch-size auto: not even B=1 fits in {plan.available / memory.GIB:.1f} GiB "
                              f"({plan.total / memory.GIB:.2f} GiB needed); try --recompute, --zero 1 with more "
                              f"ranks, a smaller model, or --memory-gib if more memory is free\n{plan.table()}")
        self.cfg = dataclasses.replace(cfg, batch_size=B)
        self.auto_batch = True

    def confirm_batch_on_gpu(self):
        """On a GPU, one forward + backward at the chosen B (then the pool is freed); an
        out-of-memory halves B to the next candidate and tries again."""
        if not getattr(self, "auto_batch", False) or self.xp is np:
            return
        cfg, xp = self.cfg, self.xp
        candidates = [b for b in memory.batch_candidates(cfg.total_batch_size, cfg.block_size, self.dist.world_size)
                      if b <= cfg.batch_size]
        for B in candidates:
            try:
                tokens = xp.zeros((B, cfg.block_size), dtype=xp.int64)
                self.model.zero_grad()
                self.model.forward(tokens, tokens)
                self.model.backward()
                break
            except xp.cuda.memory.OutOfMemoryError:
                self.log(f"--batch-size auto: B={B} ran out of GPU memory in the trial step; trying a smaller B")
            finally:
                self.model.zero_grad()
                xp.get_default_memory_pool().free_all_blocks()
        else:
            raise ConfigError("--batch-size auto: even B=1 runs out of GPU memory")
        self.cfg = dataclasses.replace(cfg, batch_size=B)

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
        plan fits; self.cfg gets it. Without a --total-batch-size (the tiny preset: the
        tokens per step follow B), the largest B up to the preset's that fits. A GPU
        then confirms it with one trial step (confirm_batch_on_gpu)."""
        cfg = self.cfg
        if cfg.batch_size != "auto":
            return
        available = memory.available_memory(self.xp, cfg.memory_gib)
        plan_for = lambda b: self.memory_plan(b, available)  # noqa: E731
        if cfg.total_batch_size is None:
            B, plan = memory.largest_fitting(range(self.preset_batch_size(), 0, -1), plan_for)
        else:
            B, plan = memory.auto_batch_size(self.model_config, cfg.block_size, cfg.total_batch_size,
                                             self.dist.world_size, plan_for)
        if B is None:
            if cfg.total_batch_size and not memory.batch_candidates(cfg.total_batch_size, cfg.block_size,
                                                                   self.dist.world_size):
                raise ConfigError(f"--total-batch-size {cfg.total_batch_size} is not divisible by T*ranks = "
                                  f"{cfg.block_size}*{self.dist.world_size}; no micro-batch can make it up")
            raise ConfigError(f"--batch-size auto: not even B=1 fits in {memory.gib(plan.available)} "
                              f"({memory.gib(plan.total)} needed); try --recompute, --zero 1 with more "
                              f"ranks, a smaller model, or --memory-gib if more memory is free\n{plan.table()}")
        total = cfg.total_batch_size or B * cfg.block_size * self.dist.world_size
        self.cfg = dataclasses.replace(cfg, batch_size=B, total_batch_size=total)
        self.auto_batch = True

    def preset_batch_size(self):
        from .config import PRESETS, TrainConfig

        return PRESETS.get(self.cfg.preset or "", {}).get("batch_size", TrainConfig.batch_size)

    def check_memory_plan(self):
        """The memory plan as a gate: over the memory there is, the run refuses with
        the plan and the flags that would fit (unless --force)."""
        cfg = self.cfg
        plan = self.memory_plan(cfg.batch_size)
        if not plan.available or plan.total <= plan.available or cfg.force:
            return plan
        raise ConfigError(f"the memory plan needs {memory.gib(plan.total)} per rank, more than the "
                          f"{memory.gib(plan.available)} there is ({plan.where}; "
                          f"{100 * plan.total / plan.available:.0f}%); "
                          f"{self.fitting_flags()}, or --force to start anyway\n{plan.table()}")

    def fitting_flags(self):
        """The flags (of --batch-size auto, --recompute, --zero 1) that would fit, in words."""
        cfg, ranks = self.cfg, self.dist.world_size
        available = memory.available_memory(self.xp, cfg.memory_gib)
        fits, best = [], 0
        for recompute in (False, True):
            trial = dataclasses.replace(cfg, recompute=recompute)
            plan_for = lambda b: memory.training_plan(self.model_config, trial, b, ranks,  # noqa: E731
                                                      self.precision, available)
            if recompute and plan_for(cfg.batch_size).fits():
                fits.append("--recompute")
                continue
            B, _ = (memory.auto_batch_size(self.model_config, cfg.block_size, cfg.total_batch_size, ranks, plan_for)
                    if cfg.total_batch_size else (None, None))
            if B and B > best:  # --recompute only named when it buys a larger B
                fits.append(f"--batch-size auto{' --recompute' if recompute else ''} (B={B})")
                best = B
        zero = dataclasses.replace(cfg, zero=1)
        if ranks > 1 and not cfg.zero and memory.training_plan(self.model_config, zero, cfg.batch_size, ranks,
                                                               self.precision, available).fits():
            fits.append("--zero 1")
        if not fits:
            return ("nothing of --batch-size auto, --recompute or --zero 1 fits: use a smaller model or more "
                    "ranks with --zero 1, or --memory-gib if more memory is free")
        return "it fits with " + " or ".join(fits)

    def confirm_batch_on_gpu(self):
        """On a GPU, one forward + backward at the chosen B (then the pool is freed); an
        out-of-memory halves B to the next candidate and tries again."""
        if not getattr(self, "auto_batch", False) or self.xp is np:
            return
        cfg, xp = self.cfg, self.xp
        candidates = [b for b in memory.batch_candidates(cfg.total_batch_size, cfg.block_size, self.dist.world_size)
                      if b <= cfg.batch_size]
        for B in candidates:
            self.log(f"--batch-size auto: a trial step at B={B} on the GPU")
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

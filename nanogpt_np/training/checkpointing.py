"""Starting, resuming and saving a run (CheckpointMixin of Trainer): which checkpoint
to trust, the loader position on the same or another number of ranks, and the stops
that leave a checkpoint behind."""
import dataclasses
import os
import sys
from types import SimpleNamespace

import numpy as np

from .. import checkpoint
from ..backend import resolve_precision
from ..data import DataError
from . import rundir
from .config import RESUME_SENSITIVE, flag
from .errors import ConfigError, TrainingStopped
from .rundir import truncate_log  # noqa: F401 (re-exported)


class CheckpointMixin:
    """Trainer's checkpoints. Reads and sets self.step, self.model, self.optimizer,
    self.train_loader, self.rng, self.guard; rank 0 writes, every rank reads."""

    def find_resume_point(self):
        """Before anything is built or written, rank 0 reads --log-dir: a fresh run
        refuses a folder holding another run (unless --overwrite); --resume picks the
        newest checkpoint that verifies, and refuses one of another run or one trained
        with other flags (unless --force). A tiny-style run (tokens per step B*T*ranks)
        keeps the checkpoint's tokens per step. Every rank gets rank 0's answer."""

        def look():
            cfg = self.cfg
            rundir.check_fresh_start(cfg)
            if not cfg.resume:
                return None, None
            path, ckpt = checkpoint.load_latest_good(cfg.log_dir, log=self.log)
            if path is None:
                rundir.check_nothing_to_resume(cfg)
                self.log(f"--resume: no checkpoint in {cfg.log_dir}, starting from step 0")
                return None, None
            rundir.check_same_run(cfg.log_dir, path, ckpt["meta"])
            params_dtype = resolve_precision(self.precision, cfg.backend)[0]
            checkpoint.check_compatible(ckpt, SimpleNamespace(config=self.model_config, dtype=np.dtype(params_dtype)),
                                        path)  # another model shape: refused before it is built
            saved = ckpt["meta"].get("train_args", {})
            if cfg.total_batch_size is None:
                self.cfg = dataclasses.replace(cfg, total_batch_size=saved.get("total_batch_size"))
            self._check_changed_flags(path, saved)
            self._resume_ckpt = ckpt
            return path, self.cfg.total_batch_size

        self._resume_ckpt = None
        self.resume_path, total = self.collectively(look)
        if self.cfg.total_batch_size is None and total is not None:  # the other ranks follow rank 0
            self.cfg = dataclasses.replace(self.cfg, total_batch_size=total)

    def _check_changed_flags(self, path, saved):
        """Flags that make another run refuse (unless --force); --max-steps may change
        (a run extended or cut short), with a note, as the schedule follows it."""
        now = dataclasses.asdict(self.cfg)
        changed = {k: f"{flag(k)} {saved[k]!r} (now {now[k]!r})" for k in RESUME_SENSITIVE
                   if k in saved and saved[k] != now[k]}
        if "max_steps" in changed:
            self.log(f"note: {changed.pop('max_steps')}: the learning-rate schedule follows the new --max-steps")
        if not changed:
            return
        if not self.cfg.force:
            raise ConfigError(f"--resume: {path} was trained with other flags: {', '.join(changed.values())}; "
                              "resume with the checkpoint's flags, add --force to continue with the new ones, or "
                              "start a new run with --overwrite or another --log-dir")
        self.log(f"warning: --force: flags differ from the checkpoint's run ({', '.join(changed.values())}); the "
                 "continued run will not match the original one")

    def start(self):
        """Load the checkpoint find_resume_point chose (every rank reads it), make the
        ranks' weights one, then claim --log-dir: the run's first write."""
        path = self.resume_path
        if path is not None:
            self.collectively(self._check_same_data)
            self.resume_from(path, self._resume_ckpt)
            self._resume_ckpt = None  # the arrays are in the model now
        # every rank starts from rank 0's weights (they agree already, by seed or by
        # checkpoint; the broadcast makes sure)
        self.dist.broadcast_(self.model.flat_params, root=0)
        if self.dist.is_master:
            self.claim_log_dir(resume_step=None if path is None else self.step)

    def _check_same_data(self):
        """--resume reads the data the run trained on (run.json's data_dir), unless --force."""
        trained_on = (rundir.read_run(self.cfg.log_dir) or {}).get("data_dir")
        here = os.path.abspath(self.data_dir)
        if trained_on and trained_on != here and not self.cfg.force:
            raise ConfigError(f"--resume: the run in {self.cfg.log_dir} trained on {trained_on}, but this one would "
                              f"read {here}; give --data-dir {trained_on} (for the built-in corpus: the same "
                              "NANOGPT_NP_CACHE and NANOGPT_NP_STDLIB_CHARS), or add --force to go on with this data")

    def claim_log_dir(self, resume_step):
        cfg = self.cfg
        info = rundir.run_identity(
            rundir.read_run(cfg.log_dir), dataclasses.asdict(cfg), resume_step, self.dist.world_size,
            command=sys.argv, data_dir=os.path.abspath(self.data_dir), model_config=self.model_config.to_dict(),
            parameters=self.model.num_parameters(), dtype=self.precision,
            total_batch_size=cfg.total_batch_size, preset=cfg.preset)
        self.run_id = info["run_id"]
        rundir.claim(cfg.log_dir, info, resume_step, overwrite=cfg.overwrite, log=self.log)

    def resume_from(self, path, ckpt=None):
        ckpt = ckpt or checkpoint.load_checkpoint(path)
        meta = checkpoint.restore(ckpt, self.model, self.optimizer, path)
        self._restore_loader(path, meta["loader_states"])
        self.rng.bit_generator.state = meta["rng_state"]
        self.guard.load_state(meta.get("guard", {}))
        self.step = meta["step"]
        self.log(f"resumed from {path} at step {self.step}")

    def _restore_loader(self, path, states):
        """The same ranks and B: each rank continues its own loader exactly. Otherwise
        the shared position carries over and the new ranks split the rest (data.py)."""
        try:
            self._load_loader_state(path, states)
        except DataError as e:
            raise checkpoint.CheckpointError(f"checkpoint {path}: {e}") from e

    def _load_loader_state(self, path, states):
        same = len(states) == self.dist.world_size and states[0].get("B") == self.cfg.batch_size
        if same:
            self.train_loader.load_state(states[self.dist.rank])
            return
        positions = {(s.get("epoch"), s.get("shard_index"), s.get("base")) for s in states}
        if len(positions) != 1:
            raise checkpoint.CheckpointError(f"{path}: its ranks saved different data positions {positions}")
        self.train_loader.load_state(states[0], reshard=True)
        self.log(f"resuming a run of {len(states)} rank(s) x B={states[0].get('B')} on "
                 f"{self.dist.world_size} x B={self.cfg.batch_size}: the same {self.cfg.total_batch_size:,} "
                 f"tokens per step ({self.accum} micro-steps now), the data position carried over "
                 f"({self.train_loader.tokens_read:,} tokens read); losses will not match the original "
                 "run bit for bit")

    def save(self):
        """Checkpoint after self.step steps; every rank contributes its loader position.
        Then the checkpoints beyond --keep-last are deleted (never the new one). A
        failed write stops every rank with rank 0's error."""
        states = self.dist.allgather_json(self.train_loader.state())
        optimizer_state = self.optimizer.state_dict()  # every rank: ZeRO gathers the moments on rank 0
        path = checkpoint.checkpoint_path(self.cfg.log_dir, self.step)
        problem = None
        if self.dist.is_master:
            try:
                self.write_checkpoint(path, self.step, states, self.rng.bit_generator.state, self.guard.state(),
                                      optimizer_state)
                self.log(f"saved checkpoint {path}")
                for old in checkpoint.prune_checkpoints(self.cfg.log_dir, self.cfg.keep_last, keep=[path]):
                    self.log(f"deleted old checkpoint {old} (--keep-last {self.cfg.keep_last})")
            except checkpoint.CheckpointError as e:
                problem = str(e)
        problem = self.dist.allgather_json(problem)[0]  # also: no rank looks for it before it exists
        if problem:
            raise checkpoint.CheckpointError(problem)
        self.last_saved = self.step
        return path

    def write_checkpoint(self, path, step, loader_states, rng_state, guard_state, optimizer_state=None):
        """This rank writes the checkpoint after `step` steps (save() on rank 0; after a
        stalled collective, watching.save_after_stall on the rank the watchdog picks)."""
        checkpoint.save_checkpoint(path, self.model, self.optimizer, step, loader_states, rng_state,
                                   dataclasses.asdict(self.cfg),
                                   extra={"guard": guard_state, "run_id": self.run_id},
                                   optimizer_state=optimizer_state)

    def save_unless_saved(self):
        """The checkpoint of this step: saved now, unless the loop saved it already."""
        if self.last_saved != self.step:
            return self.save()
        return checkpoint.checkpoint_path(self.cfg.log_dir, self.step)

    def stop_for_bad_steps(self, step):
        path = self.save_unless_saved()
        raise TrainingStopped(
            f"{self.guard.bad_in_row} non-finite steps in a row (the last: step {step}, "
            f"{self.history['skipped'][step]}); the weights of the last good step are in {path}. "
            f"Lower --max-lr or check the data, then --resume (or raise --max-bad-steps)", collective=True)

    def stop_for_signal(self):
        path = self.save_unless_saved()
        self.history["stopped"] = {"signal": self.stop_request.signal_name or "a signal on another rank",
                                   "step": self.step, "checkpoint": path}

"""Starting, resuming and saving a run (CheckpointMixin of Trainer): which checkpoint
to trust, the loader position on the same or another number of ranks, and the stops
that leave a checkpoint behind."""
import dataclasses
import os

from .. import checkpoint
from ..data import DataError
from .config import RESUME_SENSITIVE
from .errors import ConfigError, TrainingStopped


def truncate_log(path, first_dropped_step):
    """Keep only log.txt lines of steps before `first_dropped_step` (a resumed run
    rewrites the rest)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.split()[:1] and int(line.split()[0]) < first_dropped_step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


class CheckpointMixin:
    """Trainer's checkpoints. Reads and sets self.step, self.model, self.optimizer,
    self.train_loader, self.rng, self.guard; rank 0 writes, every rank reads."""

    def start(self):
        """Fresh run: clear log.txt. With --resume: load the newest checkpoint that
        verifies, if any (rank 0 checks them; the others load rank 0's choice)."""
        cfg = self.cfg
        try:
            os.makedirs(cfg.log_dir, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create --log-dir {cfg.log_dir}: {e.strerror or e}") from e
        path, ckpt, problem = None, None, None
        if cfg.resume and self.dist.is_master:
            try:
                path, ckpt = checkpoint.load_latest_good(cfg.log_dir, log=self.log)
            except checkpoint.CheckpointError as e:
                problem = str(e)
        path, problem = self.dist.allgather_json([path, problem])[0]  # every rank follows rank 0
        if problem:
            raise checkpoint.CheckpointError(problem)
        if cfg.resume and path is None:
            self.log(f"--resume: no checkpoint in {cfg.log_dir}, starting from step 0")
        if path is not None:
            self.resume_from(path, ckpt)
        # every rank starts from rank 0's weights (they agree already, by seed or by
        # checkpoint; the broadcast makes sure)
        self.dist.broadcast_(self.model.flat_params, root=0)
        if self.dist.is_master:
            self.write_run_info()
            if path is None:
                open(self.log_path, "w").close()  # a new run starts a new log, as build-nanogpt's
            else:
                truncate_log(self.log_path, self.step)

    def resume_from(self, path, ckpt=None):
        ckpt = ckpt or checkpoint.load_checkpoint(path)
        meta = checkpoint.restore(ckpt, self.model, self.optimizer, path)
        self._restore_loader(path, meta["loader_states"])
        self.rng.bit_generator.state = meta["rng_state"]
        self.guard.load_state(meta.get("guard", {}))
        self.step = meta["step"]
        self._warn_changed_flags(meta.get("train_args", {}))
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

    def _warn_changed_flags(self, saved):
        now = dataclasses.asdict(self.cfg)
        changed = [f"{k} {saved[k]!r} -> {now[k]!r}" for k in RESUME_SENSITIVE
                   if k in saved and saved[k] != now[k]]
        if changed:
            self.log("warning: flags differ from the checkpoint's run (" + ", ".join(changed)
                     + "); the continued run will not match the original one")

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
                                   dataclasses.asdict(self.cfg), extra={"guard": guard_state},
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

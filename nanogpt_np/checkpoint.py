"""Training checkpoints: one `.npz` file, written atomically, never pickled.

Inside `model_{step:05d}.npz` (np.savez, loaded with allow_pickle=False):
  param/<name>        every parameter, GPT-2 checkpoint names (the tied
                      lm_head.weight is not stored twice)
  optim/exp_avg       AdamW's first and second moments, flat, in parameter order
  optim/exp_avg_sq
  meta                a JSON string (0-d unicode array):
                        format, version, step (optimizer steps done = the next step
                        to run), model config, dtype, optimizer scalars (its step
                        count, betas, eps, ...), loader states (a list, one per
                        rank), RNG state, the step guard's statistics, the training
                        arguments, backend, and the sha256 of every array above
  meta_sha256         the sha256 of the meta string itself

Checked on load: every array's bytes against its sha256, so a flipped byte or a
truncated file is refused with the array named (`--resume` then falls back to the
previous checkpoint, see load_latest_good). Version 1 files (no checksums) still load.

Arrays are copied to the host on save and to the model's device on load, so a
GPU checkpoint resumes on the CPU and the other way round. The file is written
to a temporary name in the same folder, fsynced, then renamed over the real
name: a run killed while saving leaves the previous checkpoint intact. A write
that fails (disk full, a read-only folder) removes the temporary file and raises
CheckpointError saying so; the previous checkpoint is never touched.
"""
import hashlib
import json
import os
import re
import zipfile

import numpy as np

from .backend import to_device, to_host
from .config import GPTConfig, parameter_shapes

FORMAT, VERSION = "nanogpt_np-checkpoint", 2
READABLE_VERSIONS = (1, 2)  # 1: before checksums
NAME_RE = re.compile(r"^model_(\d+)\.npz$")


class CheckpointError(ValueError):
    """A missing, corrupt or mismatched checkpoint; the message says which and why."""


def checkpoint_path(log_dir, step):
    return os.path.join(log_dir, f"model_{step:05d}.npz")


def list_checkpoints(log_dir):
    """Paths of log_dir's checkpoints, newest (highest step) first."""
    if not os.path.isdir(log_dir):
        return []
    found = sorted(((int(m.group(1)), n) for n in os.listdir(log_dir) if (m := NAME_RE.match(n))),
                   reverse=True)
    return [os.path.join(log_dir, n) for _, n in found]


def latest_checkpoint(log_dir):
    """Path of the checkpoint with the highest step in log_dir, or None."""
    found = list_checkpoints(log_dir)
    return found[0] if found else None


def sha256(array):
    return hashlib.sha256(np.ascontiguousarray(array).data).hexdigest()


def save_checkpoint(path, model, optimizer, step, loader_states, rng_state, train_args=None, extra=None,
                    optimizer_state=None):
    """Write everything a bit-identical resume needs to `path`, atomically.
    `extra`: more JSON-able meta (the trainer's step-guard statistics).
    `optimizer_state`: optimizer.state_dict() when the caller has it already (ZeRO's
    is gathered by every rank together, then written by rank 0)."""
    opt_state = optimizer_state if optimizer_state is not None else optimizer.state_dict()
    meta = {
        "format": FORMAT, "version": VERSION, "step": int(step),
        "model_config": model.config.to_dict(), "dtype": model.dtype.name, "backend": model.backend,
        "optimizer": {k: v for k, v in opt_state.items() if k not in ("exp_avg", "exp_avg_sq")},
        "loader_states": list(loader_states), "rng_state": rng_state,
        "train_args": train_args or {}, **(extra or {}),
    }
    arrays = {f"param/{name}": to_host(p) for name, p in model.parameters().items()}
    arrays["optim/exp_avg"] = to_host(opt_state["exp_avg"])
    arrays["optim/exp_avg_sq"] = to_host(opt_state["exp_avg_sq"])
    meta["checksums"] = {name: sha256(a) for name, a in arrays.items()}
    meta_text = json.dumps(meta)
    arrays["meta"] = np.array(meta_text)
    arrays["meta_sha256"] = np.array(hashlib.sha256(meta_text.encode()).hexdigest())
    _write_atomically(path, arrays)
    return path


_PARTIAL = set()  # temporary files being written now (a hard exit removes them first)


def remove_partial_writes():
    """Delete the temporary file of a checkpoint being written right now, for an exit
    that cannot wait for the write to finish (a second Ctrl-C)."""
    for tmp in list(_PARTIAL):
        try:
            os.remove(tmp)
        except OSError:
            pass


def _write_atomically(path, arrays):
    """np.savez into a temporary file beside `path`, fsync, rename. On any failure
    the temporary file is removed and `path` (an older checkpoint, say) is untouched."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.tmp{os.getpid()}"
    _PARTIAL.add(tmp)
    try:
        os.makedirs(directory, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # disk full, quota, read-only or vanished folder
        older = [p for p in list_checkpoints(directory) if p != path]
        kept = f"the previous checkpoint {older[0]} is intact" if older else "no earlier checkpoint exists"
        raise CheckpointError(
            f"could not write checkpoint {path}: {e.strerror or e} ({type(e).__name__}); {kept}. "
            "Free disk space or make the folder writable (or choose another --log-dir), then --resume"
        ) from e
    finally:
        _PARTIAL.discard(tmp)
        try:
            os.remove(tmp)
        except OSError:
            pass  # renamed already, or never created
    return path


def load_checkpoint(path):
    """{'meta': dict, 'params': {name: array}, 'exp_avg': array, 'exp_avg_sq': array}, on the host.
    Every array is checked against the checksum stored with it."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            meta_text = str(npz["meta"])
            stored_meta_sum = str(npz["meta_sha256"]) if "meta_sha256" in npz.files else None
            arrays = {k: npz[k] for k in npz.files if k not in ("meta", "meta_sha256")}
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:  # damage, missing parts
        raise CheckpointError(f"checkpoint {path} is unreadable or incomplete ({e})") from e
    if stored_meta_sum is not None and hashlib.sha256(meta_text.encode()).hexdigest() != stored_meta_sum:
        raise CheckpointError(f"checkpoint {path} is corrupt: its meta does not match its checksum")
    try:
        meta = json.loads(meta_text)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path} is corrupt: its meta is not JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") not in READABLE_VERSIONS:
        got = meta if not isinstance(meta, dict) else (meta.get("format"), meta.get("version"))
        raise CheckpointError(f"{path} is not a {FORMAT} file of version {READABLE_VERSIONS} (found {got!r})")
    if meta["version"] >= 2 and stored_meta_sum is None:
        raise CheckpointError(f"checkpoint {path} is corrupt: the checksum of its meta is missing")
    _verify_checksums(path, meta, arrays)
    missing = [k for k in ("optim/exp_avg", "optim/exp_avg_sq") if k not in arrays]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: no {', '.join(missing)}")
    params = {k[len("param/"):]: a for k, a in arrays.items() if k.startswith("param/")}
    ckpt = {"meta": meta, "params": params, "exp_avg": arrays["optim/exp_avg"],
            "exp_avg_sq": arrays["optim/exp_avg_sq"]}
    check_schema(ckpt, path)
    return ckpt


# ---- the schema: what a checkpoint must hold before anything trusts it ----------------------

CONFIG_FIELDS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd")
PARAM_DTYPES = ("float32", "float64")


def _int(value, low=0):
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def check_schema(ckpt, path):
    """Every meta field present and of its type, every array of the dtype and shape the
    meta's config implies, moments finite with exp_avg_sq >= 0. The first problem
    found is raised as CheckpointError, naming the file and the field or array."""
    def bad(what):
        raise CheckpointError(f"checkpoint {path} is invalid: {what}")

    meta = ckpt["meta"]
    for key, kind in (("step", int), ("model_config", dict), ("dtype", str), ("optimizer", dict),
                      ("loader_states", list), ("rng_state", dict)):
        if key not in meta:
            bad(f"meta has no {key!r}")
        if not isinstance(meta[key], kind) or isinstance(meta[key], bool):
            bad(f"meta {key!r} is {type(meta[key]).__name__}, not {kind.__name__}")
    if not _int(meta["step"]):
        bad(f"step {meta['step']} is negative")
    config = _check_config(meta["model_config"], bad)
    if meta["dtype"] not in PARAM_DTYPES:
        bad(f"dtype {meta['dtype']!r} is not one of {', '.join(PARAM_DTYPES)}")
    if not _int(meta["optimizer"].get("step")):
        bad(f"optimizer step {meta['optimizer'].get('step')!r} is not a non-negative integer")
    _check_loader_states(meta["loader_states"], bad)
    if not isinstance(meta["rng_state"].get("bit_generator"), str) or not isinstance(meta["rng_state"].get("state"), dict):
        bad("rng_state is not a NumPy bit generator state")
    _check_arrays(ckpt, config, np.dtype(meta["dtype"]), bad)


def _check_config(cfg, bad):
    for key in CONFIG_FIELDS:
        if not _int(cfg.get(key), 1):
            bad(f"model_config {key} is {cfg.get(key)!r}, not a positive integer")
    if cfg["n_embd"] % cfg["n_head"]:
        bad(f"model_config n_embd {cfg['n_embd']} is not divisible by n_head {cfg['n_head']}")
    return cfg


def _check_loader_states(states, bad):
    if not states:
        bad("loader_states is empty (one per rank that saved it)")
    for rank, state in enumerate(states):
        if not isinstance(state, dict):
            bad(f"loader state {rank} is not an object")
        for key in ("epoch", "shard_index", "base", "B", "T", "rank", "world_size"):
            if not _int(state.get(key), 1 if key in ("B", "T", "world_size") else 0):
                bad(f"loader state {rank}: {key} is {state.get(key)!r}")
        shards = state.get("shards")
        if not isinstance(shards, list) or not shards or not all(isinstance(n, str) for n in shards):
            bad(f"loader state {rank}: shards is not a list of file names")
        if state["shard_index"] >= len(shards):
            bad(f"loader state {rank}: shard_index {state['shard_index']} is past its {len(shards)} shard(s)")
        if state["rank"] != rank or state["world_size"] != len(states):
            bad(f"loader state {rank} says rank {state['rank']} of {state['world_size']}, but it is number {rank} "
                f"of {len(states)}")


def _check_arrays(ckpt, config, dtype, bad):
    L = config["n_layer"]
    expected_count = 2 + 12 * L + 2  # wte, wpe, 12 per block, ln_f: counted before listing them
    if len(ckpt["params"]) != expected_count:
        bad(f"it holds {len(ckpt['params'])} parameter arrays, but model_config (n_layer {L}) needs {expected_count}")
    total = 0
    for name, shape in parameter_shapes(GPTConfig(**{k: config[k] for k in CONFIG_FIELDS})):  # checked above
        a = ckpt["params"].get(name)
        if a is None:
            bad(f"parameter {name} is missing")
        if a.dtype != dtype or tuple(a.shape) != shape:
            bad(f"parameter {name} is {a.dtype} {tuple(a.shape)}, but the meta implies {dtype.name} {shape}")
        if not np.isfinite(a).all():
            bad(f"parameter {name} holds NaN or Inf")
        total += a.size
    for key in ("exp_avg", "exp_avg_sq"):
        a = ckpt[key]
        if a.dtype != dtype or a.shape != (total,):
            bad(f"optim/{key} is {a.dtype} {a.shape}, but the parameters need {dtype.name} ({total},)")
        if not np.isfinite(a).all():
            bad(f"optim/{key} holds NaN or Inf")
    if (ckpt["exp_avg_sq"] < 0).any():
        bad("optim/exp_avg_sq has negative values (a second moment is a mean of squares)")




def _verify_checksums(path, meta, arrays):
    if meta["version"] < 2:
        return  # written before checksums
    sums = meta.get("checksums")
    if not isinstance(sums, dict) or set(sums) != set(arrays):
        raise CheckpointError(f"checkpoint {path} is corrupt: its list of checksums does not match its arrays")
    for name, array in arrays.items():
        if sha256(array) != sums[name]:
            raise CheckpointError(f"checkpoint {path} is corrupt: array {name} does not match its checksum")


def load_latest_good(log_dir, log=print):
    """(path, checkpoint) of the newest checkpoint in log_dir that loads and verifies,
    or (None, None) if there is none at all. A damaged newer one is named in the log
    and skipped; if every one is damaged, CheckpointError lists them."""
    problems = []
    for path in list_checkpoints(log_dir):
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as e:
            problems.append(str(e))
            log(f"warning: {e}; trying the previous checkpoint")
            continue
        if problems:
            log(f"resuming from {path}, the newest checkpoint that verifies")
        return path, ckpt
    if problems:
        raise CheckpointError(f"no checkpoint in {log_dir} verifies: " + " | ".join(problems))
    return None, None


def prune_checkpoints(log_dir, keep_last, keep=()):
    """Delete all but the `keep_last` newest checkpoints (0: keep all), never one in
    `keep`. Called after a new checkpoint is safely renamed into place. -> deleted paths."""
    if keep_last <= 0:
        return []
    keep = {os.path.abspath(p) for p in keep}
    doomed = [p for p in list_checkpoints(log_dir)[keep_last:] if os.path.abspath(p) not in keep]
    for path in doomed:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
    return doomed


def check_compatible(ckpt, model, path=""):
    """Raise CheckpointError listing every way the checkpoint's model differs from `model`."""
    saved = dict(ckpt["meta"]["model_config"], dtype=ckpt["meta"]["dtype"])
    current = dict(model.config.to_dict(), dtype=model.dtype.name)
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, this run {current[k]!r}"
             for k in current if saved.get(k) != current[k]]
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} is from another model config ({'; '.join(diffs)}). Resume with the "
            "flags it was trained with, or use a fresh --log-dir to start a new run"
        )


def restore(ckpt, model, optimizer, path=""):
    """Copy the checkpoint's parameters, AdamW moments and AdamW step count into model
    and optimizer. The hyperparameters (lr, betas, eps, weight decay) stay the
    optimizer's own, i.e. the flags of the resumed run; the checkpoint's are in
    meta["optimizer"] for comparison."""
    check_compatible(ckpt, model, path)
    model.load_state_dict(ckpt["params"])
    optimizer.load_state_dict({
        "step": ckpt["meta"]["optimizer"]["step"],
        "exp_avg": to_device(ckpt["exp_avg"], model.xp, model.dtype),
        "exp_avg_sq": to_device(ckpt["exp_avg_sq"], model.xp, model.dtype),
    })
    return ckpt["meta"]

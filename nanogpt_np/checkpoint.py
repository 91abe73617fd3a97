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
                        rank), RNG state, the training arguments, backend.

Arrays are copied to the host on save and to the model's device on load, so a
GPU checkpoint resumes on the CPU and the other way round. The file is written
to a temporary name in the same folder, fsynced, then renamed over the real
name: a run killed while saving leaves the previous checkpoint intact.
"""
import json
import os
import re
import zipfile

import numpy as np

from .backend import to_device, to_host

FORMAT, VERSION = "nanogpt_np-checkpoint", 1
NAME_RE = re.compile(r"^model_(\d+)\.npz$")


class CheckpointError(ValueError):
    """A missing, corrupt or mismatched checkpoint; the message says which and why."""


def checkpoint_path(log_dir, step):
    return os.path.join(log_dir, f"model_{step:05d}.npz")


def latest_checkpoint(log_dir):
    """Path of the checkpoint with the highest step in log_dir, or None."""
    if not os.path.isdir(log_dir):
        return None
    found = [(int(m.group(1)), n) for n in os.listdir(log_dir) if (m := NAME_RE.match(n))]
    return os.path.join(log_dir, max(found)[1]) if found else None


def save_checkpoint(path, model, optimizer, step, loader_states, rng_state, train_args=None):
    """Write everything a bit-identical resume needs to `path`, atomically."""
    opt_state = optimizer.state_dict()
    meta = {
        "format": FORMAT, "version": VERSION, "step": int(step),
        "model_config": model.config.to_dict(), "dtype": model.dtype.name, "backend": model.backend,
        "optimizer": {k: v for k, v in opt_state.items() if k not in ("exp_avg", "exp_avg_sq")},
        "loader_states": list(loader_states), "rng_state": rng_state,
        "train_args": train_args or {},
    }
    arrays = {f"param/{name}": to_host(p) for name, p in model.parameters().items()}
    arrays["optim/exp_avg"] = to_host(opt_state["exp_avg"])
    arrays["optim/exp_avg_sq"] = to_host(opt_state["exp_avg_sq"])
    arrays["meta"] = np.array(json.dumps(meta))
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_checkpoint(path):
    """{'meta': dict, 'params': {name: array}, 'exp_avg': array, 'exp_avg_sq': array}, on the host."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            meta = json.loads(str(npz["meta"]))
            params = {k[len("param/"):]: npz[k] for k in npz.files if k.startswith("param/")}
            exp_avg, exp_avg_sq = npz["optim/exp_avg"], npz["optim/exp_avg_sq"]
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:  # damage, missing parts
        raise CheckpointError(f"checkpoint {path} is unreadable or incomplete ({e})") from e
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(
            f"{path} is not a {FORMAT} version {VERSION} file "
            f"(format {meta.get('format')!r}, version {meta.get('version')!r})"
        )
    return {"meta": meta, "params": params, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


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

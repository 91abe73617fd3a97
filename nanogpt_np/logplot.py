"""Read a training log.txt and plot it the way build-nanogpt's notebook does.

log.txt holds one measurement a line, `{step} {kind} {value}`:

    0 train 10.998012
    250 val 6.2361
    250 hella 0.2492

Two panels: train and val loss against the step (the raw train loss faint under
a smoothed line, the axes fitted to the data), and, when the log has any,
HellaSwag acc_norm. OpenAI's GPT-2 124M val loss and the GPT-2 / GPT-3 124M
HellaSwag scores are drawn only for a run of the 124M shape (or when asked). A step logged twice (a run resumed from a
checkpoint repeats the steps after it) keeps its last value.

matplotlib is an optional dependency (`pip install -e '.[plot]'`), imported only
when a plot is drawn.
"""
from pathlib import Path

import numpy as np

GPT2_124M_VAL_LOSS = 3.2924  # OpenAI's GPT-2 124M checkpoint on the FineWeb-Edu val split
GPT2_124M_HELLASWAG = 0.2945  # acc_norm, completion style
GPT3_124M_HELLASWAG = 0.337  # from the GPT-3 paper


def log_path(log_dir_or_file):
    p = Path(log_dir_or_file)
    path = p / "log.txt" if p.is_dir() else p
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; give the training run's log directory (it holds log.txt)")
    return path


def read_log(log_dir_or_file):
    """{kind: (steps, values)}, each a sorted NumPy array pair, from log.txt.

    A malformed line raises ValueError naming it, except an unfinished last line
    (no newline yet: the run is still writing it), which is skipped.
    """
    path = log_path(log_dir_or_file)
    text = path.read_text()
    lines = text.split("\n")
    if lines and lines[-1] and not text.endswith("\n"):
        lines = lines[:-1]  # being written right now
    series = {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.split()
        if parts[1:2] in (["skipped"], ["ranks"]):
            continue  # `{step} skipped <why>`, `{step} ranks <step times>`: the trainer's notes, not series
        try:
            if len(parts) != 3:
                raise ValueError
            step, kind, value = int(parts[0]), parts[1], float(parts[2])
        except ValueError:
            raise ValueError(f"{path}:{lineno}: expected '{{step}} {{kind}} {{value}}', got {line!r}") from None
        series.setdefault(kind, {})[step] = value  # a repeated step keeps its last value
    out = {}
    for kind, by_step in series.items():
        steps = np.array(sorted(by_step), dtype=np.int64)
        out[kind] = (steps, np.array([by_step[s] for s in steps], dtype=np.float64))
    return out


def summary(series):
    """Lines such as 'min train loss: 3.0512' for what the log holds."""
    lines = []
    for kind, pick, what in (("train", min, "min train loss"), ("val", min, "min val loss"),
                             ("hella", max, "max HellaSwag acc_norm")):
        values = series[kind][1][np.isfinite(series[kind][1])] if kind in series else []
        if len(values):
            lines.append(f"{what}: {pick(values):.4f}")
    return lines


def import_pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise RuntimeError(
            "plotting needs matplotlib, an optional dependency: pip install -e '.[plot]' "
            "(or pip install matplotlib)"
        ) from e
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


GPT2_124M_SHAPE = dict(n_layer=12, n_head=12, n_embd=768)


def run_info(log_dir_or_file):
    """The run's model, if the log directory says: run.json (written by the trainer
    at start-up), else the newest checkpoint's meta. -> {"model_config", "parameters"}
    or None. Read with allow_pickle=False; only the small meta entry is loaded."""
    import json

    from .checkpoint import list_checkpoints
    from .config import GPTConfig
    from .memory import parameter_count

    folder = log_path(log_dir_or_file).parent
    try:
        info = json.loads((folder / "run.json").read_text())
        return {"model_config": info["model_config"], "parameters": int(info["parameters"])}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    for ckpt in list_checkpoints(folder):
        try:
            with np.load(ckpt, allow_pickle=False) as npz:
                cfg = json.loads(str(npz["meta"]))["model_config"]
            n = parameter_count(GPTConfig(**cfg))
            return {"model_config": cfg, "parameters": n}
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def size_label(info):
    if info is None:
        return "nanogpt_np"
    n, cfg = info["parameters"], info["model_config"]
    size = f"{n / 1e6:.0f}M" if n >= 1e7 else f"{n / 1e6:.1f}M"
    return f"nanogpt_np {size} ({cfg['n_layer']}L, {cfg['n_embd']}C)"


def smoothed(values, window):
    """Centred moving average over `window` points (fewer at the ends), so the line
    does not lag the raw curve where it falls fast."""
    half = window // 2
    c = np.cumsum(np.insert(np.asarray(values, dtype=np.float64), 0, 0.0))
    idx = np.arange(len(values))
    lo, hi = np.maximum(idx - half, 0), np.minimum(idx + half + 1, len(values))
    return (c[hi] - c[lo]) / (hi - lo)


def plot(log_dir_or_file, out=None, loss_ymax=None, baselines=None):
    """Draw the loss panel (and a HellaSwag panel when the log has HellaSwag lines)
    into a PNG (default: log.txt's directory / log.png) -> its path.

    The axes follow the data: the whole curve is visible (loss_ymax caps the top if
    given), the raw train loss faint under a smoothed line. The legend names the
    model's size (run_info). OpenAI's GPT-2 124M baselines are drawn only when they
    compare like with like, a run of the 124M shape, or when baselines=True."""
    series = read_log(log_dir_or_file)
    plt = import_pyplot()
    path = log_path(log_dir_or_file)
    out = Path(out) if out is not None else path.parent / "log.png"
    info = run_info(log_dir_or_file)
    if baselines is None:
        baselines = info is not None and all(info["model_config"].get(k) == v for k, v in GPT2_124M_SHAPE.items())
    label = size_label(info)
    panels = 2 if "hella" in series else 1
    fig, axes = plt.subplots(1, panels, figsize=(8 * panels, 6), squeeze=False)
    _loss_panel(axes[0][0], series, label, baselines, loss_ymax)
    if panels == 2:
        _hella_panel(axes[0][1], series, label, baselines)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.png")  # whole or nothing: write, then rename
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)
    return out


def _loss_panel(ax, series, label, baselines, loss_ymax):
    shown = []
    if "train" in series:
        steps, values = series["train"]
        keep = np.isfinite(values)  # a skipped NaN/Inf step has no point (and would poison the average)
        steps, values = steps[keep], values[keep]
        window = max(1, len(values) // 20)
        ax.plot(steps, values, color="C0", alpha=0.25, linewidth=0.8, label=f"{label} train loss")
        ax.plot(steps, smoothed(values, window), color="C0",
                label=f"{label} train loss, mean of {window} steps around each" if window > 1 else None)
        shown.append(values)
    if "val" in series:
        ax.plot(*series["val"], color="C1", marker="o", markersize=3, label=f"{label} val loss")
        shown.append(series["val"][1])
    if baselines:
        ax.axhline(GPT2_124M_VAL_LOSS, color="r", linestyle="--", label="OpenAI GPT-2 (124M) checkpoint val loss")
        shown.append(np.array([GPT2_124M_VAL_LOSS]))
    values = np.concatenate(shown) if shown else np.zeros(0)
    values = values[np.isfinite(values)]  # a NaN val loss (a diverged run) has no place on the axis
    if values.size:
        lo, hi = float(values.min()), float(values.max())
        hi = min(hi, loss_ymax) if loss_ymax is not None else hi
        margin = 0.05 * max(hi - lo, 1e-3)
        ax.set_ylim(lo - margin, hi + margin)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.set_title("Loss")


def _hella_panel(ax, series, label, baselines):
    ax.plot(*series["hella"], marker="o", markersize=3, label=label)
    if baselines:
        ax.axhline(GPT2_124M_HELLASWAG, color="r", linestyle="--", label="OpenAI GPT-2 (124M) checkpoint")
        ax.axhline(GPT3_124M_HELLASWAG, color="g", linestyle="--", label="OpenAI GPT-3 (124M) checkpoint")
    ax.set_xlabel("step")
    ax.set_ylabel("acc_norm")
    ax.legend()
    ax.set_title("HellaSwag eval")

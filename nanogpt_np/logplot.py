"""Read a training log.txt and plot it the way build-nanogpt's notebook does.

log.txt holds one measurement a line, `{step} {kind} {value}`:

    0 train 10.998012
    250 val 6.2361
    250 hella 0.2492

Two panels: train and val loss against the step, with OpenAI's GPT-2 124M
checkpoint's val loss as a horizontal line; and HellaSwag acc_norm against GPT-2
124M's and GPT-3 124M's scores. A step logged twice (a run resumed from a
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
        if kind in series and len(series[kind][1]):
            lines.append(f"{what}: {pick(series[kind][1]):.4f}")
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


def plot(log_dir_or_file, out=None, loss_ymax=4.0):
    """Draw the two panels into a PNG (default: log.txt's directory / log.png) -> its path."""
    series = read_log(log_dir_or_file)
    plt = import_pyplot()
    path = log_path(log_dir_or_file)
    out = Path(out) if out is not None else path.parent / "log.png"
    fig, (ax_loss, ax_hella) = plt.subplots(1, 2, figsize=(16, 6))

    for kind, label in (("train", "train loss"), ("val", "val loss")):
        if kind in series:
            ax_loss.plot(*series[kind], label=f"nanogpt_np (124M) {label}")
    ax_loss.axhline(GPT2_124M_VAL_LOSS, color="r", linestyle="--", label="OpenAI GPT-2 (124M) checkpoint val loss")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.set_yscale("linear")
    ax_loss.set_ylim(top=loss_ymax)  # the first steps' ~11 would squash the interesting part
    ax_loss.legend()
    ax_loss.set_title("Loss")

    if "hella" in series:
        ax_hella.plot(*series["hella"], label="nanogpt_np (124M)")
    else:
        ax_hella.text(0.5, 0.5, "no HellaSwag entries in the log", ha="center", va="center",
                      transform=ax_hella.transAxes)
    ax_hella.axhline(GPT2_124M_HELLASWAG, color="r", linestyle="--", label="OpenAI GPT-2 (124M) checkpoint")
    ax_hella.axhline(GPT3_124M_HELLASWAG, color="g", linestyle="--", label="OpenAI GPT-3 (124M) checkpoint")
    ax_hella.set_xlabel("step")
    ax_hella.set_ylabel("acc_norm")
    ax_hella.legend()
    ax_hella.set_title("HellaSwag eval")

    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.png")  # whole or nothing: write, then rename
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)
    return out

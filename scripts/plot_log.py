"""Plot a training run's log.txt: loss and HellaSwag, as build-nanogpt's notebook does.

    python scripts/plot_log.py log/            # writes log/log.png
    python scripts/plot_log.py log/ --out run.png

Needs matplotlib, an optional dependency: pip install -e '.[plot]'.
"""
import argparse
import sys

from nanogpt_np import logplot


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("log_dir", metavar="LOG_DIR", help="the run's log directory (holding log.txt), or log.txt itself")
    p.add_argument("--out", help="PNG to write (default: LOG_DIR/log.png)")
    p.add_argument("--loss-ymax", type=float, default=None, help="top of the loss axis (default: the data's top)")
    p.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=None,
                   help="draw OpenAI's GPT-2/GPT-3 124M lines (default: only for a run of the 124M shape)")
    args = p.parse_args(argv)
    try:
        out = logplot.plot(args.log_dir, args.out, loss_ymax=args.loss_ymax, baselines=args.baselines)
        lines = logplot.summary(logplot.read_log(args.log_dir))
    except (ValueError, OSError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    for line in lines:
        print(line)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

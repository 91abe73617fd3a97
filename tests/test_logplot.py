"""log.txt parsing and the two-panel PNG."""
import sys

import numpy as np
import pytest

from nanogpt_np import logplot

LOG = """0 train 10.998012
0 val 10.9876
0 hella 0.2480
1 train 9.654321
2 train 8.123456
250 val 6.2361
250 hella 0.2510
251 train 6.000001
"""


def write_log(tmp_path, text=LOG):
    (tmp_path / "log.txt").write_text(text)
    return tmp_path


def test_read_log_groups_kinds_and_sorts_steps(tmp_path):
    series = logplot.read_log(write_log(tmp_path))
    assert set(series) == {"train", "val", "hella"}
    steps, values = series["train"]
    np.testing.assert_array_equal(steps, [0, 1, 2, 251])
    np.testing.assert_allclose(values, [10.998012, 9.654321, 8.123456, 6.000001])
    np.testing.assert_array_equal(series["hella"][0], [0, 250])
    assert logplot.summary(series) == ["min train loss: 6.0000", "min val loss: 6.2361", "max HellaSwag acc_norm: 0.2510"]
    assert logplot.read_log(tmp_path / "log.txt").keys() == series.keys()  # the file itself works too


def test_a_resumed_run_keeps_the_last_value_of_a_step(tmp_path):
    series = logplot.read_log(write_log(tmp_path, LOG + "2 train 7.5\n3 train 7.0\n"))
    np.testing.assert_array_equal(series["train"][0], [0, 1, 2, 3, 251])
    assert series["train"][1][2] == 7.5


def test_an_unfinished_last_line_is_skipped_but_bad_lines_are_named(tmp_path):
    series = logplot.read_log(write_log(tmp_path, LOG + "252 tra"))
    assert series["train"][0][-1] == 251
    with pytest.raises(ValueError, match=r"log.txt:3: expected '\{step\} \{kind\} \{value\}', got '0 hella'"):
        logplot.read_log(write_log(tmp_path, "0 train 1.0\n0 val 2.0\n0 hella\n1 train 0.5\n"))
    with pytest.raises(FileNotFoundError, match="holds log.txt"):
        logplot.read_log(tmp_path / "nowhere")


def test_plot_writes_a_png(tmp_path):
    out = logplot.plot(write_log(tmp_path))
    assert out == tmp_path / "log.png"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(out).shape
    assert width > 1.5 * height  # two panels side by side
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.png", "log.txt"]  # no temporary left
    # a log without HellaSwag lines still plots
    other = tmp_path / "run2"
    other.mkdir()
    assert logplot.plot(write_log(other, "0 train 3.0\n1 train 2.5\n"), out=other / "p.png").is_file()


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    with pytest.raises(RuntimeError, match=r"needs matplotlib.*pip install -e '\.\[plot\]'"):
        logplot.plot(write_log(tmp_path))


def figure_of(monkeypatch):
    """Keep the figure plot() draws, to look at its axes."""
    import matplotlib.pyplot as plt

    kept = []
    real_subplots, real_close = plt.subplots, plt.close

    def subplots(*a, **k):
        fig, axes = real_subplots(*a, **k)
        kept.append(fig)
        return fig, axes

    monkeypatch.setattr(plt, "subplots", subplots)
    monkeypatch.setattr(plt, "close", lambda fig: None)
    return kept


def write_run_json(tmp_path, n_layer, n_head, n_embd, parameters):
    import json

    cfg = dict(block_size=1024, vocab_size=50304, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    (tmp_path / "run.json").write_text(json.dumps({"model_config": cfg, "parameters": parameters}))


def test_a_small_run_fits_its_axes_and_names_its_size(tmp_path, monkeypatch):
    figs = figure_of(monkeypatch)
    write_run_json(tmp_path, 4, 4, 64, 3_412_992)
    log = "".join(f"{s} train {10.5 - 6.5 * s / 199:.4f}\n" for s in range(200)) + "199 val 4.12\n"
    logplot.plot(write_log(tmp_path, log))
    (ax,) = figs[0].axes  # no HellaSwag lines: one panel, not an empty second one
    low, high = ax.get_ylim()
    assert low < 4.0 and high > 10.5  # the whole curve and the val point are on the chart
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert all("124M" not in t for t in labels)  # neither the model's label nor a GPT-2 baseline
    assert any("3.4M (4L, 64C)" in t for t in labels) and any("mean of" in t for t in labels)


def test_a_124m_run_gets_the_gpt2_baselines(tmp_path, monkeypatch):
    figs = figure_of(monkeypatch)
    write_run_json(tmp_path, 12, 12, 768, 124_475_904)
    logplot.plot(write_log(tmp_path))
    loss_ax, hella_ax = figs[0].axes
    assert any("OpenAI GPT-2 (124M)" in t.get_text() for t in loss_ax.get_legend().get_texts())
    assert any("GPT-3" in t.get_text() for t in hella_ax.get_legend().get_texts())
    assert any("124M (12L, 768C)" in t.get_text() for t in loss_ax.get_legend().get_texts())
    figs.clear()
    logplot.plot(tmp_path, baselines=False)
    assert not any("OpenAI" in t.get_text() for t in figs[0].axes[0].get_legend().get_texts())


def test_the_size_comes_from_a_checkpoint_when_there_is_no_run_json(tmp_path):
    from nanogpt_np import GPT, GPTConfig, checkpoint
    from nanogpt_np.optim import AdamW
    from tests.helpers import loader_state

    model = GPT(GPTConfig(block_size=16, vocab_size=61, n_layer=2, n_head=2, n_embd=8))
    checkpoint.save_checkpoint(tmp_path / "model_00002.npz", model, AdamW(model.parameters()), 2, [loader_state()],
                               np.random.default_rng(0).bit_generator.state)
    write_log(tmp_path)
    info = logplot.run_info(tmp_path)
    assert info["parameters"] == model.num_parameters() and info["model_config"]["n_layer"] == 2


def test_skipped_step_lines_are_notes_not_values(tmp_path):
    text = "0 train 3.0\n1 train nan\n1 skipped loss nan (non-finite; 1 in a row)\n2 train 2.5\n"
    series = logplot.read_log(write_log(tmp_path, text))
    assert set(series) == {"train"} and len(series["train"][0]) == 3
    assert logplot.plot(tmp_path).is_file()  # the NaN step is left out of the curve
    assert logplot.summary(series) == ["min train loss: 2.5000"]

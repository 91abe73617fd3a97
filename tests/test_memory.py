"""The memory plan against what a training step really allocates, and --batch-size auto."""
import tracemalloc

import numpy as np
import pytest

from nanogpt_np import GPTConfig, memory

SHAPES = [  # L, C, NH, T, B, V: 50 MB to 1 GB, so the interpreter's own allocations do not matter
    (4, 128, 4, 128, 4, 5000),
    (2, 256, 8, 256, 2, 50304),
    (1, 768, 12, 1024, 1, 50304),
]


@pytest.mark.parametrize("L,C,NH,T,B,V", SHAPES)
@pytest.mark.parametrize("recompute", [False, True])
def test_the_plan_is_within_15_percent_of_the_measured_peak(L, C, NH, T, B, V, recompute):
    cfg = GPTConfig(block_size=T, vocab_size=V, n_layer=L, n_head=NH, n_embd=C)
    from nanogpt_np.cpu import num_threads

    peak, _ = memory.measure_peak(cfg, B, T, recompute)
    planned = memory.plan(cfg, B, T, recompute=recompute, threads=num_threads()).total
    assert abs(planned - peak) <= 0.15 * peak, f"plan {planned / 2**20:.1f} MiB, measured {peak / 2**20:.1f} MiB"


def test_the_plan_table_and_zero_share():
    cfg = GPTConfig(vocab_size=50304)
    whole = memory.plan(cfg, 16, 1024, available=80 * 2**30, where="test")
    zero = memory.plan(cfg, 16, 1024, zero_ranks=4, available=80 * 2**30, where="test")
    moments = dict(whole.rows)["AdamW moments"]
    assert moments == 2 * 4 * memory.parameter_count(cfg)
    assert dict(zero.rows)["AdamW moments (1/4, --zero 1)"] == 2 * 4 * -(-memory.parameter_count(cfg) // 4)
    text = whole.table()
    assert "parameters" in text and "logits buffer" in text and "of 80.0 GiB" in text


def test_batch_candidates_divide_the_tokens_per_step():
    assert memory.batch_candidates(524288, 1024, 8) == [64, 32, 16, 8, 4, 2, 1]
    assert memory.batch_candidates(3 * 1024, 1024, 1) == [3, 1]
    assert memory.batch_candidates(1000, 1024, 1) == []


def test_auto_batch_for_124m_and_350m_under_two_caps():
    for (L, NH, C), caps in {(12, 12, 768): {8: 4, 16: 8}, (24, 16, 1024): {8: 1, 16: 4}}.items():
        cfg = GPTConfig(block_size=1024, vocab_size=50304, n_layer=L, n_head=NH, n_embd=C)
        for cap, want in caps.items():
            B, plan = memory.auto_batch_size(cfg, 1024, 524288, 1, lambda b: memory.plan(
                cfg, b, 1024, threads=2, available=cap * 2**30, where="cap"))
            assert B == want and plan.fits()
            bigger = memory.plan(cfg, 2 * B, 1024, threads=2, available=cap * 2**30)
            assert not bigger.fits()  # the next candidate up would not have fitted


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from tests.helpers import write_random_shards

    return str(write_random_shards(tmp_path_factory.mktemp("shards"), 1, 20000, 41, "r_val_000000.npy", 2000))


def small_run(data_dir, log_dir, **kw):
    from nanogpt_np.train import TrainConfig

    base = dict(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=50304, total_batch_size=512,
                max_steps=3, val_every=0, sample_every=0, ckpt_every=0, hellaswag_every=0, data_dir=data_dir,
                log_dir=str(log_dir), peak_tflops=1.0, warmup_steps=1)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("cap_mib,want", [(150, 4), (100, 2)])
def test_batch_size_auto_fits_the_cap_and_trains_as_that_b_by_hand(shards, tmp_path, cap_mib, want):
    from nanogpt_np.train import Trainer

    logs = []
    tracemalloc.start()
    try:
        auto = Trainer(small_run(shards, tmp_path / "auto", batch_size="auto", memory_gib=cap_mib / 1024),
                       log=logs.append)
        h_auto = auto.run()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert auto.cfg.batch_size == want and auto.accum == 8 // want
    assert any(f"--batch-size auto: B={want}, {8 // want} micro-step(s)" in line for line in logs)
    assert any(line.startswith("memory plan, per rank (--memory-gib") for line in logs)
    assert peak <= cap_mib * 2**20, f"B={want} peaked at {peak / 2**20:.0f} MiB, over the {cap_mib} MiB cap"
    by_hand = Trainer(small_run(shards, tmp_path / "hand", batch_size=want), log=lambda *a, **k: None).run()
    assert h_auto["train"] == by_hand["train"]


def test_batch_size_auto_says_when_nothing_fits(shards, tmp_path):
    from nanogpt_np.train import ConfigError, Trainer

    with pytest.raises(ConfigError, match="not even B=1 fits in 0.01 GiB"):
        Trainer(small_run(shards, tmp_path, batch_size="auto", memory_gib=0.01), log=lambda *a, **k: None)

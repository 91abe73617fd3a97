"""Shared by resilience_ranks.py and tests/test_mpi.py: the resharded-resume run."""
from nanogpt_np.train import TrainConfig


def config(data_dir, log_dir, **kw):
    base = dict(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=50304, batch_size=2,
                total_batch_size=64, max_lr=1e-2, min_lr=1e-3, warmup_steps=2, max_steps=20, val_every=0,
                sample_every=0, ckpt_every=0, hellaswag_every=0, data_dir=data_dir, log_dir=str(log_dir),
                peak_tflops=1.0, dtype="float64")
    base.update(kw)
    return TrainConfig(**base)


def record_reads(loader):
    """Wrap loader.next_batch to list each read as [epoch, shard, start, stop] (token
    positions in that shard). -> the list, filled as the loader is used."""
    reads, real = [], loader.next_batch

    def next_batch():
        start = loader.base + loader.B * loader.T * loader.rank
        shard = int(loader.shard_order(loader.epoch)[loader.shard_index])
        reads.append([loader.epoch, shard, start, start + loader.B * loader.T])
        return real()

    loader.next_batch = next_batch
    return reads

"""The one-rank twin of train_ranks.py's equivalence run: B=2 and 2 micro-steps."""
from nanogpt_np.train import TrainConfig


def config_for_one_rank(data_dir, log_dir):
    return TrainConfig(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=50304, batch_size=2,
                       total_batch_size=64, max_lr=1e-2, min_lr=1e-3, warmup_steps=2, max_steps=5, val_every=0,
                       sample_every=0, ckpt_every=0, hellaswag_every=0, data_dir=data_dir,
                       log_dir=str(log_dir), peak_tflops=1.0, dtype="float64")

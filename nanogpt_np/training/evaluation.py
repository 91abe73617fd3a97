"""Validation loss, HellaSwag and samples during a run (EvaluationMixin of Trainer)."""
import numpy as np

from .. import hellaswag
from ..backend import to_device
from ..tokenizer import N_VOCAB, get_encoding
from .errors import ConfigError


def evaluate(model, loader, steps, dist):
    """Mean loss over `steps` batches from the start of the loader's split."""
    loader.reset()
    total = 0.0
    for _ in range(steps):
        x, y = loader.next_batch()
        _, loss = model.forward(to_device(x, model.xp), to_device(y, model.xp))
        total += loss
    (mean,) = dist.allreduce_scalars([total / steps], op="mean")
    return mean


def generate_samples(model, prompt, num_samples, max_new_tokens, seed):
    """num_samples continuations of prompt, top-k 50, as decoded text."""
    enc = get_encoding()
    tokens = enc.encode(prompt) or [enc.eot_token]
    idx = np.tile(np.array(tokens, dtype=np.int64), (num_samples, 1))  # (num_samples, len(prompt))
    out = model.generate(idx, max_new_tokens, temperature=1.0, top_k=50, seed=seed)
    # ids in the padding above GPT-2's vocabulary (50257..vocab_size) have no text
    return [enc.decode([t for t in row.tolist() if t < N_VOCAB]) for row in out]


class EvaluationMixin:
    """Trainer's evaluation: every --val-every / --hellaswag-every / --sample-every
    steps and at the last step. Reads self.cfg, self.model, self.dist, self.rng."""

    def _load_hellaswag(self):
        """The val examples, rendered once: rank 0 fetches the file (downloading it
        if needed) while the others wait, then every rank reads it."""
        path = None
        try:
            if self.dist.is_master:
                path = hellaswag.data_file("val", path=self.cfg.hellaswag_path)
            self.dist.barrier()
            path = path or hellaswag.data_file("val", path=self.cfg.hellaswag_path, download=False)
            enc = get_encoding()
            examples = [hellaswag.render_example(e, enc) for e in hellaswag.load_examples(path, need_labels=True)]
        except (OSError, RuntimeError, ValueError) as e:
            raise ConfigError(f"HellaSwag: {e}. Pass --hellaswag-path FILE, or --hellaswag-every 0 "
                              "to train without it") from e
        longest = max((r.tokens.shape[1] for r in examples), default=0)
        if longest > self.cfg.block_size:  # found now, not hundreds of steps into the run
            raise ConfigError(f"HellaSwag rows in {path} run to {longest} tokens, more than --block-size "
                              f"{self.cfg.block_size}; use a larger block size or --hellaswag-every 0")
        return examples

    def evaluate_before(self, step):
        cfg, last = self.cfg, step == self.cfg.max_steps - 1
        if cfg.val_every and (step % cfg.val_every == 0 or last):
            self.validate(step)
        if cfg.hellaswag_every and (step % cfg.hellaswag_every == 0 or last):
            self.evaluate_hellaswag(step)
        if cfg.sample_every and ((step > 0 and step % cfg.sample_every == 0) or last):
            self.sample(step)

    def validate(self, step):
        loss = evaluate(self.model, self.val_loader, self.cfg.val_steps, self.dist)
        self.history["val"][step] = loss
        self.log(f"step {step:5d} | val loss {loss:.4f}")
        self.append_log(f"{step} val {loss:.4f}")
        return loss

    def evaluate_hellaswag(self, step):
        result = hellaswag.evaluate(self.model, self.hellaswag_examples, rank=self.dist.rank,
                                    world_size=self.dist.world_size, reduce_sum=self.dist.allreduce_sum_,
                                    examples_per_forward=4)
        self.history["hella"][step] = result.acc_norm
        self.log(f"step {step:5d} | HellaSwag acc_norm {result.acc_norm:.4f} "
                 f"(acc {result.acc:.4f}, {result.n} examples)")
        self.append_log(f"{step} hella {result.acc_norm:.4f}")
        return result

    def sample(self, step):
        seed = int(self.rng.integers(2**63))  # drawn on every rank, so the RNGs stay in step
        if not self.dist.is_master:
            return
        cfg = self.cfg
        texts = generate_samples(self.model, cfg.prompt, cfg.num_samples, cfg.sample_tokens, seed)
        self.history["samples"][step] = texts
        for i, text in enumerate(texts):
            self.log(f"sample {i}: {text!r}")

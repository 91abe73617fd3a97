"""The pieces of a training run, each on one screen; nanogpt_np/train.py assembles them.

    config.py          TrainConfig: every flag, the presets, the parser
    step.py            one optimizer step: micro-steps, allreduce, clip, AdamW
    evaluation.py      validation, HellaSwag, samples
    checkpointing.py   start, resume (on any number of ranks), save, the stops that checkpoint
    progress.py        the step line, log.txt, MFU
    errors.py          ConfigError, TrainingStopped
"""

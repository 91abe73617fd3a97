"""The training run's two errors; scripts/train.py prints either as one line."""


class ConfigError(ValueError):
    """Flags that cannot work together; the message says which and how to fix them."""


class TrainingStopped(RuntimeError):
    """The run cannot go on (too many non-finite steps in a row, or log.txt cannot be
    written); the message says why and what was saved. `collective`: every rank
    raised it at the same step, so none needs to be aborted."""

    def __init__(self, message, collective=False):
        super().__init__(message)
        self.collective = collective

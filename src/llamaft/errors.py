"""User-facing errors.

Every problem a user can fix (bad config, bad data, missing file, wrong hardware) is raised as
`LlamaftError` with a one-line message that says what is wrong, where, and how to fix it. The CLI
prints it without a traceback and exits with its `exit_code`: 2 for bad input, 3 when training
stopped because the loss or gradients were not finite. Internal bugs stay ordinary exceptions.
In a run of several processes an error that every rank raises alike is printed by rank 0 only: the
other ranks' copies are `quiet`.
"""


class LlamaftError(Exception):
    """A problem in the user's input or environment; the message is shown as-is."""

    exit_code = 2
    quiet = False  # True: the same error is printed by another process (train/distributed.py)


class DataError(LlamaftError):
    """Bad training/eval data; the message names the file, line/row and field."""

    def __init__(self, where: str, message: str):
        self.where = where
        super().__init__(f"{where}: {message}")


class ConfigError(LlamaftError):
    """Bad run configuration; the message names the key."""


class TrainingDiverged(LlamaftError):
    """Training stopped: a loss, gradient norm or weight was NaN/Inf. Nothing after the last good
    checkpoint was saved; the message names the step, the last finite loss and what to try."""

    exit_code = 3

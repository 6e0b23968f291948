"""Errors that are the user's to fix: the CLI prints them as one line and exits non-zero."""


class UserError(Exception):
    """A mistake in the input (config, data, paths, run state), reported without a traceback."""


class ConfigError(UserError):
    """An unknown key, a wrong type or an out-of-range value in the config."""


class RunStopped(Exception):
    """Training stopped on a signal after writing a checkpoint; rerunning resumes it."""

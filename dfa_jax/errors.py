"""The errors a user can cause and fix, each with a message naming the field or file, the value
and the fix. `python -m dfa_jax.main` prints them as one `error: ...` line, not a traceback.

Kept free of heavy imports: config files import `config_lib`, which imports this.
"""


class InputError(ValueError):
    """Base of every user-fixable error: bad config, data, files or workdir."""


class ConfigError(InputError):
    """A configuration mistake; the message names the field(s) and the fix."""


class DataError(InputError):
    """The data is missing, malformed or inconsistent with the config; the message says why."""


class AlphaFileError(InputError):
    """An alpha.json that does not fit the teacher's group layout."""


class CheckpointError(InputError):
    """No usable checkpoint or teacher variables where the run needs them."""


class WorkdirError(InputError):
    """The workdir cannot be used: unwritable, full, or holding a run of another config."""

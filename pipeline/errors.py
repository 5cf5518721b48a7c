"""Errors caused by the user's input. The CLI prints them as one line (no traceback unless --debug)."""


class TokenforgeError(Exception):
    """Bad input: a config key, a file, a sample. The message says what and what to do."""


class ConfigError(TokenforgeError):
    """A config key is unknown, mistyped or out of range."""


class TransientStorageError(TokenforgeError):
    """The storage failed in a way that may pass (a timeout, a reset connection, S3 5xx or throttling): a run
    retries from its last checkpoint within trainer.max_failures before stopping with this one line."""

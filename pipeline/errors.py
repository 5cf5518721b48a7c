"""Errors caused by the user's input. The CLI prints them as one line (no traceback unless --debug)."""


class TokenforgeError(Exception):
    """Bad input: a config key, a file, a sample. The message says what and what to do."""


class ConfigError(TokenforgeError):
    """A config key is unknown, mistyped or out of range."""

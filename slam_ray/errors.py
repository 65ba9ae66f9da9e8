"""User-facing errors: the CLI prints their message (no traceback) and exits with code 2."""


class SlamError(Exception):
    """Bad input the user can fix; the message says what and how."""


class ConfigError(SlamError):
    """An experiment file or override that does not validate."""

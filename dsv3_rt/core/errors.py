"""Errors a user can act on. The CLI prints them as one line (a traceback only with --debug)."""


class Dsv3Error(Exception):
    """Base class: the message alone tells the user what is wrong and, where possible, what to do."""


class ConfigError(Dsv3Error):
    """A model config is missing a field, contradicts itself, or is not DeepSeek-V2/V3."""


class CheckpointError(Dsv3Error):
    """A checkpoint is missing, incomplete, corrupt, or does not match its config."""


class BackendError(Dsv3Error):
    """A backend cannot be found, loaded or used."""


class RequestError(Dsv3Error):
    """A generation request is invalid (prompt too long, bad sampling value, ...)."""

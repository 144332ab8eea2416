"""Errors that users see: each says what was wrong and what to do about it."""


class DraftsmithError(Exception):
    """Base class for every error draftsmith reports to a user (CLI prints it without a traceback)."""


class ModelLoadError(DraftsmithError):
    """A model or tokenizer could not be found or loaded."""


class IncompatibleDrafterError(DraftsmithError):
    """The drafter cannot serve this target (different vocabulary, for example)."""


class ConfigError(DraftsmithError):
    """Impossible or contradictory settings."""

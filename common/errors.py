"""The project's exceptions: one module, each message names the thing and the fix."""

from __future__ import annotations


class FedKDError(Exception):
    """Base class: a one-line, user-facing error naming the bad thing and the fix."""


class ConfigError(FedKDError):
    """A bad experiment configuration: unknown key, wrong type, value out of range."""


class DataError(FedKDError):
    """A dataset that is missing, malformed or unusable (empty site, bad labels)."""


class ModelError(FedKDError):
    """An unknown model name or a model that cannot be built as asked."""


class TeacherWeightsError(ModelError):
    """Teacher weights that cannot be loaded from the requested source."""


class CacheError(FedKDError):
    """A teacher-feature cache entry that is corrupt or does not match its key."""


class CheckpointError(FedKDError):
    """A checkpoint or run folder that is missing, corrupt or would be overwritten."""


class MessageError(FedKDError):
    """A Flower message that lacks a required record or carries forbidden content."""

"""Domain errors: what went wrong, in the runtime's words. genserve.api.errors alone turns
them into HTTP statuses in OpenAI's shape; a batch runner or the CLI reads them as they are."""

from __future__ import annotations


class DomainError(Exception):
    """Base: a message for the caller, the request field at fault (`param`), a machine-readable
    `code`, and how long to wait before retrying when waiting helps."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s


class InvalidRequest(DomainError):
    """The caller's input cannot be served as asked."""


class PermissionDenied(DomainError):
    """The caller may not do this (a path outside the models directory)."""


class NotFound(DomainError):
    """No such object, or one the caller's project may not see."""


class ModelNotFound(NotFound):
    def __init__(self, model: str) -> None:
        super().__init__(f"The model `{model}` does not exist.", "model", "model_not_found")


class Conflict(DomainError):
    """The name is taken, or the object is in a state that forbids this."""


class Overloaded(DomainError):
    """The engine's queue is full: retry after `retry_after_s`."""


class ClientGone(DomainError):
    """The caller went away before the answer was complete."""


class Unavailable(DomainError):
    """The model (or storage) cannot serve now: failed to load, unloaded, or stopped."""


class NotReady(Unavailable):
    """Still loading: retry after `retry_after_s`."""


class InsufficientMemory(DomainError):
    """Loading this model would exceed the memory budget."""


class Internal(DomainError):
    """A bug or a resource limit inside the server."""

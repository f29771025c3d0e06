"""One error tree for the pipeline.

Permanent errors mean retrying cannot help (bad input, a forbidden transition, an
unsupported action): the message is recorded and dropped. Transient errors mean a
dependency is down (a store, the mail server): the message is retried with backoff.
"""

from __future__ import annotations


class PrivacyError(Exception):
    """Base of every error the pipeline raises on purpose."""


class PermanentError(PrivacyError):
    """Retrying will not help."""


class InvalidRequest(PermanentError):
    """An intake document broke the contract; `reason` says exactly how."""

    def __init__(self, reason: str, *, code: str = "invalid", request_id: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.code = code
        self.request_id = request_id


class ConflictingRequest(InvalidRequest):
    """The request id was used before for a different document."""


class InvalidTransition(PermanentError):
    """A request was asked to move to a state its current state does not lead to."""


class UnknownRequest(PermanentError):
    """A message named a request id the state database does not hold."""


class ConfigurationError(PermanentError):
    """Settings are missing or unsafe (e.g. demo keys in production)."""


class TransientError(PrivacyError):
    """A dependency failed in a way that may pass: retry later."""


class RetryLater(TransientError):
    """Try this message again after `delay_ms` (set by the subclass)."""

    delay_ms: int


class MailUnavailable(TransientError):
    """The mail server refused or did not answer."""


class StoreFailed(TransientError):
    """A product store failed; the store task is retried, then needs attention."""

"""The one exception every adapter stage raises for a problem the client (or operator) caused.

`AdapterError` carries the HTTP status and request field it maps to; the API turns it into an
OpenAI error body, the CLI into a bad-parameter message. It lives apart from the parsers so the
file-access, schema and format modules can all raise it without importing each other.
"""
from __future__ import annotations


class AdapterError(Exception):
    """A user-facing adapter problem; `status` is the HTTP code and `param` the request field."""

    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param


def bad_adapter(message: str) -> AdapterError:
    """A 400 about the adapter at `lora_path`."""
    return AdapterError(message, status=400, param="lora_path")

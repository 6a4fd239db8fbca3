"""HTTP errors: one exception type the routes raise, and the mapping from edgevlm's typed errors.

The body is OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` on the OpenAI routes and
Ollama's ``{"error": "message"}`` on /api/*; the status code is the same for both.
"""
from __future__ import annotations

from typing import Optional

from ..errors import (BackendError, BadMedia, BadModelFile, ContextOverflow, EdgeVLMError, InsufficientMemory,
                      MissingExtra, ModelNotFound, ModelNotInstalled, TemplateRefused, UsageError)


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", code: Optional[str] = None,
                 param: Optional[str] = None, headers: Optional[dict] = None):
        if not message.isascii():      # a client's lone surrogate quoted back must not break the answer
            message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}

    def openai_body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def ollama_body(self) -> dict:
        return {"error": self.message}


def bad_request(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def from_error(e: BaseException) -> APIError:
    """An edgevlm error (or anything else) as the HTTP error a client should see."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, EdgeVLMError):
        msg = e.message + (f" ({e.hint})" if e.hint else "")
        if isinstance(e, (ModelNotFound, ModelNotInstalled)):
            return APIError(404, msg, code="model_not_found", param="model")
        if isinstance(e, ContextOverflow):
            return APIError(400, msg, code="context_length_exceeded", param="messages")
        if isinstance(e, BadMedia):
            return APIError(400, msg, code="invalid_image", param="messages")
        if isinstance(e, TemplateRefused):        # the conversation's shape, not the engine
            return APIError(400, msg, code="invalid_messages", param="messages")
        if isinstance(e, InsufficientMemory):
            return APIError(503, msg, type="server_error", code="insufficient_memory")
        if type(e).__name__ == "UnsatisfiableSchema":      # generation.constrain: no document can satisfy it
            return APIError(400, msg, code="invalid_schema", param="response_format")
        if any(c.__name__ == "SchemaViolation" for c in type(e).__mro__) or isinstance(e, UsageError):
            # (generation.schema's, and tools' ToolCallViolation, its subclass)
            return APIError(422, msg, code="unprocessable")
        if isinstance(e, (BadModelFile, MissingExtra, BackendError)):
            return APIError(500, msg, type="server_error", code="engine_error")
        return APIError(500, msg, type="server_error")
    return APIError(500, f"Internal error ({type(e).__name__}); the server log has the details.", type="server_error")

"""Errors in OpenAI's shape (``{"error": {message, type, param, code}}``), and what the engine's
failures become: the client's mistakes are 400s naming the field, an adapter the engine refuses a 400
``adapter_not_servable``, a dead replica a 503 to retry, anything else a 500 whose detail stays in the
server log."""

from __future__ import annotations

import logging
from typing import Any

from fastapi.responses import JSONResponse

from adapterfab.chat import TemplateError
from adapterfab.errors import AdapterNotFound, ReplicaUnavailable
from adapterfab.serve.engine import AdapterRejected, InvalidPrompt, PromptTooLong
from adapterfab.serve.openai_models import FieldError
from adapterfab.serve.sampling import InvalidGuide, SamplingError
from adapterfab.serve.tiers import AdapterBusy

log = logging.getLogger("adapterfab.serve.api")


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def model_not_found(model: str) -> ApiError:
    """One message for 'missing' and 'not yours', so a 404 reveals nothing."""
    return ApiError(404, f"The model `{model}` does not exist or you do not have access to it.",
                    param="model", code="model_not_found")


def field_error(e: FieldError) -> ApiError:
    return ApiError(400, str(e), param=e.field, code=e.code)


def backend_error(exc: BaseException, model: str, tenant: str, prompt_field: str = "messages") -> ApiError:
    cause = getattr(exc, "cause", None)  # Ray wraps replica errors in RayTaskError(cause)
    exc = cause if isinstance(cause, BaseException) else exc
    if isinstance(exc, AdapterNotFound):
        return model_not_found(model)
    if isinstance(exc, ReplicaUnavailable):
        log.warning("tenant %s model %s: %s", tenant, model, exc)
        return ApiError(503, "The serving replica failed during this request; retry it.", type_="server_error",
                        code="replica_unavailable", headers={"Retry-After": "1"})
    if isinstance(exc, AdapterBusy):  # every device slot pinned by running requests for the whole wait
        log.warning("tenant %s model %s: %s", tenant, model, exc)
        return ApiError(503, "Every adapter slot of the serving replica is in use; retry shortly.",
                        type_="server_error", code="adapter_busy", headers={"Retry-After": "1"})
    if isinstance(exc, AdapterRejected):  # e.g. a rank over the engine's max_rank: the same on every retry
        log.warning("tenant %s model %s cannot be served: %s", tenant, model, exc)  # its detail names paths
        return ApiError(400, f"The model `{model}` cannot be served by this server (e.g. its rank or adapter "
                        "type is not supported here).", param="model", code="adapter_not_servable")
    if isinstance(exc, PromptTooLong):
        return ApiError(400, str(exc), param=prompt_field, code="context_length_exceeded")
    if isinstance(exc, InvalidPrompt):
        return ApiError(400, str(exc), param=prompt_field, code="invalid_prompt")
    if isinstance(exc, TemplateError):
        return ApiError(400, f"The model's chat template cannot take these messages: {exc}", param="messages",
                        code="invalid_messages")
    if isinstance(exc, InvalidGuide):
        return ApiError(400, str(exc), param="response_format", code="invalid_response_format")
    if isinstance(exc, SamplingError):  # the request's own constraints conflict (e.g. min_tokens past a guide's end)
        return ApiError(400, str(exc), param=exc.param, code="invalid_sampling_params")
    log.error("generation failed for tenant %s model %s: %r", tenant, model, exc, exc_info=exc)
    return ApiError(500, "The server failed to generate a response; see the server log.",
                    type_="server_error", code="internal_error")

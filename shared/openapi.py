"""The OpenAPI documents tell the truth: every status an /api/v1 route can answer is declared, with the JSON error
body it carries, and request strings say what the edge refuses (shared.edges: no NUL character).

Checked from outside by Schemathesis (tests/integration/test_openapi_schemathesis.py). A route declares what only
it can answer (409) with `responses=error_responses(409)`; `declare_errors` adds what every route can answer, from
the route's shape: 401 and 403 (every /api/v1 call needs a token and a role), 422 (a bad parameter, or a NUL in the
query), 404 (a path with an id), 400 and 413 (a route with a body: not JSON, or larger than it takes).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

NO_NUL = r"^[^\x00]*$"  # PostgreSQL cannot store it; shared.edges answers 422


class ErrorBody(BaseModel):
    """Every error answer: `detail` says what is wrong (a sentence, or for 422 one entry per failing field)."""

    detail: Any


class BusyBody(ErrorBody):
    """429: the pipeline lags; nothing was recorded. `detail` in English, `detail_fr` in French, and the seconds to
    wait (also in the Retry-After header)."""

    detail: str
    detail_fr: str
    retry_after_s: int


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ValidationErrorBody(BaseModel):
    detail: list[FieldError]


_DESCRIPTIONS = {
    400: "The body is not JSON (or not UTF-8), or JSON nested too deeply",
    401: "Missing or unknown bearer token",
    403: "The token's role may not do this",
    404: "No such object in the caller's scope",
    409: "Not allowed in the object's current state; nothing was changed",
    413: "Request body larger than the route takes",
    422: "A parameter or field is invalid; `detail` names each one",
    429: "Too many needs wait in the pipeline; nothing was recorded: send it again after `Retry-After` seconds",
    503: "Another service did not give its part of the answer; `detail` names it, and nothing partial is answered",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: the listed error statuses with their JSON body."""
    return {
        code: {
            "model": {422: ValidationErrorBody, 429: BusyBody}.get(code, ErrorBody),
            "description": _DESCRIPTIONS[code],
        }
        for code in codes
    }


def declare_errors(document: dict, prefix: str = "/api/v1") -> None:
    """Add to each API operation of the document the error statuses its shape implies (see the module's docstring);
    a status the route declared itself is kept as it is."""
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for model in (ErrorBody, FieldError, ValidationErrorBody):
        schemas.setdefault(model.__name__, model.model_json_schema(ref_template="#/components/schemas/{model}"))
    for path, operations in document.get("paths", {}).items():
        if not path.startswith(prefix + "/"):
            continue
        for method, operation in operations.items():
            codes = [401, 403, 422]
            if "{" in path:
                codes.append(404)
            if "requestBody" in operation or method in ("post", "put", "patch"):
                codes += [400, 413]
            responses = operation.setdefault("responses", {})
            for code in codes:
                body = "ValidationErrorBody" if code == 422 else "ErrorBody"
                responses.setdefault(
                    str(code),
                    {
                        "description": _DESCRIPTIONS[code],
                        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{body}"}}},
                    },
                )


def _refuse_nul(node: Any) -> None:
    """Every request string without a tighter rule (enum, format, pattern) gets the NO_NUL pattern."""
    if isinstance(node, dict):
        if node.get("type") == "string" and not ({"enum", "const", "format", "pattern"} & node.keys()):
            node["pattern"] = NO_NUL
        for value in node.values():
            _refuse_nul(value)
    elif isinstance(node, list):
        for value in node:
            _refuse_nul(value)


def install(app: FastAPI, refiners: list[Callable[[dict], None]]) -> None:
    """Generate the app's document with the request strings' NUL rule and each `refiners` (called with the whole
    document, e.g. to list the directory's ids); `app.openapi_schema = None` makes the next request build it again."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            document = copy.deepcopy(
                get_openapi(
                    title=app.title,
                    version=app.version,
                    openapi_version=app.openapi_version,
                    description=app.description,
                    routes=app.routes,
                )
            )
            for path in document.get("paths", {}).values():
                for operation in path.values():
                    for parameter in operation.get("parameters", []):
                        _refuse_nul(parameter.get("schema"))
                    _refuse_nul(operation.get("requestBody"))
            for name, schema in document.get("components", {}).get("schemas", {}).items():
                if name not in (
                    "ErrorBody",
                    "BusyBody",
                    "FieldError",
                    "ValidationErrorBody",
                    "HTTPValidationError",
                    "ValidationError",
                ) and not name.endswith("Public"):
                    _refuse_nul(schema)
            declare_errors(document)
            for refine in refiners:
                refine(document)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend the document

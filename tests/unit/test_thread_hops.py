"""No request and no read of a stream waits for a thread hop it does not need. FastAPI runs a plain `def` dependency in
its thread pool, so every dependency of the services' routes that neither blocks nor waits is a coroutine
(shared/deps.py); a dependency that reads the database (`read_session`) is a generator, run in the pool on purpose.
fast_depends does the same with a custom field's plain `use`, such as FastStream's `Context("message")`."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Iterator
from typing import Any

from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from services.intake import api as intake_api
from services.intake import web as intake_web
from services.notifications import api as notifications_api
from services.referral import api as referral_api
from services.referral import dashboard_pages, person_pages
from services.referral import web as referral_web
from shared import messaging


def _routes() -> Iterator[APIRoute]:
    routers = [
        intake_api.router,
        intake_web.router,
        referral_api.router,
        referral_api.dashboard_router,
        referral_api.people_router,
        referral_web.router,
        dashboard_pages.router,
        person_pages.router,
        *[value for value in vars(notifications_api).values() if type(value).__name__ == "APIRouter"],
    ]
    for router in routers:
        for route in router.routes:
            if isinstance(route, APIRoute):
                yield route


def _thread_hops(dependant: Dependant, path: str) -> Iterator[str]:
    for sub in dependant.dependencies:
        call: Any = sub.call
        function = call if inspect.isfunction(call) or inspect.ismethod(call) else type(call).__call__
        if not (
            inspect.iscoroutinefunction(function)
            or inspect.isgeneratorfunction(function)
            or inspect.isasyncgenfunction(function)
        ):
            yield f"{path}: {getattr(call, '__qualname__', repr(call))}"
        yield from _thread_hops(sub, path)


def test_the_routes_dependencies_run_on_the_event_loop() -> None:
    routes = list(_routes())
    assert len(routes) > 50  # the routers were found
    hops = sorted({hop for route in routes for hop in _thread_hops(route.dependant, f"{route.methods} {route.path}")})
    assert hops == []


def test_recording_a_need_hops_to_a_thread_only_to_write_it() -> None:
    [route] = [r for r in _routes() if r.path == "/needs" and "POST" in (r.methods or ())]
    assert list(_thread_hops(route.dependant, "/needs")) == []
    assert inspect.iscoroutinefunction(route.endpoint)


def test_a_read_batch_gets_its_message_on_the_event_loop() -> None:
    [field] = typing.get_args(messaging.BatchMessage)[1:]
    assert field.name == "message"
    assert inspect.iscoroutinefunction(field.use)

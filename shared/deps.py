"""What a service's routes depend on, as FastAPI dependencies (full-stack-fastapi-template's api/deps.py): the runtime
its `bootstrap` put in `app.state.runtime`, its settings, its clock, its database and a read session, its directory,
its pages, and the caller by role. A service's own `deps.py` adds its roles; a test overrides one with
`app.dependency_overrides[get_clock] = ...` instead of patching the service.

Each dependency that neither blocks nor waits is a coroutine: FastAPI runs a plain `def` dependency in its thread pool,
a thread hop per dependency and request (six for a POST /needs, 8 % of intake's CPU at 50 needs/s). `read_session`,
which reads the database, stays a plain generator, run in the pool."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlmodel import Session

from shared.db import Database
from shared.directory import Directory, User
from shared.pages import Pages
from shared.settings import Settings


async def get_runtime(request: Request) -> Any:
    return request.app.state.runtime


RuntimeDep = Annotated[Any, Depends(get_runtime)]  # a shared.service.ServiceRuntime of the service


async def get_settings(runtime: RuntimeDep) -> Settings:
    return runtime.settings


async def get_clock(runtime: RuntimeDep) -> Callable[[], datetime]:
    return runtime.clock


async def get_database(runtime: RuntimeDep) -> Database:
    return runtime.db


async def get_directory(runtime: RuntimeDep) -> Directory:
    return runtime.directory  # read per request: SIGHUP may have loaded another one


async def get_pages(runtime: RuntimeDep) -> Pages:
    return runtime.pages  # the service's pages (shared.pages.Pages), built once by its bootstrap


def read_session(db: Annotated[Database, Depends(get_database)]) -> Iterator[Session]:
    with db.read() as session:
        yield session


ClockDep = Annotated[Callable[[], datetime], Depends(get_clock)]
DatabaseDep = Annotated[Database, Depends(get_database)]
DirectoryDep = Annotated[Directory, Depends(get_directory)]
ReadSessionDep = Annotated[Session, Depends(read_session)]
PagesDep = Annotated[Pages, Depends(get_pages)]
SettingsDep = Annotated[Settings, Depends(get_settings)]

_bearer = HTTPBearer(auto_error=False)


def caller(*roles: str) -> Callable[..., Awaitable[User]]:
    """The signed-in user: 401 without a known token, 403 when their role may not call (shared.service's rule)."""

    async def dependency(
        request: Request,
        runtime: RuntimeDep,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> User:
        return await runtime.service.require(*roles)(request, credentials)

    return dependency


OpsUser = Annotated[User, Depends(caller("ops"))]

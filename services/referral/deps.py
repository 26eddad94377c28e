"""What referral's routers depend on, as FastAPI dependencies (in the manner of full-stack-fastapi-template's
api/deps.py): the runtime that `app.bootstrap` built, the clock, the directory, the signed-in caller, and the
`handlers.Deps` a command runs with. A test overrides one with `app.dependency_overrides[get_clock] = ...`."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Protocol

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from services.referral.dashboard import QueueWatch
from services.referral.handlers import Deps
from shared.db import Database
from shared.directory import Directory, User
from shared.messaging import Bus
from shared.pages import Pages
from shared.service import ACTOR_HEADER
from shared.settings import Settings


class Runtime(Protocol):
    """What the adapters use of `app.ReferralRuntime` (a Protocol, so this module does not import app.py)."""

    name: str
    settings: Settings
    db: Database
    bus: Bus
    directory: Directory
    clock: Callable[[], datetime]
    pages: Pages
    queue_watch: QueueWatch

    def caller(self, credentials: HTTPAuthorizationCredentials | None, actor: str | None = None) -> User: ...

    def outbox_state(self) -> dict: ...


def get_runtime(request: Request) -> Any:
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def get_clock(runtime: RuntimeDep) -> Callable[[], datetime]:
    return runtime.clock


ClockDep = Annotated[Callable[[], datetime], Depends(get_clock)]


def get_directory(runtime: RuntimeDep) -> Directory:
    return runtime.directory  # read per request: SIGHUP may have loaded a new one


DirectoryDep = Annotated[Directory, Depends(get_directory)]


def get_pages(runtime: RuntimeDep) -> Pages:
    return runtime.pages


PagesDep = Annotated[Pages, Depends(get_pages)]


def get_command_deps(runtime: RuntimeDep, clock: ClockDep, directory: DirectoryDep) -> Deps:
    return Deps(
        db=runtime.db,
        redis=runtime.bus.redis,
        settings=runtime.settings,
        directory=directory,
        clock=clock,
        wake_relay=runtime.bus.relay.wake,
    )


CommandDeps = Annotated[Deps, Depends(get_command_deps)]

_bearer = HTTPBearer(auto_error=False)


def require(*roles: str) -> Callable[..., User]:
    """A dependency giving the caller, 401 without a known token, 403 when their role may not call."""

    def caller(
        request: Request,
        runtime: RuntimeDep,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> User:
        user = runtime.caller(credentials, request.headers.get(ACTOR_HEADER))
        if user.role not in roles:
            raise HTTPException(403, f"role {user.role} may not do this")
        return user

    return caller


Reader = Annotated[User, Depends(require("partner", "ops"))]
PartnerUser = Annotated[User, Depends(require("partner"))]
OpsUser = Annotated[User, Depends(require("ops"))]

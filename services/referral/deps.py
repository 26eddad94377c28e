"""What referral's routers depend on, as FastAPI dependencies (in the manner of full-stack-fastapi-template's
api/deps.py): the shared dependencies (shared/deps.py: the runtime that `app.bootstrap` built, the clock, the
directory, the pages, the caller by role), and the `handlers.Deps` a command runs with. A test overrides one
with `app.dependency_overrides[get_clock] = ...`."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Protocol

from fastapi import Depends

from services.referral.dashboard import FiguresReuse, QueueWatch
from services.referral.handlers import Deps
from shared.db import Database
from shared.deps import (  # noqa: F401 - the routes and the tests take them from here
    ClockDep,
    DirectoryDep,
    OpsUser,
    PagesDep,
    SettingsDep,
    caller,
    get_clock,
    get_directory,
    get_pages,
    get_runtime,
    get_settings,
)
from shared.directory import Directory, User
from shared.messaging import Bus
from shared.pages import Pages
from shared.service import Service
from shared.settings import Settings


class Runtime(Protocol):
    """What the adapters use of `app.ReferralRuntime` (a Protocol, so this module does not import app.py): the shared
    parts of a `shared.service.ServiceRuntime` and referral's own."""

    @property
    def service(self) -> Service: ...

    @property
    def name(self) -> str: ...

    @property
    def settings(self) -> Settings: ...

    @property
    def db(self) -> Database: ...

    @property
    def bus(self) -> Bus: ...

    @property
    def directory(self) -> Directory: ...

    @property
    def clock(self) -> Callable[[], datetime]: ...

    @property
    def pages(self) -> Pages: ...

    @property
    def queue_watch(self) -> QueueWatch: ...

    @property
    def figures_reuse(self) -> FiguresReuse: ...


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


async def get_command_deps(runtime: RuntimeDep, clock: ClockDep, directory: DirectoryDep) -> Deps:
    return Deps(
        db=runtime.db,
        redis=runtime.bus.redis,
        settings=runtime.settings,
        directory=directory,
        clock=clock,
        wake_relay=runtime.bus.relay.wake,
    )


CommandDeps = Annotated[Deps, Depends(get_command_deps)]

ReaderUser = Annotated[User, Depends(caller("partner", "ops"))]
PartnerUser = Annotated[User, Depends(caller("partner"))]
DeskOrOpsUser = Annotated[User, Depends(caller("front_desk", "ops"))]  # the routing preview

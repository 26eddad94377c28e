"""What intake's routes depend on: the shared dependencies (shared/deps.py) and the desk's roles."""

from typing import Annotated

from fastapi import Depends

from shared.deps import (  # noqa: F401 - the routes and the tests take them from here
    ClockDep,
    DatabaseDep,
    DirectoryDep,
    OpsUser,
    PagesDep,
    ReadSessionDep,
    RuntimeDep,
    SettingsDep,
    caller,
    get_clock,
    get_database,
    get_directory,
    get_pages,
    get_runtime,
    get_settings,
    read_session,
)
from shared.directory import User
from shared.queues import PushBack

FrontDeskUser = Annotated[User, Depends(caller("front_desk"))]
ReaderUser = Annotated[User, Depends(caller("front_desk", "ops"))]


async def get_push_back(runtime: RuntimeDep) -> PushBack:
    return runtime.push_back


PushBackDep = Annotated[PushBack, Depends(get_push_back)]  # whether the pipeline lags too far for a new need

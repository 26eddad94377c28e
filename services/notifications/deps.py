"""What notifications' routes depend on: the shared dependencies (shared/deps.py) and the embedded sink's folder that
the outbox pages read; its API is for ops only."""

from typing import Annotated

from fastapi import Depends

from services.notifications.views import MailSinkFolder
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


async def get_mail_sink(runtime: RuntimeDep) -> MailSinkFolder | None:
    return runtime.mail_sink


MailSinkDep = Annotated[MailSinkFolder | None, Depends(get_mail_sink)]

"""What notifications' routes depend on: the shared dependencies (shared/deps.py); its API is for ops only."""

from shared.deps import (  # noqa: F401 - the routes and the tests take them from here
    ClockDep,
    DatabaseDep,
    DirectoryDep,
    OpsUser,
    PagesDep,
    ReadSessionDep,
    RuntimeDep,
    caller,
    get_clock,
    get_database,
    get_directory,
    get_pages,
    get_runtime,
    read_session,
)

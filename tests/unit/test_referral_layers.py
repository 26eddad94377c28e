"""Referral's application layer keeps its shape: every command has its one handler, and the adapters only
translate (no SQL, no outbox, no ops log row: those are the handlers' and the store's)."""

import inspect
import re
from pathlib import Path

from services.referral import commands, handlers

ADAPTERS = ("api.py", "web.py", "dashboard_pages.py", "consumers.py")
# What only handlers.py and store.py may write: queries, session writes, events, the ops log.
FORBIDDEN = (
    r"\bselect\(",
    r"\bsession\.(add|delete|exec|get)\b",
    r"\bemit\(",
    r"\bOpsAction\b",
    r"\bsqlalchemy\b",
    r"\breplay\(",
    r"\brevoke_user_sessions\(",
)


def test_every_command_has_exactly_one_handler():
    declared = {cls for _, cls in inspect.getmembers(commands, inspect.isclass) if cls.__module__ == commands.__name__}
    assert set(handlers.COMMAND_HANDLERS) == declared
    assert len(set(handlers.COMMAND_HANDLERS.values())) == len(declared)  # no handler serves two commands


def test_the_adapters_only_translate():
    folder = Path(handlers.__file__).parent
    found = {
        name: [pattern for pattern in FORBIDDEN if re.search(pattern, (folder / name).read_text())] for name in ADAPTERS
    }
    assert found == {name: [] for name in ADAPTERS}


def test_no_french_words_as_action_identifiers():
    from services.referral import dashboard_pages

    assert set(dashboard_pages.ACTIONS) == {
        "replay",
        "reassign",
        "assign",
        "pause",
        "resume",
        "cancel_need",
        "revoke_sessions",
    }
    assert set(dashboard_pages.PATH_OF) == set(dashboard_pages.ACTIONS)  # every action has its (French) page path

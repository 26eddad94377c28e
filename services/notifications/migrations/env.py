"""Alembic environment of this service: its tables only (see shared/migrations.py)."""

from alembic import context

from services.notifications.store import TABLES
from shared.migrations import run_env

run_env(context, TABLES)

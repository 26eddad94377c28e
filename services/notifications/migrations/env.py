"""Alembic environment of this service: its tables only (see shared/migrations.py)."""

from alembic import context

from shared.migrations import run_env

run_env(context)

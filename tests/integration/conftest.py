"""Fixtures shared by the integration tests of intake's API."""

import pytest


@pytest.fixture
def intake(settings, start_service):
    return start_service("intake", settings)


@pytest.fixture
def desk(intake):
    with intake.client("desk") as client:
        yield client

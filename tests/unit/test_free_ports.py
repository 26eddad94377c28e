"""Test processes running side by side pick loopback ports from slices that never overlap
(shared.devstack.port_range): pytest-xdist's workers, the date sweep's runs (`./dev test-dates`, three at once),
and the workers of a sweep run. A port chosen free by one process and bound a moment later cannot be taken by
another meanwhile."""

import pytest

from shared.devstack import free_port, port_range

SWEEP_RUNS, WORKERS = 6, 2


def _range(monkeypatch: pytest.MonkeyPatch, sweep: str | None, worker: int | None) -> range:
    for name in ("RELAIS_TEST_PORT_SLICE", "PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT"):
        monkeypatch.delenv(name, raising=False)
    if sweep is not None:
        monkeypatch.setenv("RELAIS_TEST_PORT_SLICE", sweep)
    if worker is not None:
        monkeypatch.setenv("PYTEST_XDIST_WORKER", f"gw{worker}")
        monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", str(WORKERS))
    low, high = port_range()
    return range(low, high + 1)


@pytest.mark.parametrize("workers", [False, True], ids=["one process per run", "xdist workers in each run"])
def test_processes_side_by_side_pick_ports_from_slices_that_never_overlap(monkeypatch, workers):
    whole = _range(monkeypatch, None, None)
    slices = [
        _range(monkeypatch, f"{run}/{SWEEP_RUNS}", worker)
        for run in range(SWEEP_RUNS)
        for worker in (range(WORKERS) if workers else [None])
    ]
    for i, one in enumerate(slices):
        assert len(one) > 100, "each slice still has room for a test run's servers"
        assert whole.start <= one.start and one.stop <= whole.stop
        for other in slices[i + 1 :]:
            assert one.stop <= other.start or other.stop <= one.start, f"{one} and {other} overlap"


def test_a_port_is_picked_in_this_process_slice_and_never_twice(monkeypatch):
    mine = _range(monkeypatch, f"4/{SWEEP_RUNS}", 1)
    picked = [free_port() for _ in range(20)]
    assert all(port in mine for port in picked)
    assert len(set(picked)) == len(picked)


@pytest.mark.parametrize("value", ["", "3", "x/6", "2/1", "1/0", "1/2/3"])
def test_a_slice_setting_that_is_not_index_of_count_means_the_whole_range(monkeypatch, value):
    assert _range(monkeypatch, value, None) == _range(monkeypatch, None, None)

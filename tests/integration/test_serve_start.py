"""What `relais serve` does between its checks and serving (relais.cli._serve): the objects made at start are
frozen out of the garbage collector's reach before the first request (relais.cli.freeze_what_start_made)."""

import gc

from relais import cli


def test_serve_freezes_what_start_made_before_serving(settings, monkeypatch) -> None:
    served: list[int] = []
    monkeypatch.setattr(cli, "serve_app", lambda app, host, port: served.append(gc.get_freeze_count()))
    gc.unfreeze()
    try:
        assert cli._serve("intake", settings) == 0
    finally:
        gc.unfreeze()
    [frozen] = served
    assert frozen > 10_000  # the modules, classes and functions of a started service, at least

"""Keep-alive connections spread over the workers (serving/balance.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.balance import ConnectionBalance, RecentClients


def test_a_worker_with_more_connections_closes_until_balanced(tmp_path: Path) -> None:
    first = ConnectionBalance.for_worker(str(tmp_path), 2, 1, margin=2)
    second = ConnectionBalance.for_worker(str(tmp_path), 2, 2, margin=2)
    assert first is not None and second is not None
    # Both connections land on the first worker: the second one is closed (2 - 0 >= margin).
    assert first.should_close(("127.0.0.1", 1)) is False
    assert first.should_close(("127.0.0.1", 2)) is True
    # It reconnects to the second worker; now 1 against 1, nobody closes.
    assert second.should_close(("127.0.0.1", 3)) is False
    assert first.should_close(("127.0.0.1", 1)) is False
    assert second.should_close(("127.0.0.1", 3)) is False


def test_connections_not_seen_for_a_window_stop_counting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    balance = ConnectionBalance(tmp_path / "counts", 2, 0, margin=3, clients=RecentClients(1.0))
    now = [100.0]
    monkeypatch.setattr("serving.balance.time.monotonic", lambda: now[0])
    assert not balance.should_close("a") and not balance.should_close("b")
    now[0] += 2.0
    assert balance.should_close("c") is False  # a and b have gone: 1 connection, not 3
    assert balance.should_close("d") is False
    assert balance.should_close("e") is True


@pytest.mark.parametrize(
    ("directory", "workers", "index", "margin"),
    [(None, 2, 1, 2), ("dir", 1, 1, 2), ("dir", 2, None, 2), ("dir", 2, 1, 0)],
)
def test_nothing_to_balance(
    directory: str | None, workers: int, index: int | None, margin: int
) -> None:
    assert ConnectionBalance.for_worker(directory, workers, index, margin) is None


def test_a_worker_slot_outside_the_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="outside"):
        ConnectionBalance(tmp_path / "counts", 2, 2, margin=2)


def test_recent_clients_count_each_connection_once_within_the_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clients = RecentClients(window_s=1.0)
    now = [50.0]
    monkeypatch.setattr("serving.balance.time.monotonic", lambda: now[0])
    assert clients.note("a") == 1 and clients.note("a") == 1  # keep-alive: the same connection
    assert clients.note("b") == 2 and len(clients) == 2
    clients.forget("b")
    assert len(clients) == 1
    now[0] += 2.0
    assert clients.note("c") == 1  # a went quiet a window ago

"""ChainBook: chain positions, failure counts, and forgetting what can no longer change."""

from __future__ import annotations

from workflowd.chains import COMPLETE_GRACE_SECONDS, IDLE_LIMIT_SECONDS, MARK_SECONDS, ChainBook


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def test_positions_and_counts() -> None:
    book = ChainBook(Clock())
    assert book.failed("orig", True) == ("orig", 0, 1)  # not a chain yet
    book.mark_retried("orig")
    book.add_retry("orig", "r1", "orig", 1, "q1")
    assert book.member("r1") is not None and book.member("r1").queue == "q1"  # type: ignore[union-attr]
    assert "r1" in book.watch
    assert book.failed("r1", True) == ("orig", 1, 2)
    book.add_retry("r1", "r2", "orig", 2, "q1")
    assert book.failed("r2", False) == ("orig", 2, 2)  # e.g. execution time: not a failure
    assert book.failed("r2", True) == ("orig", 2, 3)
    assert book.chains["orig"].members == ["orig", "r1", "r2"]


def test_complete_chain_is_forgotten_after_grace() -> None:
    clock = Clock()
    book = ChainBook(clock)
    book.add_retry("a", "b", "a", 1, None)
    book.mark_retried("a")
    book.mark_fired("wf", "a")
    clock.now += COMPLETE_GRACE_SECONDS * 2
    assert book.prune() == 0  # b is still open (sent, not seen finishing)
    book.state("b", "SUCCESS")
    assert "b" not in book.watch
    clock.now += COMPLETE_GRACE_SECONDS - 1
    assert book.prune() == 0
    clock.now += 2
    assert book.prune() == 1
    assert book.member("a") is None and book.member("b") is None and not book.chains
    assert book.was_retried("a")  # marks last a day
    assert book.threshold_fired("wf", "a")
    clock.now += MARK_SECONDS
    book.prune()
    assert not book.was_retried("a") and not book.threshold_fired("wf", "a")


def test_chain_with_lost_events_is_forgotten_after_idle_limit() -> None:
    clock = Clock()
    book = ChainBook(clock)
    book.add_retry("a", "b", "a", 1, None)
    clock.now += IDLE_LIMIT_SECONDS + 1
    assert book.prune() == 1 and "b" not in book.watch


def test_redelivered_orphan_reopens() -> None:
    clock = Clock()
    book = ChainBook(clock)
    book.add_retry("a", "b", "a", 1, None)
    book.failed("b", True)
    book.follow("b")  # orphan awaiting a possible redelivery
    assert "b" in book.watch and "b" in book.chains["a"].open
    book.state("b", "RECEIVED")
    book.state("b", "FAILURE")
    assert not book.chains["a"].open


def test_load_from_rows() -> None:
    clock = Clock()
    book = ChainBook(clock)
    t = clock.now - 100
    rows = [
        {
            "task_id": "a",
            "parent_id": None,
            "root_id": "a",
            "attempt": 0,
            "state": "FAILURE",
            "queue": None,
            "sent_at": None,
            "updated_at": t,
        },
        {
            "task_id": "b",
            "parent_id": "a",
            "root_id": "a",
            "attempt": 1,
            "state": "FAILURE",
            "queue": "q",
            "sent_at": t,
            "updated_at": t,
        },
        {
            "task_id": "c",
            "parent_id": "b",
            "root_id": "a",
            "attempt": 2,
            "state": "SENT",
            "queue": "q",
            "sent_at": t,
            "updated_at": t,
        },
    ]
    book.load(rows, [{"workflow": "w", "root_id": "a", "fired_at": t}])
    assert book.failed("c", True) == ("a", 2, 3)
    assert book.was_retried("a") and book.was_retried("b")
    assert book.threshold_fired("w", "a")
    assert book.watch == set()  # c's failure closed it

"""The latest-value slot and the backoff rule shared by every thread and retry loop."""

from __future__ import annotations

import threading

import pytest

from broadcast_filter.backoff import Backoff, backoff_delay
from broadcast_filter.slot import LatestSlot


def test_put_replaces_an_unread_value_and_counts_the_drop():
    slot: LatestSlot[int] = LatestSlot()
    for i in range(6):
        slot.put(i)
    assert slot.dropped == 5
    assert slot.take(0) == 5
    assert slot.take(0) is None
    slot.put(7)
    assert slot.dropped == 5  # the previous value was taken: nothing dropped


def test_peek_repeats_the_newest_value_without_consuming():
    slot: LatestSlot[str] = LatestSlot()
    assert slot.peek() == (None, 0)
    slot.put("a")
    assert slot.peek() == ("a", 1)
    assert slot.pending
    assert slot.take(0) == "a"
    assert slot.peek() == ("a", 1)  # still visible after the take
    assert not slot.pending


def test_take_waits_for_a_value_from_another_thread():
    slot: LatestSlot[int] = LatestSlot()
    threading.Timer(0.05, slot.put, args=(3,)).start()
    assert slot.take(5.0) == 3


@pytest.mark.parametrize("drain", [False, True])
def test_close_wakes_waiters(drain):
    slot: LatestSlot[int] = LatestSlot(drain=drain)
    got: list[int | None] = []
    waiter = threading.Thread(target=lambda: got.append(slot.take(10.0)))
    waiter.start()
    slot.close()
    waiter.join(5.0)
    assert not waiter.is_alive() and got == [None]
    assert slot.closed and slot.wait_closed(0) and not slot.wait_first(0)


def test_without_drain_close_discards_a_waiting_value():
    slot: LatestSlot[int] = LatestSlot()
    slot.put(1)
    slot.close()
    assert slot.take(0) is None


def test_with_drain_close_still_hands_out_the_last_value_once():
    slot: LatestSlot[int] = LatestSlot(drain=True)
    slot.put(1)
    slot.put(2)
    slot.close()
    assert slot.take(0) == 2
    assert slot.take(0) is None


def test_wait_closed_sleeps_until_close():
    slot: LatestSlot[int] = LatestSlot()
    assert not slot.wait_closed(0.01)
    threading.Timer(0.05, slot.close).start()
    assert slot.wait_closed(5.0)


def test_backoff_doubles_up_to_the_cap_and_resets():
    assert [backoff_delay(a, 0.5, 3.0) for a in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    backoff = Backoff(0.5, 4.0)
    assert [backoff.step() for _ in range(5)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    backoff.reset()
    assert backoff.delay == 0.5


def test_backoff_rejects_nonsense():
    with pytest.raises(ValueError, match="base"):
        Backoff(0.0, 1.0)
    with pytest.raises(ValueError, match="cap"):
        Backoff(2.0, 1.0)

"""The jitter buffer on the network paths: order kept, bounded, every drop counted."""

from __future__ import annotations

import threading

import pytest

from broadcast_filter.media.jitter import JitterBuffer


def test_a_stall_shorter_than_the_capacity_loses_nothing_and_keeps_order():
    buffer: JitterBuffer[int] = JitterBuffer(8)
    for i in range(8):  # the reader stalls for 8 frames
        buffer.put(i)
    assert [buffer.take(0) for _ in range(8)] == list(range(8))
    assert buffer.dropped == 0 and buffer.passed == 8 and buffer.take(0) is None


def test_a_longer_stall_drops_the_oldest_and_counts_every_drop():
    buffer: JitterBuffer[int] = JitterBuffer(4)
    for i in range(11):
        buffer.put(i)
        assert len(buffer) <= 4  # the delay it adds is bounded
    assert buffer.dropped == 7
    assert [buffer.take(0) for _ in range(4)] == [7, 8, 9, 10]
    assert buffer.passed + buffer.dropped == 11


def test_close_hands_out_what_is_queued_then_none():
    """The egress path relies on this: the last frames reach the encoder before its flush."""
    buffer: JitterBuffer[str] = JitterBuffer(4)
    buffer.put("a")
    buffer.put("b")
    buffer.close()
    assert (buffer.take(), buffer.take(), buffer.take()) == ("a", "b", None)
    assert buffer.closed and buffer.wait_closed(0)


def test_take_waits_for_a_put_from_another_thread_and_close_wakes_it():
    buffer: JitterBuffer[int] = JitterBuffer(2)
    got: list[int | None] = []
    reader = threading.Thread(target=lambda: got.extend([buffer.take(), buffer.take()]))
    reader.start()
    buffer.put(5)
    buffer.close()
    reader.join(5)
    assert got == [5, None]


def test_capacity_must_be_positive():
    with pytest.raises(ValueError, match="at least 1"):
        JitterBuffer(0)

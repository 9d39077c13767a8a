"""The pipe wire format between the daemon and its I/O processes, over a real OS pipe."""

from __future__ import annotations

import io
import os
import struct
import threading

import numpy as np
import pytest

from broadcast_filter.media import wire


def test_messages_round_trip_in_order_through_a_real_pipe():
    r, w = os.pipe()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, wd, 3), np.uint8) for h, wd in [(72, 128), (3, 5)]]

    def write() -> None:
        with os.fdopen(w, "wb") as out:
            wire.write_spec(out, {"url": "udp://x", "fps": 29.97})
            wire.write_frame(out, images[0], 12.5, 7)
            wire.write_text(out, wire.STATE, wire.LOST, "lost (I/O error) — ünïcode", 3.25)
            wire.write_drops(out, 42)
            wire.write_frame(out, images[1][:, ::-1], 13.0, 8)  # not contiguous

    writer = threading.Thread(target=write)
    writer.start()
    with os.fdopen(r, "rb") as inp:
        assert wire.read_spec(inp) == {"url": "udp://x", "fps": 29.97}
        first = wire.read_message(inp)
        state = wire.read_message(inp)
        drops = wire.read_message(inp)
        second = wire.read_message(inp)
        assert wire.read_message(inp) is None  # end of stream
    writer.join()
    assert (first.kind, first.a, first.b, first.t, first.n) == (wire.FRAME, 72, 128, 12.5, 7)
    np.testing.assert_array_equal(first.payload, images[0])
    assert (state.kind, state.a, state.t) == (wire.STATE, wire.LOST, 3.25)
    assert state.text == "lost (I/O error) — ünïcode"
    assert (drops.kind, drops.a, drops.payload) == (wire.DROPS, 42, b"")
    np.testing.assert_array_equal(second.payload, images[1][:, ::-1])


def test_the_header_layout_is_fixed():
    """Both ends may be different builds of the package: the header is 28 little-endian bytes."""
    out = io.BytesIO()
    wire.write_text(out, wire.STATE, wire.LIVE, "live", 1.5)
    data = out.getvalue()
    assert wire.HEADER.size == 28
    assert data[:28] == struct.pack("<IIIdQ", 2, 1, 4, 1.5, 0) and data[28:] == b"live"


def test_a_message_cut_off_mid_frame_reads_as_end_of_stream():
    out = io.BytesIO()
    wire.write_frame(out, np.zeros((4, 4, 3), np.uint8), 0.0, 0)
    cut = io.BytesIO(out.getvalue()[:-1])
    assert wire.read_message(cut) is None
    assert wire.read_message(io.BytesIO(out.getvalue()[:10])) is None


def test_a_process_without_settings_refuses_to_start():
    out = io.BytesIO()
    wire.write_text(out, wire.STATE, 0, "hello")
    with pytest.raises(SystemExit, match="expected a settings message"):
        wire.read_spec(io.BytesIO(out.getvalue()))
    with pytest.raises(SystemExit):
        wire.read_spec(io.BytesIO(b""))

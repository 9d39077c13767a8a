"""The pipe wire format between the daemon and an ingest/egress process.

Every message is a fixed header (:data:`HEADER`: kind, a, b, time, n) then a payload:

* a frame: ``(FRAME, height, width, captured_at, index)`` + ``height * width * 3`` RGB bytes;
* a state: ``(STATE, code, len(text), time, 0)`` + UTF-8 text (``code``: CONNECTING, LIVE,
  LOST; or AUDIO_STATE: what the source's audio is, ``"aac 48k stereo"`` or ``"none"``);
* the settings: ``(SPEC, 0, len, 0, 0)`` + JSON, sent once on stdin (never on argv, where
  ``ps`` would show stream keys);
* a drop count: ``(DROPS, count, 0, 0, 0)``, no payload (frames the process had to drop);
* audio: ``(AUDIO, samples, channels, captured_at, rate)`` + ``samples * channels`` float32
  (interleaved, ``rate`` Hz); from a sink's daemon side ``captured_at`` is the time the
  first sample goes on air;
* a coded AAC-LC frame: ``(CODED, len(data) + 1, samples, captured_at, rate)`` + one byte
  of channel count + the raw frame (the source's own, for sinks that copy it).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from broadcast_filter.media.audio import CodedAudio

HEADER = struct.Struct("<IIIdQ")
FRAME, STATE, SPEC, DROPS, AUDIO, CODED = 1, 2, 3, 4, 5, 6

#: state codes an I/O process reports
CONNECTING, LIVE, LOST, AUDIO_STATE = 0, 1, 2, 3


@dataclass(frozen=True)
class Message:
    """One decoded message; ``payload`` is an ``(a, b, 3)`` image for a frame, ``(a, b)``
    float32 samples for audio, else bytes."""

    kind: int
    a: int
    b: int
    t: float
    n: int
    payload: bytes | np.ndarray

    @property
    def text(self) -> str:
        assert isinstance(self.payload, bytes)
        return self.payload.decode("utf-8", "replace")


def write_frame(out: BinaryIO, image: np.ndarray, captured_at: float, index: int) -> None:
    height, width = image.shape[:2]
    out.write(HEADER.pack(FRAME, height, width, captured_at, index))
    out.write(memoryview(np.ascontiguousarray(image)).cast("B"))
    out.flush()


def write_audio(out: BinaryIO, samples: np.ndarray, t: float, rate: int) -> None:
    n, channels = samples.shape
    out.write(HEADER.pack(AUDIO, n, channels, t, rate))
    out.write(memoryview(np.ascontiguousarray(samples, np.float32)).cast("B"))
    out.flush()


def write_coded(out: BinaryIO, coded: CodedAudio, t: float) -> None:
    """A coded frame, stamped ``t`` (its capture time, or from the daemon its time on air)."""
    out.write(HEADER.pack(CODED, len(coded.data) + 1, coded.samples, t, coded.rate))
    out.write(bytes([coded.channels]) + coded.data)
    out.flush()


def coded_of(message: Message) -> CodedAudio:
    """The coded frame a CODED message carries."""
    assert isinstance(message.payload, bytes)
    data = message.payload
    return CodedAudio(data[1:], message.t, message.b, message.n, data[0])


def write_text(out: BinaryIO, kind: int, code: int, text: str, t: float = 0.0) -> None:
    data = text.encode("utf-8")
    out.write(HEADER.pack(kind, code, len(data), t, 0))
    out.write(data)
    out.flush()


def write_drops(out: BinaryIO, count: int) -> None:
    out.write(HEADER.pack(DROPS, count, 0, 0.0, 0))
    out.flush()


def write_spec(out: BinaryIO, spec: dict[str, object]) -> None:
    write_text(out, SPEC, 0, json.dumps(spec))


def read_spec(inp: BinaryIO) -> dict[str, object]:
    message = read_message(inp)
    if message is None or message.kind != SPEC:
        raise SystemExit("expected a settings message on stdin")
    return json.loads(message.text)


def read_message(inp: BinaryIO) -> Message | None:
    """Read one message; ``None`` at end of stream (also in the middle of a message)."""
    header = _read_exact(inp, HEADER.size)
    if header is None:
        return None
    kind, a, b, t, n = HEADER.unpack(header)
    if kind == FRAME:
        image = np.empty((a, b, 3), np.uint8)
        if not _read_into(inp, memoryview(image).cast("B")):
            return None
        return Message(kind, a, b, t, n, image)
    if kind == AUDIO:
        samples = np.empty((a, b), np.float32)
        if not _read_into(inp, memoryview(samples).cast("B")):
            return None
        return Message(kind, a, b, t, n, samples)
    payload = _read_exact(inp, 0 if kind == DROPS else a if kind == CODED else b)
    return None if payload is None else Message(kind, a, b, t, n, payload)


def _read_exact(inp: BinaryIO, size: int) -> bytes | None:
    buf = bytearray(size)
    return bytes(buf) if _read_into(inp, memoryview(buf)) else None


def _read_into(inp: BinaryIO, view: memoryview) -> bool:
    got = 0
    while got < len(view):
        n = inp.readinto(view[got:])
        if not n:
            return False
        got += n
    return True

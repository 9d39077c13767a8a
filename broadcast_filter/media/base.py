"""The contracts every video source and sink keeps, and the registries that name them.

A *source* yields RGB frames at its own pace; a *sink* takes RGB frames at the output's pace.
Both are context managers; ``close()`` is called exactly once and must not raise.
Frames are ``numpy.ndarray`` of shape ``(H, W, 3)``, dtype ``uint8``, RGB, C-contiguous.

Sound (:mod:`broadcast_filter.media.audio`): a source whose kind can carry audio
(``carries_audio``) hands each decoded :class:`~broadcast_filter.media.audio.AudioChunk` to
the listener set with :meth:`Source.listen_audio`, from its own thread; a sink opened with
audio (``audio`` true) takes the delayed samples in :meth:`Sink.send_audio`.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from broadcast_filter.media.audio import AUDIO_MODES, RATE, AudioChunk, CodedAudio

AudioListener = Callable[[AudioChunk], None]
CodedListener = Callable[[CodedAudio], None]


class MediaError(RuntimeError):
    """A source or sink cannot be opened or used; the message says what to do."""


class SourceLost(MediaError):
    """A live source stopped delivering (publisher gone, device unplugged); it may come back."""


@dataclass(frozen=True)
class Frame:
    """One captured frame with the time it entered the process (``time.monotonic()``)."""

    image: np.ndarray
    captured_at: float = field(default_factory=time.monotonic)
    index: int = 0


class Source(abc.ABC):
    """A video source. ``frames()`` blocks until the next frame and ends at end of stream."""

    #: registry key and URL scheme, e.g. ``"testsrc"``, ``"file"``, ``"rtmp"``
    kind: ClassVar[str]
    #: whether this source may deliver audio (then the daemon gives its sinks an audio track)
    carries_audio: ClassVar[bool] = False
    _audio_listener: AudioListener | None = None
    #: what the source's audio is, for the status line: ``"aac 48k stereo"``, ``"none"``
    audio_state: str = "none"
    #: ``(rate, channels)`` of its audio where known when opened (a file, a device); a live
    #: stream's is learned from its chunks
    audio_format: tuple[int, int] | None = None

    def listen_audio(self, listener: AudioListener | None) -> None:
        """Call ``listener`` with every audio chunk from now on (``None``: stop)."""
        self._audio_listener = listener

    def _emit_audio(self, chunk: AudioChunk) -> None:
        if (listener := self._audio_listener) is not None and len(chunk.samples):
            listener(chunk)

    _coded_listener: CodedListener | None = None

    def listen_coded(self, listener: CodedListener | None) -> None:
        """Call ``listener`` with each of the source's AAC-LC frames as it came (for sinks
        that copy them; sources that have none never call it)."""
        self._coded_listener = listener

    def _emit_coded(self, coded: CodedAudio) -> None:
        if (listener := self._coded_listener) is not None:
            listener(coded)

    @abc.abstractmethod
    def frames(self) -> Iterator[Frame]:
        """Yield frames at the source's own rate; raise :class:`SourceLost` on a live drop."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the device, socket or file."""

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Sink(abc.ABC):
    """A video sink, opened for one size and rate. ``send`` must not block for long."""

    kind: ClassVar[str]

    def __init__(self, *, width: int, height: int, fps: float) -> None:
        self.width, self.height, self.fps = width, height, fps
        #: how errors name this sink (network sinks: the URL with secrets masked)
        self.label = self.kind
        #: its audio track: ``"aac"``, ``"copy"`` or ``""`` for none (sinks that can carry
        #: one set it when opened)
        self.audio = ""

    @abc.abstractmethod
    def send(self, image: np.ndarray, at: float | None = None) -> None:
        """Deliver one ``(height, width, 3)`` uint8 RGB frame (see :meth:`check`) going on
        air at ``at`` (``time.monotonic()``; now if not given): sinks that keep time stamp
        it with that, on the clock the audio is placed on."""

    def check(self, image: np.ndarray) -> None:
        """Raise ValueError unless ``image`` is a ``(height, width, 3)`` uint8 frame."""
        if image.shape != (self.height, self.width, 3) or image.dtype != np.uint8:
            raise ValueError(
                f"{self.kind} sink {self.label!r} expects ({self.height}, {self.width}, 3) "
                f"uint8 RGB, got {image.shape} {image.dtype}"
            )

    def send_audio(  # noqa: B027 - optional
        self,
        samples: np.ndarray,
        at: float,
        rate: int = RATE,
        coded: Sequence[tuple[CodedAudio, float]] = (),
    ) -> None:
        """Deliver ``(n, channels)`` float32 samples at ``rate`` Hz whose first one goes on
        air at ``at`` (``time.monotonic()``, the clock of :meth:`send`'s frames); only if
        ``audio``. Consecutive calls are contiguous; the format changes only when the
        source's does. With ``audio == "copy"``, ``coded`` holds the source's own frames
        that go on air within these samples, each with its time on air. Must not block
        for long."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Flush and release; called exactly once."""

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def audio_track(mode: object, label: str) -> str:
    """The audio track a sink's ``audio:`` option asks for (``"aac"``, ``"copy"``; ``""``
    for ``off``, :data:`~broadcast_filter.media.audio.AUDIO_MODES`); anything else is a
    MediaError naming the sink."""
    if mode not in AUDIO_MODES:
        choices = ", ".join(AUDIO_MODES)
        raise MediaError(f"sink {label}: audio must be one of {choices}, got {mode!r}")
    return "" if mode == "off" else str(mode)


SourceFactory = Callable[..., Source]
SinkFactory = Callable[..., Sink]

SOURCES: dict[str, SourceFactory] = {}
SINKS: dict[str, SinkFactory] = {}


def register_source(kind: str, factory: SourceFactory) -> None:
    """Register a source kind; a later registration under the same name replaces it."""
    SOURCES[kind] = factory


def register_sink(kind: str, factory: SinkFactory) -> None:
    """Register a sink kind; a later registration under the same name replaces it."""
    SINKS[kind] = factory

"""The one H.264 encoder setup, shared by the file recorder and the network egress process.

libx264 (or another H.264 encoder by name) with ``tune=zerolatency`` (no lookahead, no
B-frames: a frame leaves the encoder as soon as it is encoded), yuv420p (what every player
and OBS decodes), a keyframe every ``gop`` frames and the exact frame rate of
:func:`~broadcast_filter.media.rate.frame_rate` as the stream rate and (unless a finer one is
asked for) the codec time base.
Rate control is the caller's: a CRF for a recording, a capped bitrate for live ingest.
"""

from __future__ import annotations

from fractions import Fraction

import av

from broadcast_filter.media.rate import frame_rate

#: pts from the time each frame was sent, in MPEG-TS's 90 kHz (for streams with audio, whose
#: samples are placed by time): frame numbers in ``1/fps`` would round a frame sent late
#: onto the next slot, and every later frame with it
SEND_TIME_BASE = Fraction(1, 90_000)


def send_time_pts(previous: int, sent_at: float, t0: float) -> int:
    """A frame's pts in :data:`SEND_TIME_BASE`: its send time since ``t0``, at least one
    more than the ``previous`` frame's."""
    return max(previous + 1, round((sent_at - t0) * SEND_TIME_BASE.denominator))


def add_h264_stream(
    container: av.container.OutputContainer,
    *,
    width: int,
    height: int,
    fps: float,
    gop: int,
    preset: str,
    rate_control: dict[str, str],
    codec: str = "libx264",
    time_base: Fraction | None = None,
) -> av.VideoStream:
    """Add the video stream to ``container``; ``rate_control`` are extra encoder options.
    ``time_base``: give frames pts in it (e.g. ``1/90000``, stamped by send time, as a
    stream with audio needs) instead of frame numbers in ``1/fps``."""
    rate = frame_rate(fps)
    options = {"preset": preset, "tune": "zerolatency", "g": str(gop), **rate_control}
    stream = container.add_stream(codec, rate=rate, options=options)
    stream.width, stream.height = width, height
    stream.pix_fmt = "yuv420p"
    stream.codec_context.gop_size = gop
    stream.codec_context.time_base = time_base or 1 / rate
    return stream


def live_bitrate(bitrate: int) -> dict[str, str]:
    """Constant-ish bitrate for live ingest: ``bitrate`` is also the max rate and a
    one-second VBV buffer (what streaming services ask for)."""
    return {"b": str(bitrate), "maxrate": str(bitrate), "bufsize": str(bitrate)}

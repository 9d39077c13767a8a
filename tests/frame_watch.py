"""An independent viewer of a live stream: decode it with PyAV until killed, one stdout line
per decoded frame (``WIDTH HEIGHT``), re-opening the stream whenever it ends, fails or goes
quiet, as a player that waits for its publisher does. Run in its own process (PyAV holds the
GIL while it blocks in FFmpeg)::

    python tests/frame_watch.py rtmp://127.0.0.1:1935/out/cam1
"""

from __future__ import annotations

import signal
import sys
import time

import av
import av.error
from peers import video_frames

#: seconds without data before the stream is re-opened; seconds to wait for it to open
READ_TIMEOUT, OPEN_TIMEOUT = 3.0, 5.0


def watch(url: str) -> None:
    options = {"probesize": "32768", "analyzeduration": "0"}
    while True:
        try:
            with av.open(url, options=options, timeout=(OPEN_TIMEOUT, READ_TIMEOUT)) as container:
                for frame in video_frames(container):
                    print(frame.width, frame.height, flush=True)
        except av.error.FFmpegError as exc:
            print(f"# re-opening: {exc}", file=sys.stderr, flush=True)
        time.sleep(0.2)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    watch(sys.argv[1])

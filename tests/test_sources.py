"""Local sources with real PyAV inputs: test pattern, files, X11 screen on Xvfb; URL dispatch."""

import os
import random
import shutil
import subprocess
import threading
import time
from itertools import islice

import numpy as np
import pytest

from broadcast_filter.media import base, sources
from broadcast_filter.media.base import MediaError
from broadcast_filter.media.open import list_devices, open_sink, open_source
from broadcast_filter.media.sources import (
    CaptureSource,
    FileSource,
    Pacer,
    ScreenSource,
    capture_input,
    default_camera,
    draw_counter,
    parse_device_list,
    read_counter,
    screen_input,
)

W, H = 128, 72


def take(source, n):
    return list(islice(source.frames(), n))


# --- test pattern ---------------------------------------------------------------------------


def test_default_source_is_the_paced_test_pattern_with_a_counter():
    with open_source(None, width=W, height=H, fps=30) as source:
        assert isinstance(source, sources.TestPatternSource)
        start = time.monotonic()
        frames = take(source, 10)
    assert time.monotonic() - start >= 0.9 * 9 / 30  # paced, not 500 fps
    assert [f.index for f in frames] == list(range(10))
    assert [read_counter(f.image) for f in frames] == list(range(10))
    assert all(f.image.shape == (H, W, 3) and f.image.dtype == np.uint8 for f in frames)
    stamps = [f.captured_at for f in frames]
    assert stamps == sorted(stamps)


def test_testsrc_url_sets_the_pattern_size_and_rate():
    with open_source("testsrc:320x180@15", width=W, height=H, fps=30) as source:
        assert "size=320x180" in source.spec.url and "rate=15" in source.spec.url
        start = time.monotonic()
        frames = take(source, 4)
    assert time.monotonic() - start >= 0.9 * 3 / 15
    assert frames[-1].image.shape == (H, W, 3)


def test_counter_round_trips_and_can_be_turned_off():
    image = np.zeros((H, W, 3), np.uint8)
    draw_counter(image, 0xABCDE)
    assert read_counter(image) == 0xABCDE
    with open_source("testsrc?counter=0", width=W, height=H, fps=30) as source:
        assert read_counter(take(source, 1)[0].image) != 0  # the pattern itself, no blocks


def test_close_from_another_thread_stops_frames():
    source = open_source("testsrc", width=W, height=H, fps=30)
    seen = []
    reader = threading.Thread(target=lambda: seen.extend(f.index for f in source.frames()))
    reader.start()
    time.sleep(0.2)
    source.close()
    reader.join(timeout=2)
    assert not reader.is_alive() and seen


def test_pacer_reanchors_instead_of_bursting_after_a_stall():
    pacer = Pacer(max_lag=0.1)
    pacer.wait(0.0)
    time.sleep(0.3)  # the consumer stalled: frame t=0.1 is 0.2 s late
    pacer.wait(0.1)
    start = time.monotonic()
    pacer.wait(0.2)  # due one interval after the re-anchored 0.1
    assert time.monotonic() - start >= 0.08


# --- files ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """Ten 160x90 frames at 30 fps with counters 0..9, written by the file sink."""
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    with open_sink(str(path), width=160, height=90, fps=30, audio="off") as sink:
        for i in range(10):
            image = np.full((90, 160, 3), 90, np.uint8)
            draw_counter(image, i)
            sink.send(image)
    return path


def test_file_plays_at_its_frame_rate_and_ends_cleanly(clip):
    with open_source(str(clip), width=160, height=90, fps=60) as source:
        assert isinstance(source, FileSource)
        start = time.monotonic()
        frames = list(source.frames())  # ends: no exception, no hang
    assert time.monotonic() - start >= 0.9 * 9 / 30
    assert [read_counter(f.image) for f in frames] == list(range(10))


def test_looping_file_continues_across_the_seam(clip):
    with open_source(f"file:{clip}?loop=1", width=160, height=90, fps=30) as source:
        start = time.monotonic()
        frames = take(source, 25)
    assert time.monotonic() - start >= 0.9 * 24 / 30
    assert [read_counter(f.image) for f in frames] == [*range(10), *range(10), *range(5)]
    assert [f.index for f in frames] == list(range(25))


def test_file_is_fitted_to_the_engine_size(clip):
    with open_source(str(clip), width=64, height=64, fps=30, fit="letterbox") as source:
        image = take(source, 1)[0].image
    assert image.shape == (64, 64, 3)
    assert (image[:14] == 0).all() and image[32, 60].min() > 60  # bars; grey picture


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(MediaError, match=r"not found: .*nope\.mp4"):
        open_source(str(tmp_path / "nope.mp4"), width=W, height=H, fps=30)


def test_a_file_that_is_not_video_is_refused(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(MediaError, match=r"notes.txt.*Tried: auto"):
        open_source(str(path), width=W, height=H, fps=30)


# --- capture devices: option building and errors (no camera on this machine) ---------------


def test_v4l2_options_on_linux():
    spec = capture_input(
        "/dev/video2", system="Linux", size=(1280, 720), fps=30, pixel_format="mjpeg"
    )
    assert (spec.format, spec.url) == ("v4l2", "/dev/video2")
    assert spec.options["video_size"] == "1280x720" and spec.options["framerate"] == "30"
    assert spec.options["input_format"] == "mjpeg"


def test_dshow_options_on_windows():
    spec = capture_input("Logitech C920", system="Windows", fps=29.97, pixel_format="mjpeg")
    assert (spec.format, spec.url) == ("dshow", "video=Logitech C920")
    assert spec.options["framerate"] == "30000/1001" and spec.options["vcodec"] == "mjpeg"
    raw = capture_input("video=Cam", system="Windows", pixel_format="yuyv422")
    assert raw.url == "video=Cam" and raw.options["pixel_format"] == "yuyv422"


def test_avfoundation_options_on_macos():
    spec = capture_input("0", system="Darwin", size=(640, 480), pixel_format="nv12")
    assert (spec.format, spec.url) == ("avfoundation", "0:none")
    assert spec.options["pixel_format"] == "nv12" and "framerate" not in spec.options


def test_device_number_means_the_os_camera():
    assert default_camera(0, system="Linux") == "/dev/video0"
    assert default_camera(1, system="Darwin") == "1"


@pytest.mark.skipif(os.path.exists("/dev/video99"), reason="this machine has /dev/video99")
def test_missing_camera_error_says_what_was_tried():
    with pytest.raises(MediaError) as error:
        open_source("/dev/video99?size=640x480&fps=30", width=W, height=H, fps=30)
    message = str(error.value)
    assert "Tried: v4l2 '/dev/video99'" in message
    assert "video_size=640x480" in message and "framerate=30" in message
    assert "plugged in" in message


def test_camera_of_another_os_says_this_build_lacks_it():
    with pytest.raises(MediaError, match=r"no 'dshow' input .*Tried: dshow 'video=Cam'"):
        open_source("dshow:video=Cam", width=W, height=H, fps=30)


def test_device_number_dispatches_to_capture(monkeypatch):
    opened = []
    monkeypatch.setattr(CaptureSource, "__init__", lambda self, device, **kw: opened.append(device))
    open_source("device:3", width=W, height=H, fps=30)
    open_source("v4l2:/dev/video5", width=W, height=H, fps=30)
    assert opened == [default_camera(3), "/dev/video5"]


def test_device_list_parsers_read_ffmpeg_logs():
    dshow = [
        '"Integrated Camera" (video)\n',
        '  Alternative name "@device_pnp_\\\\?\\usb#vid_04f2"\n',
        '"Microphone (Realtek)" (audio)\n',
    ]
    assert parse_device_list(dshow) == ["Integrated Camera"]
    avfoundation = [
        "AVFoundation video devices:\n",
        "[0] FaceTime HD Camera\n",
        "[1] Capture screen 0\n",
        "AVFoundation audio devices:\n",
        "[0] MacBook Pro Microphone\n",
    ]
    assert parse_device_list(avfoundation) == ["FaceTime HD Camera", "Capture screen 0"]


# --- screen ---------------------------------------------------------------------------------


def test_screen_inputs_per_os():
    linux = screen_input(":5.0+10,20", system="Linux", fps=15, size=(320, 240))
    assert (linux.format, linux.url) == ("x11grab", ":5.0+10,20")
    assert linux.options["video_size"] == "320x240" and linux.options["framerate"] == "15"
    windows = screen_input(None, system="Windows", fps=30, draw_mouse=True)
    assert (windows.format, windows.url, windows.options["draw_mouse"]) == (
        "gdigrab",
        "desktop",
        "1",
    )
    mac = screen_input(None, system="Darwin")
    assert (mac.format, mac.url) == ("avfoundation", "Capture screen 0:none")


def test_screen_without_display_says_how_to_name_one(monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    with pytest.raises(MediaError, match="set DISPLAY"):
        screen_input(None, system="Linux")


@pytest.fixture(scope="module")
def xvfb():
    """A real X server on a free display, white background, 320x180."""
    if shutil.which("Xvfb") is None:
        pytest.skip("Xvfb is not installed (apt-get install xvfb)")
    # a display number of our own: other suites on this machine may run Xvfb -displayfd too
    for number in random.sample(range(300, 900), 5):
        if os.path.exists(f"/tmp/.X11-unix/X{number}"):
            continue
        read, write = os.pipe()
        server = subprocess.Popen(
            [*f"Xvfb :{number} -displayfd {write} -screen 0 320x180x24 -wr -nolisten tcp".split()],
            pass_fds=[write],
            stderr=subprocess.DEVNULL,
        )
        os.close(write)
        with os.fdopen(read) as pipe:
            ready = pipe.readline().strip()  # "N\n" once it accepts clients; "" if it died
        if ready == str(number):
            yield f":{number}"
            server.terminate()
            server.wait(timeout=5)
            return
        server.wait(timeout=5)
    pytest.fail("could not start Xvfb on a free display")


def test_x11grab_captures_the_screen_live_and_letterboxed(xvfb):
    with open_source(f"x11grab:{xvfb}", width=64, height=64, fps=10, fit="letterbox") as source:
        assert isinstance(source, ScreenSource)
        start = time.monotonic()
        frames = take(source, 4)
    assert time.monotonic() - start >= 0.9 * 3 / 10  # live at 10 fps, no stale probe burst
    image = frames[-1].image
    assert image.shape == (64, 64, 3)
    # 320x180 white screen -> 64x36 picture between two 14-row black bars
    assert (image[:14] == 0).all() and (image[50:] == 0).all() and (image[14:50] == 255).all()


def test_screen_region_url(xvfb):
    url = f"screen:{xvfb}.0+40,20?size=160x90"
    with open_source(url, width=32, height=18, fps=30, fit="crop") as source:
        assert source.spec.url == f"{xvfb}.0+40,20"
        assert source.spec.options["video_size"] == "160x90"
        assert take(source, 1)[0].image.shape == (18, 32, 3)


def test_list_devices_shows_screens_and_why_no_virtual_camera(xvfb):
    devices = list_devices()
    assert any(d.kind == "screen" and d.url == f"x11grab:{xvfb}" for d in devices)
    vcams = [d for d in devices if d.kind == "vcam"]
    assert vcams
    if not any(d.available for d in vcams):
        assert "v4l2loopback" in vcams[0].note or "OBS" in vcams[0].note


# --- URL dispatch ---------------------------------------------------------------------------


def test_unknown_scheme_lists_the_accepted_forms():
    with pytest.raises(MediaError, match=r"unknown source 'gopher:x'(.|\n)*testsrc:WxH@FPS"):
        open_source("gopher:x", width=W, height=H, fps=30)


def test_a_bare_word_that_is_no_file_lists_the_forms():
    with pytest.raises(MediaError, match=r"not found: webcam(.|\n)*device:N"):
        open_source("webcam", width=W, height=H, fps=30)


class NativeSizeSource(base.Source):
    """Stands in for a network source (they run real peers in their own tests): 160x90 frames."""

    kind = "fake"
    state = "live"

    def __init__(self, url):
        self.url = url

    def frames(self):
        for i in range(3):
            yield base.Frame(np.full((90, 160, 3), 255, np.uint8), 1.0 + i, i)


def test_other_schemes_get_the_url_and_are_fitted_to_the_engine_size(monkeypatch):
    monkeypatch.setitem(base.SOURCES, "rtmp", NativeSizeSource)
    url = "rtmp://127.0.0.1:1935/live/x?listen=1"
    source = open_source(url, width=64, height=64, fps=25, fit="letterbox")
    assert (source.url, source.state) == (url, "live")
    frames = list(source.frames())
    assert [(f.index, f.captured_at) for f in frames] == [(0, 1.0), (1, 2.0), (2, 3.0)]
    image = frames[0].image
    assert image.shape == (64, 64, 3)
    assert (image[:14] == 0).all() and (image[50:] == 0).all() and (image[14:50] > 250).all()


def test_network_modules_are_imported_for_their_schemes():
    pytest.importorskip("broadcast_filter.media.network")
    with pytest.raises(MediaError, match="unknown source 'rtmpx:"):
        open_source("rtmpx://h/a", width=W, height=H, fps=30)
    assert {"rtmp", "udp"} <= set(base.SOURCES) and {"rtmp", "udp"} <= set(base.SINKS)


# --- sound beside a capture (audio=FORMAT:DEVICE) ---------------------------------------------

#: a stand-in for a microphone: lavfi, paced to real time, a 20 ms click every 0.5 s
CLICKS = "lavfi:aevalsrc='if(lt(mod(t,0.5),0.02),0.8,0)':s=44100,arealtime"


def test_screen_with_an_audio_device_stamps_its_sound_on_the_frames_clock(xvfb):
    """The audio input is a real FFmpeg input device read by its own thread (lavfi stands in
    for ALSA/dshow, which need hardware): chunks arrive in the device's own format (44.1 kHz
    mono, not resampled) with stamps on the monotonic clock that follow the device's
    timestamps."""
    chunks = []
    url = f"x11grab:{xvfb}?audio={CLICKS}"
    with open_source(url, width=64, height=36, fps=10) as source:
        assert source.carries_audio and "44.1k mono" in source.audio_state
        assert source.audio_format == (44_100, 1)  # known when opened: sinks open in it
        source.listen_audio(chunks.append)
        start = time.monotonic()
        frames = take(source, 20)
    assert frames[0].captured_at >= start - 0.5
    samples = np.concatenate([c.samples for c in chunks])
    assert samples.shape[1] == 1 and samples.dtype == np.float32
    assert {c.rate for c in chunks} == {44_100}
    onsets: list[float] = []
    for chunk in chunks:
        for i in np.flatnonzero(chunk.samples[:, 0] > 0.4):
            at = chunk.captured_at + i / 44_100
            if not onsets or at > onsets[-1] + 0.1:
                onsets.append(at)
    steps = np.diff(onsets)
    print(f"\n{len(chunks)} chunks; clicks {len(onsets)}, apart {np.round(steps, 4)}")
    assert len(onsets) >= 4
    # stamps come from the device's timestamps, not from when the thread got to them; the
    # first click's chunks were decoded at open (probing) and waited for the thread: the
    # clock learns the smallest offset (no stamp after its arrival), so they sit earlier
    assert np.allclose(steps[1:], 0.5, atol=0.002), steps
    # and they are on the frames' clock: the last click is no older than the last frame + 1 s
    assert abs(onsets[-1] - frames[-1].captured_at) < 1.0


def test_a_bad_audio_device_is_named():
    """Checked before the picture's device is opened (none is needed here)."""
    with pytest.raises(MediaError, match=r"audio='nosuch:x'.*no 'nosuch' input"):
        ScreenSource(":0", width=W, height=H, fps=30, audio="nosuch:x")
    with pytest.raises(MediaError, match="give FORMAT:DEVICE"):
        ScreenSource(":0", width=W, height=H, fps=30, audio="default")

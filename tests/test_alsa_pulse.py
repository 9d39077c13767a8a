"""``audio=alsa:default`` against a real sound server: PulseAudio, no sound hardware.

A PulseAudio daemon of the test's own (user mode, its own socket, a ``module-null-sink``
whose monitor is the default source) serves ALSA's ``default`` through the ALSA ``pulse``
plugin (libasound2-plugins; an ``ALSA_CONFIG_PATH`` of the test's own routes ``default``
there). The ffmpeg CLI plays a beep pattern into the null sink (1 kHz, 0.1 s, at every
whole second), paced by the server's clock; :class:`AudioInput` captures the sink's monitor
as a user's microphone would be, through PyAV's own libasound.

What is asserted does not depend on the machine's speed: the beeps are 48000 samples apart
in the captured sound (nothing lost or doubled), 1 s apart on the chunks' stamps (the
device's timestamps), every stamp no later than its chunk's arrival; through the whole
daemon, the recording's sound carries the beeps 1 s apart.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import peers
import pytest
from conftest import require_tool
from daemon_harness import running, wait_for, write_config
from test_sources import xvfb  # noqa: F401  (a real X server: the picture beside the sound)

from broadcast_filter.media import audio_input
from broadcast_filter.media.audio import RATE
from broadcast_filter.media.audio_input import AudioInput

pytestmark = pytest.mark.skipif(platform.system() != "Linux", reason="ALSA: Linux only")

SINK = "bf_beeps"
BEEP = "if(lt(mod(t,1),0.1),0.8*sin(2*PI*1000*t),0)"
#: the first stamps move while the device's timestamps settle (FFmpeg's time filter on what
#: PulseAudio's plugin says its delay is, ~0.5 s off for the first second): measured after
WARM_S = 2.5


def _alsa_pulse_plugin() -> Path | None:
    """The ALSA pulse plugin's shared object, if installed (libasound2-plugins)."""
    audio_input.use_system_alsa()
    folder = os.environ.get("ALSA_PLUGIN_DIR")
    plugin = Path(folder or "/nonexistent") / "libasound_module_pcm_pulse.so"
    return plugin if plugin.is_file() else None


def _missing(message: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def pulse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A PulseAudio daemon with a null sink whose monitor is ALSA's ``default`` capture, and
    the ffmpeg CLI playing the beeps into the sink; both stopped (by PID) afterwards."""
    for tool in ("pulseaudio", "pactl", "ffmpeg"):
        require_tool(tool)
    if "alsa" not in av.formats_available:
        _missing("this PyAV has no 'alsa' input")
    if _alsa_pulse_plugin() is None:
        _missing("the ALSA pulse plugin is not installed (apt-get install libasound2-plugins)")
    runtime, home = tmp_path / "run", tmp_path / "home"
    runtime.mkdir(mode=0o700)
    home.mkdir()
    socket = runtime / "native"
    server = {"HOME": str(home), "XDG_RUNTIME_DIR": str(runtime),
              "PULSE_RUNTIME_PATH": str(runtime / "pulse")}  # fmt: skip
    argv = ["pulseaudio", "-n", "--daemonize=no", "--exit-idle-time=-1", "--disallow-exit",
            "--use-pid-file=no", "--disable-shm=yes", "--log-target=stderr",
            "-L", f"module-native-protocol-unix auth-anonymous=1 socket={socket}",
            "-L", f"module-null-sink sink_name={SINK} rate={RATE} channels=2"]  # fmt: skip
    log = (tmp_path / "pulseaudio.log").open("w")
    daemon = peers.spawn(argv, env={**os.environ, **server}, stdout=log, stderr=log)
    client = {**os.environ, "PULSE_SERVER": f"unix:{socket}"}
    try:
        wait_for("PulseAudio to answer", lambda: daemon.poll() is not None or subprocess.run(
            ["pactl", "info"], env=client, capture_output=True).returncode == 0, 15)  # fmt: skip
        assert daemon.poll() is None, (tmp_path / "pulseaudio.log").read_text()
        subprocess.run(["pactl", "set-default-source", f"{SINK}.monitor"], env=client, check=True)
        config = tmp_path / "asound.conf"
        config.write_text("pcm.!default { type pulse }\nctl.!default { type pulse }\n")
        monkeypatch.setenv("PULSE_SERVER", f"unix:{socket}")
        monkeypatch.setenv("ALSA_CONFIG_PATH", str(config))  # re-read at every open
        # no -re: the null sink takes the sound at its clock's pace (2 s buffered ahead)
        beeps = f"aevalsrc='{BEEP}|{BEEP}':s={RATE}:d=120"
        peers.spawn(["ffmpeg", "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i", beeps,
                     "-f", "pulse", "-device", SINK, "beeps"], env=client,
                    stdout=subprocess.DEVNULL, stderr=sys.stderr)  # fmt: skip
        playing = ["pactl", "list", "short", "sink-inputs"]
        wait_for("the beeps to play", lambda: subprocess.run(
            playing, env=client, capture_output=True, text=True).stdout.strip(), 10)  # fmt: skip
        yield client
    finally:
        peers.stop_all()
        log.close()


def test_pyavs_own_libasound_reads_the_system_alsa_configuration():
    """PyAV's wheels bundle a libasound that looks for its configuration under their build
    tree: opened through :class:`AudioInput` it finds the system's (ALSA's ``null`` device is
    defined there). In a fresh process without ALSA variables: libasound reads them once."""
    if not any((Path(av.__file__).resolve().parent.parent / "av.libs").glob("libasound*")):
        pytest.skip("this PyAV uses the system's libasound")
    if not Path("/usr/share/alsa/alsa.conf").is_file():
        _missing("no system ALSA configuration (apt-get install libasound2-data)")
    code = ("from broadcast_filter.media.audio_input import AudioInput\n"
            "source = AudioInput('alsa:null', print)\n"
            "print(source.state)\n"
            "source.close()\n")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALSA_")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "48k" in done.stdout, done.stdout


def onsets(times: np.ndarray, left: np.ndarray) -> list[int]:
    """Indices of the first loud sample of each beep (after at least 0.5 s of quiet; not a
    beep that was already sounding when the sound starts)."""
    loud = np.flatnonzero(np.abs(left) > 0.3)
    starts = [int(i) for k, i in enumerate(loud) if k == 0 or i - loud[k - 1] > RATE // 2]
    return [i for i in starts if i > RATE // 8]


@pytest.mark.peers
def test_alsa_default_captures_pulseaudio_beeps_on_the_device_clock(pulse):
    chunks, arrivals = [], []

    def emit(chunk) -> None:
        arrivals.append(time.monotonic())
        chunks.append(chunk)

    source = AudioInput("alsa:default", emit)
    assert source.state.startswith("pcm_s16le 48k"), source.state
    started = time.monotonic()
    source.start()
    wait_for("6 s of sound", lambda: sum(len(c.samples) for c in chunks) >= 6 * RATE, 30)
    source.close()
    wall = time.monotonic() - started
    assert "stopped" not in source.state, source.state
    sizes = [len(c.samples) for c in chunks]
    stamps = np.array([c.captured_at for c in chunks])
    # stamps are never later than the chunk's arrival (a stamp says when it was captured)
    late = np.array(arrivals) - stamps
    print(f"\n{len(chunks)} chunks of {sorted(set(sizes))} samples, {sum(sizes) / RATE:.3f} s "
          f"of sound in {wall:.3f} s; arrival - stamp ms: min {late.min() * 1e3:.1f}, "
          f"median {np.median(late) * 1e3:.1f}")  # fmt: skip
    assert late.min() >= -0.001 - sizes[0] / RATE, late.min()
    # the sound keeps up with the wall clock (only a lower bound: a busy machine may be
    # late to read, never early)
    assert sum(sizes) / RATE <= wall + 0.05
    times = np.concatenate([c.captured_at + np.arange(len(c.samples)) / RATE for c in chunks])
    left = np.concatenate([c.samples[:, 0] for c in chunks])
    found = onsets(times, left)
    steps = np.diff(found)
    print(f"beeps at samples {found}; apart (samples) {steps.tolist()}")
    assert len(found) >= 5, found
    # nothing lost or doubled between the null sink and the chunks: exactly 1 s of samples
    assert np.all(np.abs(steps - RATE) <= 2), steps
    # after the device's timestamps settle, the stamps put the beeps 1 s apart
    settled = [times[i] for i in found if times[i] >= times[0] + WARM_S]
    spacing = np.diff(settled)
    print(f"settled beeps apart on the stamps (ms): {np.round(spacing * 1e3, 2).tolist()}")
    assert len(settled) >= 3, settled
    assert np.all(np.abs(spacing - 1.0) < 0.010), spacing
    # and the stamps follow the samples: no gap or overlap over the settled span
    first = int(np.searchsorted(times, times[0] + WARM_S))
    span, counted = times[-1] - times[first], (len(times) - 1 - first) / RATE
    print(f"settled span: {span:.4f} s on the stamps, {counted:.4f} s of samples")
    assert abs(span - counted) < 0.010, (span, counted)


@pytest.mark.peers
@pytest.mark.slow
def test_daemon_records_the_alsa_sound_beside_the_screen(pulse, xvfb, tmp_path, model_cache):  # noqa: F811
    """The whole daemon: an X11 screen with ``audio=alsa:default`` -> an MP4 with AAC sound,
    read back with PyAV: the beeps are there, 1 s apart."""
    out = tmp_path / "out.mp4"
    config = write_config(tmp_path, source=f"x11grab:{xvfb}?audio=alsa:default",
                          sinks=[str(out)], size=(64, 64), fps=10, start="passthrough",
                          cache_dir=model_cache)  # fmt: skip
    with running(config) as (daemon, _, _lines):
        wait_for("frames out", lambda: daemon.stats()["frames_out"] > 0, 60)
        state = wait_for("the source's audio", lambda: (s := daemon.stats()["fields"].get(
            "audio", "")) and "pcm_s16le" in s and s, 30)  # fmt: skip
        time.sleep(WARM_S + 4.5)
    print(f"\naudio: {state}")
    with av.open(str(out)) as container:
        stream = container.streams.audio[0]
        assert (stream.codec_context.name, stream.sample_rate) == ("aac", RATE)
        decoded = list(container.decode(stream))
    times = np.concatenate([f.time + np.arange(f.samples) / RATE for f in decoded])
    left = np.concatenate([f.to_ndarray()[0] for f in decoded])
    found = onsets(times, left)
    at = [float(times[i]) for i in found]
    print(f"{len(left) / RATE:.2f} s of sound; beeps at {np.round(at, 3).tolist()}")
    settled = np.diff([t for t in at if t >= times[0] + WARM_S])
    assert len(settled) >= 2, at
    assert np.all(np.abs(settled - 1.0) < 0.010), settled

#!/usr/bin/env bash
# Install everything broadcast_filter and its test suite need, from scratch, into ./.venv.
#   - Debian packages for the real-peer tests (ffmpeg, nginx-rtmp, srt-tools, Xvfb, OBS,
#     PulseAudio with the ALSA pulse plugin for audio=alsa:default) when
#     run as root on Debian/Ubuntu (skip with NO_APT=1);
#   - PyTorch first, pinned so pip takes the CPU build (a GPU user installs their CUDA torch
#     before running this: any torch>=2.4 already present is kept);
#   - the package in editable mode with its test and NDI extras.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${NO_APT:-0}" != 1 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends \
    ffmpeg nginx libnginx-mod-rtmp srt-tools xvfb xauth xdotool obs-studio fonts-dejavu-core stress-ng \
    chromium chromium-driver pulseaudio pulseaudio-utils libasound2-plugins \
    >/dev/null
fi

python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q torch==2.13.0
fi
python -m pip install -q -e ".[test,ndi]"
echo "installed: $(python -c 'import broadcast_filter, torch, av; print("broadcast_filter", broadcast_filter.__version__, "torch", torch.__version__, "av", av.__version__)')"

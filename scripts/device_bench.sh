#!/usr/bin/env bash
# The GPU benchmark in one call of a lent device machine (Python 3.12, torch there, no network).
#
# Here, first:   bash scripts/device_bench.sh fetch     # wheels into .whl/ (git-ignored)
# There:         bash scripts/device_bench.sh run       # carry .whl; JSON lines into $OUT
#
# Ours: diffusers and the packages our engine imports that the device image may lack; the
# reference: streamdiffusion 0.1.1 on its own old stack, in a separate --target folder.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
fetch)
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  get() {
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d ".whl/$1" "${@:2}"
  }
  get ours diffusers==0.42.1 safetensors peft==0.21.2
  get ref streamdiffusion==0.1.1 diffusers==0.24.0 huggingface_hub==0.25.2 \
    transformers==4.46.3 tokenizers==0.20.3
  ls -R .whl
  ;;
run)
  python3 -m pip install -q --no-deps --target /tmp/ours .whl/ours/*.whl
  python3 -m pip install -q --no-deps --target /tmp/sdref .whl/ref/*.whl
  export PYTHONPATH="/tmp/ours:$PWD" PYTHONUNBUFFERED=1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "${OUT:-.}/gpu.txt"
  python3 scripts/bench_gpu.py --device cuda --reference-path /tmp/sdref "${@:2}" \
    | tee "${OUT:-.}/bench_gpu.jsonl"
  ;;
*)
  echo "usage: $0 fetch|run [bench_gpu.py options]" >&2
  exit 2
  ;;
esac

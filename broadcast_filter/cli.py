"""``broadcast-filter``: run the live filter, check presets, list devices, diagnose the setup.

Exit codes: 0 ok, 1 runtime failure (camera, model, sink), 2 configuration or usage error.
"""

from __future__ import annotations

import argparse
import gc
import sys
from dataclasses import replace
from pathlib import Path

from broadcast_filter import __version__
from broadcast_filter.control.config import ConfigError, SinkSettings, UsageError, load_config
from broadcast_filter.control.obs_cli import add_obs_parser
from broadcast_filter.control.presets import PresetLibrary, load_preset
from broadcast_filter.media.base import MediaError
from broadcast_filter.quiet import quiet_third_party
from broadcast_filter.runtime.doctor import run_checks

DEFAULT_CONFIG = Path("configs/default.yaml")

EPILOG = """\
first steps:
  broadcast-filter run --config configs/demo.yaml --frames 150
      test pattern -> offline tiny model -> demo.mp4; needs no camera, GPU or download
  broadcast-filter doctor
      what this machine has (accelerator, virtual camera, cached models) and what to install
  broadcast-filter run
      the real setup (configs/default.yaml): first camera -> sd-turbo -> virtual camera

while running: Ctrl-C stops cleanly (files are finalised); edit a preset file and it reloads.
docs: docs/usage.md
"""


def _config_path(args: argparse.Namespace) -> Path:
    if args.config is not None:
        return args.config
    if DEFAULT_CONFIG.is_file():
        return DEFAULT_CONFIG
    raise UsageError(
        f"no --config given and no {DEFAULT_CONFIG} here; "
        "try: broadcast-filter run --config configs/demo.yaml"
    )


# ----------------------------------------------------------------------------- run


def cmd_run(args: argparse.Namespace) -> int:
    config = load_config(_config_path(args))
    if config.streams and (args.source is not None or args.output):
        raise UsageError(
            f"--source/--output: {config.path} has streams:, give each stream's source "
            "and sinks there"
        )
    if args.source is not None:
        config = replace(config, source=replace(config.source, url=args.source))
    if args.output:
        config = replace(config, sinks=tuple(SinkSettings(url) for url in args.output))
    if args.frames is not None and args.frames < 1:
        raise UsageError("--frames must be at least 1")
    if args.duration is not None and args.duration <= 0:
        raise UsageError("--duration must be positive")
    quiet_third_party()  # before the model libraries are imported
    from broadcast_filter.runtime.build import run_daemon  # imports torch: after the checks
    from broadcast_filter.runtime.daemon import Limits

    limits = Limits(frames=args.frames, duration=args.duration)
    if config.streams:
        from broadcast_filter.runtime.site import build_site
        from broadcast_filter.runtime.telemetry import StatusLine

        site = build_site(config, preset=args.preset, limits=limits, status=StatusLine(sys.stderr))
        return site.run()
    return run_daemon(config, preset=args.preset, limits=limits)


# ----------------------------------------------------------------------------- presets


def cmd_presets_list(args: argparse.Namespace) -> int:
    config = load_config(_config_path(args))
    library = PresetLibrary(config.presets_folder)
    library.scan()
    print(f"presets in {config.presets_folder}:")
    for name in library.names():
        p = library.get(name)
        start = "*" if name == config.presets.start else " "
        if p.bypass:
            what = "passthrough (engine bypassed)"
        else:
            what = f"t_index {list(p.t_index_list)} cfg {p.cfg_type} g {p.guidance_scale:g}"
            what += f" ssf {'on' if p.ssf.enabled else 'off'}"
        reload = f"  [needs reload: model {p.model_spec(config.model).id}]" if p.model else ""
        print(f" {start} {name:<16} {what}{reload}")
        if p.description:
            print(f"    {p.description}")
    for name, error in sorted(library.errors.items()):
        print(f" ! {name:<16} invalid:\n{_indent(str(error))}")
    return 2 if library.errors else 0


def cmd_presets_validate(args: argparse.Namespace) -> int:
    files = list(args.files)
    if not files:
        folder = load_config(_config_path(args)).presets_folder
        files = sorted(folder.glob("*.y*ml"))
    bad = 0
    for path in files:
        try:
            preset = load_preset(path)
        except ConfigError as exc:
            bad += 1
            print(exc)
        else:
            print(f"{path}: ok ({'passthrough' if preset.bypass else 'style'})")
    return 2 if bad else 0


def _indent(text: str) -> str:
    return "\n".join(f"      {line}" for line in text.splitlines())


# ----------------------------------------------------------------------------- devices, doctor


def cmd_devices(args: argparse.Namespace) -> int:
    from broadcast_filter.media.open import SINK_FORMS, SOURCE_FORMS, list_devices

    devices = list_devices()
    kinds = (
        ("camera", "cameras"),
        ("screen", "screens"),
        ("vcam", "virtual cameras"),
        ("ndi", "NDI sources (--source ndi:NAME)"),
    )
    for kind, title in kinds:
        print(f"{title}:")
        found = [d for d in devices if d.kind == kind]
        for d in found:
            mark = "  " if d.available else "! "
            note = f"  ({d.note})" if d.note else ""
            print(f"  {mark}{d.url:<32} {d.name}{note}")
        if not found:
            print("    none found")
            if kind == "ndi":
                print(
                    "    (searched 1.5 s by mDNS; for unicast discovery point NDI_CONFIG_DIR "
                    "at a folder whose ndi-config.v1.json lists the senders' IPs)"
                )
    print(f"\nsource forms (--source):\n{SOURCE_FORMS}\n\nsink forms (--output):\n{SINK_FORMS}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    path = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    config = load_config(path) if path else None
    quiet_third_party()  # the dtype check may load the model
    return run_checks(config)


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="broadcast-filter",
        description="Live StreamDiffusion filter: camera or stream in, stylised video out "
        "to a virtual camera, a file or a network stream.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config_help = f"daemon config YAML (default: {DEFAULT_CONFIG})"
    run = sub.add_parser(
        "run",
        help="run the filter: source -> model -> sinks",
        description="Run the live filter until Ctrl-C (or --frames / --duration).",
    )
    run.add_argument("--config", type=Path, metavar="FILE", help=config_help)
    run.add_argument("--preset", metavar="NAME", help="preset to start with (see: presets list)")
    run.add_argument(
        "--source", metavar="URL|DEVICE", help="replace the config's source (see: devices)"
    )
    run.add_argument(
        "--output",
        action="append",
        metavar="PATH|vcam",
        help="replace the config's sinks; repeat for several (out.mp4, vcam, null, rtmp://...)",
    )
    run.add_argument("--frames", type=int, metavar="N", help="stop after N output frames")
    run.add_argument("--duration", type=float, metavar="S", help="stop after S seconds of output")
    run.set_defaults(func=cmd_run)

    presets = sub.add_parser("presets", help="list or check preset files")
    pre = presets.add_subparsers(dest="presets_command", required=True, metavar="{list,validate}")
    listing = pre.add_parser("list", help="the presets of the config's presets folder")
    listing.add_argument("--config", type=Path, metavar="FILE", help=config_help)
    listing.set_defaults(func=cmd_presets_list)
    validate = pre.add_parser(
        "validate", help="check preset files; errors name file, line and field"
    )
    validate.add_argument("files", nargs="*", type=Path, metavar="FILE", help="default: all")
    validate.add_argument("--config", type=Path, metavar="FILE", help=config_help)
    validate.set_defaults(func=cmd_presets_validate)

    devices = sub.add_parser("devices", help="capture devices, screens and virtual cameras")
    devices.set_defaults(func=cmd_devices)

    doctor = sub.add_parser("doctor", help="check torch, accelerator, virtual camera, models")
    doctor.add_argument("--config", type=Path, metavar="FILE", help=config_help)
    doctor.set_defaults(func=cmd_doctor)

    add_obs_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``broadcast-filter`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    code = _dispatch(args)
    if argv is None:
        # The program ends now: skip the interpreter's last collection over torch's and
        # diffusers' objects (about a second, half of the 2 s a stop may take).
        gc.freeze()
    return code


def _dispatch(args: argparse.Namespace) -> int:
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"configuration error:\n{exc}", file=sys.stderr)
        return 2
    except UsageError as exc:
        print(f"broadcast-filter: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (MediaError, RuntimeError, OSError, ValueError) as exc:  # runtime failure
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""``broadcast-filter obs setup|status``: prepare and inspect OBS for the filter.

Exit codes: 0 done (``status``: everything mapped is present), 1 OBS unreachable or
password refused, 2 bad configuration, 3 (``status``) something mapped is missing.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from broadcast_filter.control.api_settings import ApiSettings
from broadcast_filter.control.config import OBS, ConfigError, UsageError, check_value, load_sections
from broadcast_filter.control.obs_bridge import ObsAuthError, connect, quiet_obsws_logging
from broadcast_filter.control.obs_settings import ObsSettings
from broadcast_filter.control.obs_setup import describe, plan_setup


def add_obs_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``obs setup [--dry-run]`` and ``obs status``; each sets ``func(args) -> exit code``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, help="daemon config YAML; its obs: section is used")
    common.add_argument("--host", help="obs-websocket host (default 127.0.0.1)")
    common.add_argument("--port", type=int, help="obs-websocket port (default 4455)")
    secret = common.add_mutually_exclusive_group()
    secret.add_argument("--password", help="obs-websocket password (visible to other users)")
    secret.add_argument("--password-env", metavar="VAR", help="read the password from $VAR")
    obs = subparsers.add_parser("obs", help="set up and inspect OBS Studio for the filter")
    actions = obs.add_subparsers(dest="obs_command", required=True, metavar="{setup,status}")
    setup = actions.add_parser(
        "setup", parents=[common], help="create the scenes and sources the obs: mapping needs"
    )
    setup.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    setup.set_defaults(func=run_setup)
    status = actions.add_parser("status", parents=[common], help="show what OBS has")
    status.set_defaults(func=run_status)
    return obs


def settings_from_args(args: argparse.Namespace) -> ObsSettings:
    """The config file's ``obs:`` section (parsed with the rest of that file), with the
    command-line options on top; ``ConfigError`` / ``UsageError`` name what is wrong."""
    settings = ObsSettings()
    if args.config is not None:
        settings = load_sections(args.config)["obs"] or settings
    changes: dict[str, Any] = {}
    for key in ("host", "port", "password"):
        if getattr(args, key) is not None:
            try:
                changes[key] = check_value(OBS, key, getattr(args, key))
            except ValueError as err:
                raise UsageError(f"--{key}: {err}") from None
    if args.password_env is not None:
        if args.password_env not in os.environ:
            raise UsageError(f"--password-env: environment variable {args.password_env} is not set")
        changes |= {"password_env": args.password_env, "password": os.environ[args.password_env]}
    elif args.password is not None:
        changes["password_env"] = None
    return replace(settings, **changes)


def _open(args: argparse.Namespace) -> tuple[ObsSettings, Any]:
    quiet_obsws_logging()
    settings = settings_from_args(args)
    try:
        return settings, connect(settings)
    except OSError as err:
        raise ConnectionError(
            f"no OBS websocket at {settings.host}:{settings.port} ({err}): is OBS running, and "
            "is Tools > WebSocket Server Settings > Enable WebSocket server on, with that port?"
        ) from None


def _guarded(run: Any, args: argparse.Namespace) -> int:
    try:
        settings, req = _open(args)
    except ConfigError as err:
        print(f"configuration error:\n{err}", file=sys.stderr)
        return 2
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (ObsAuthError, ConnectionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    try:
        return run(settings, req, args)
    finally:
        req.disconnect()


def run_setup(args: argparse.Namespace) -> int:
    return _guarded(_setup, args)


def run_status(args: argparse.Namespace) -> int:
    return _guarded(_status, args)


def dock_hint(config: Path | None) -> str:
    """Where the operator's dock is (docs/control.md), to paste into OBS's Docks > Custom
    Browser Docks: the config's ``api:`` URL (with its token), or how to turn it on."""
    api = load_sections(config)["api"] if config is not None else None
    if api is None:
        where = f"{config}" if config is not None else "the daemon config"
        return (
            f"dock: {where} has no api: section; add `api: {{}}` to get the operator's dock "
            f"at {ApiSettings().url()}"
        )
    return f"dock: in OBS, Docks > Custom Browser Docks, add the URL {api.url()}"


def _setup(settings: ObsSettings, req: Any, args: argparse.Namespace) -> int:
    steps = plan_setup(req, settings)
    if not steps:
        print("OBS already has everything the obs: mapping needs; nothing to do")
        print(dock_hint(args.config))
        return 0
    for step in steps:
        print(("would " if args.dry_run else "") + step.text)
        if not args.dry_run:
            step.run(req)
    if not args.dry_run and settings.item_presets:
        print(
            f"next: in OBS, Settings > Hotkeys, bind a key to \"Show '<item>'\" for each item of "
            f"scene {settings.controls_scene!r}"
        )
    if not args.dry_run:
        print(dock_hint(args.config))
    return 0


def _status(settings: ObsSettings, req: Any, args: argparse.Namespace) -> int:
    lines, missing = describe(req, settings)
    print("\n".join(lines))
    if missing:
        print(f"{missing} missing: run `broadcast-filter obs setup`")
    return 3 if missing else 0

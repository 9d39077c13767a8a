"""Create in the user's OBS what the ``obs:`` mapping needs, and report what is there.

``plan_setup`` reads OBS and returns the missing pieces as steps; applying them and planning
again gives no steps (idempotent). What it creates: the controls scene with one hidden color
source per ``item_presets`` entry (hotkey targets), the status text source, every mapped
scene that does not exist, and the Media Source that plays the daemon's output, placed at
the back of every mapped scene and fitted to the canvas. It never deletes or renames.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from broadcast_filter.control.obs_settings import ObsSettings

TEXT_KINDS = ("text_ft2_source_v2", "text_gdiplus_v3", "text_gdiplus_v2")
COLOR_KINDS = ("color_source_v3", "color_source_v2")
MEDIA_KIND = "ffmpeg_source"
ITEM_COLOR = 0xFF00C000  # ABGR green
ITEM_SIZE = {"width": 160, "height": 90}
STATUS_TEXT = "broadcast_filter: waiting for the daemon"


@dataclass(frozen=True)
class Step:
    """One change to OBS: what it does, in words, and how."""

    text: str
    run: Callable[[Any], Any]


def output_settings(settings: ObsSettings) -> dict[str, Any]:
    """Media Source settings for a live, low-latency network input (about 0.2 s on loopback)."""
    return {
        "is_local_file": False,
        "input": settings.output_url,
        "input_format": settings.output_format,
        "buffering_mb": 0,
        "ffmpeg_options": "fflags=nobuffer flags=low_delay",
        "reconnect_delay_sec": 1,
        "restart_on_activate": False,
        "clear_on_media_end": False,
        "hw_decode": False,
    }


def plan_setup(req: Any, settings: ObsSettings) -> list[Step]:
    """The steps that bring OBS (an obsws-python ``ReqClient``) in line with ``settings``."""
    scenes = {s["sceneName"] for s in req.get_scene_list().scenes}
    inputs = {i["inputName"] for i in req.get_input_list().inputs}
    kinds = set(req.get_input_kind_list(False).input_kinds)

    def items(scene: str) -> set[str]:
        if scene not in scenes:
            return set()
        return {i["sourceName"] for i in req.get_scene_item_list(scene).scene_items}

    steps: list[Step] = []
    controls = settings.controls_scene
    mapped = list(settings.scene_presets)
    for scene in dict.fromkeys([controls, *mapped]):
        if scene not in scenes:
            steps.append(Step(f"create scene {scene!r}", lambda r, s=scene: r.create_scene(s)))

    controls_items = items(controls)
    color_kind = _pick(kinds, COLOR_KINDS)
    for source in settings.item_presets:
        if source not in inputs:
            text = f"create color source {source!r} (hidden) in {controls!r}"
            create = (controls, source, color_kind, {"color": ITEM_COLOR, **ITEM_SIZE}, False)
            steps.append(Step(text, lambda r, a=create: r.create_input(*a)))
        elif source not in controls_items:
            text = f"add {source!r} (hidden) to {controls!r}"
            steps.append(Step(text, lambda r, s=source: r.create_scene_item(controls, s, False)))

    status = settings.status_source
    if status is not None and status not in inputs:
        text = f"create text source {status!r} in {controls!r}"
        create = (controls, status, _pick(kinds, TEXT_KINDS), {"text": STATUS_TEXT}, True)
        steps.append(Step(text, lambda r, a=create: r.create_input(*a)))

    output, wanted = settings.output_source, output_settings(settings)
    hosts = mapped or [controls]
    if output not in inputs:
        text = f"create media source {output!r} playing {settings.output_url} in {hosts[0]!r}"
        steps.append(Step(text, lambda r, s=hosts[0]: _create_output(r, s, output, wanted)))
        hosts = hosts[1:]
    else:
        current = req.get_input_settings(output)
        defaults = req.get_input_default_settings(current.input_kind).default_input_settings
        have = defaults | current.input_settings
        changed = {k: v for k, v in wanted.items() if have.get(k) != v}
        if changed:
            text = f"update media source {output!r}: " + ", ".join(
                f"{k} {have.get(k)!r} -> {v!r}" for k, v in changed.items()
            )
            steps.append(Step(text, lambda r: r.set_input_settings(output, changed, True)))
    for scene in hosts:
        if output not in items(scene):
            text = f"add {output!r} to {scene!r} (at the back, fitted to the canvas)"
            steps.append(Step(text, lambda r, s=scene: _place(r, s, output, None)))
    return steps


def _pick(kinds: set[str], candidates: tuple[str, ...]) -> str:
    for kind in candidates:
        if kind in kinds:
            return kind
    raise RuntimeError(f"this OBS offers none of the input kinds {', '.join(candidates)}")


def _create_output(req: Any, scene: str, name: str, settings: dict[str, Any]) -> None:
    item_id = req.create_input(scene, name, MEDIA_KIND, settings, True).scene_item_id
    _place(req, scene, name, item_id)


def _place(req: Any, scene: str, source: str, item_id: int | None) -> None:
    """Put ``source`` in ``scene`` (if ``item_id`` is None) at the back, fitted to the canvas."""
    if item_id is None:
        item_id = req.create_scene_item(scene, source, True).scene_item_id
    video = req.get_video_settings()
    transform = {
        "positionX": 0,
        "positionY": 0,
        "alignment": 5,
        "boundsType": "OBS_BOUNDS_SCALE_INNER",
        "boundsWidth": video.base_width,
        "boundsHeight": video.base_height,
    }
    req.set_scene_item_transform(scene, item_id, transform)
    req.set_scene_item_index(scene, item_id, 0)


def describe(req: Any, settings: ObsSettings) -> tuple[list[str], int]:
    """What ``obs status`` prints, and how many mapped things are missing."""
    version = req.get_version()
    program = req.get_current_program_scene().current_program_scene_name
    scenes = {s["sceneName"] for s in req.get_scene_list().scenes}
    inputs = {i["inputName"] for i in req.get_input_list().inputs}
    lines = [
        f"OBS {version.obs_version}, obs-websocket {version.obs_web_socket_version} "
        f"at {settings.host}:{settings.port}",
        f"program scene: {program!r} -> preset {settings.scene_presets.get(program, '(none)')}",
    ]
    if req.get_studio_mode_enabled().studio_mode_enabled:
        preview = req.get_current_preview_scene().current_preview_scene_name
        lines.append(f"preview scene (studio mode): {preview!r}")
    missing = 0

    def check(what: str, present: bool) -> None:
        nonlocal missing
        missing += not present
        lines.append(f"  {what}: {'ok' if present else 'MISSING'}")

    lines.append("scenes mapped to presets:")
    for scene, preset in settings.scene_presets.items():
        check(f"scene {scene!r} -> {preset}", scene in scenes)
    controls = settings.controls_scene
    lines.append(f"hotkey targets in {controls!r}:")
    check(f"scene {controls!r}", controls in scenes)
    in_controls = set()
    if controls in scenes:
        in_controls = {i["sourceName"] for i in req.get_scene_item_list(controls).scene_items}
    for source, target in settings.item_presets.items():
        check(f"item {source!r} -> {target}", source in in_controls)
    lines.append("sources:")
    if settings.status_source is not None:
        check(f"status text {settings.status_source!r}", settings.status_source in inputs)
    present = settings.output_source in inputs
    check(f"media source {settings.output_source!r}", present)
    if present:
        url = req.get_input_settings(settings.output_source).input_settings.get("input")
        lines.append(f"    playing {url} (configured: {settings.output_url})")
    return lines, missing

"""``dtype: auto`` on a CPU: bfloat16 where the CPU has it natively and the check keeps the
output within the tolerance of float32, float32 otherwise; the reason is shown on load and
by ``doctor``.

Whether this CPU has native bfloat16 is fixed, so the decision's branches are driven by
injecting the detection (``native_bf16``) and the tolerance; the check itself always runs
for real on the tiny model. One test runs everything un-injected on this CPU.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
from daemon_harness import Lines, write_config

from broadcast_filter.control.config import load_config
from broadcast_filter.diffusion import precision
from broadcast_filter.diffusion.models import ModelBundle, load_models
from broadcast_filter.diffusion.precision import BF16_TOLERANCE, decide, native_bf16
from broadcast_filter.diffusion.spec import ModelSpec
from broadcast_filter.runtime.build import build_daemon
from broadcast_filter.runtime.doctor import check_dtype, run_checks
from broadcast_filter.runtime.telemetry import StatusLine

ROOT = Path(__file__).resolve().parent.parent
MEASURED = re.compile(r"measured (\d+\.\d+)")


@pytest.fixture(autouse=True)
def fresh_choices(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Every test starts with no decision cached in this process."""
    choices: dict = {}
    monkeypatch.setattr(precision, "_CHOICES", choices)
    return choices


def has_feature(monkeypatch: pytest.MonkeyPatch, feature: str | None) -> None:
    monkeypatch.setattr(precision, "native_bf16", lambda: feature)


def spec(cache: str, dtype: str = "auto") -> ModelSpec:
    return ModelSpec(id="tiny", device="cpu", dtype=dtype, cache_dir=cache)


def same_weights(a: ModelBundle, b: ModelBundle) -> bool:
    return all(
        torch.equal(x, y)
        for name in ("unet", "vae", "text_encoder")
        for x, y in zip(
            getattr(a, name).state_dict().values(),
            getattr(b, name).state_dict().values(),
            strict=True,
        )
    )


# ------------------------------------------------------------------- the decision alone


def test_no_native_bf16_is_float32_without_a_check() -> None:
    choice = decide(None, None)
    assert choice.dtype == torch.float32
    assert choice.describe() == "dtype auto -> float32 (no native bf16)"


@pytest.mark.parametrize("error", [0.0, 0.0021, BF16_TOLERANCE])
def test_within_the_tolerance_is_bfloat16_and_says_what_was_measured(error: float) -> None:
    choice = decide("AVX512-BF16", error)
    assert choice.dtype == torch.bfloat16
    assert choice.describe() == (
        f"dtype auto -> bfloat16 (CPU has AVX512-BF16; bf16 output within "
        f"{BF16_TOLERANCE:g} of float32: measured {error:.4f})"
    )


@pytest.mark.parametrize("error", [BF16_TOLERANCE * 1.01, 0.2])
def test_outside_the_tolerance_is_float32_and_says_by_how_much(error: float) -> None:
    choice = decide("AMX-BF16", error)
    assert choice.dtype == torch.float32
    assert choice.reason == (
        f"CPU has AMX-BF16, but bf16 output {error:.4f} from float32, "
        f"over the tolerance {BF16_TOLERANCE:g}"
    )


# ------------------------------------------------------------------- detection


@pytest.mark.parametrize(
    ("flags", "feature"),
    [
        ({"avx512f", "avx512_bf16"}, "AVX512-BF16"),
        ({"amx_tile", "amx_bf16", "avx512_bf16"}, "AMX-BF16"),
        ({"fp", "asimd", "bf16"}, "Arm BF16"),
        ({"avx2", "avx512f"}, None),
        (set(), None),  # /proc/cpuinfo unreadable
    ],
)
def test_linux_reads_the_cpu_flags(monkeypatch, flags: set[str], feature: str | None) -> None:
    monkeypatch.setattr(precision.platform, "system", lambda: "Linux")
    monkeypatch.setattr(precision, "_linux_cpu_flags", lambda: flags)
    assert native_bf16() == feature


def test_other_systems_ask_torch_and_never_fail_without_its_probes(monkeypatch) -> None:
    monkeypatch.setattr(precision.platform, "system", lambda: "Windows")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert native_bf16() == "AVX512-BF16"
    monkeypatch.setattr(precision.platform, "system", lambda: "Darwin")
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert native_bf16() is None  # an older torch, or Apple silicon


def test_without_onednn_there_is_no_native_bf16(monkeypatch) -> None:
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert native_bf16() is None


def test_this_linux_machine_reads_its_flags() -> None:
    if precision.platform.system() != "Linux":
        pytest.skip("reads /proc/cpuinfo")
    assert precision._linux_cpu_flags(), "no flags line in /proc/cpuinfo"


# ------------------------------------------------------------------- loading


def test_auto_with_native_bf16_within_tolerance_loads_bfloat16(monkeypatch, model_cache) -> None:
    has_feature(monkeypatch, "AVX512-BF16")
    bundle = load_models(spec(model_cache), progress=False)
    assert bundle.dtype == torch.bfloat16
    assert same_weights(bundle, load_models(spec(model_cache, "bfloat16"), progress=False))
    measured = float(MEASURED.search(bundle.dtype_reason).group(1))
    assert measured <= BF16_TOLERANCE
    assert bundle.dtype_reason.startswith("dtype auto -> bfloat16 (CPU has AVX512-BF16; ")


def test_auto_outside_tolerance_reloads_float32(monkeypatch, model_cache) -> None:
    has_feature(monkeypatch, "AVX512-BF16")
    monkeypatch.setattr(precision, "BF16_TOLERANCE", 0.0)  # any difference is too much
    bundle = load_models(spec(model_cache), progress=False)
    assert bundle.dtype == torch.float32
    assert same_weights(bundle, load_models(spec(model_cache, "float32"), progress=False))
    assert (
        "but bf16 output" in bundle.dtype_reason and "over the tolerance 0" in bundle.dtype_reason
    )


def test_auto_without_native_bf16_runs_no_check(monkeypatch, model_cache) -> None:
    has_feature(monkeypatch, None)
    monkeypatch.setattr(precision, "_check_frame", pytest.fail)
    bundle = load_models(spec(model_cache), progress=False)
    assert bundle.dtype == torch.float32
    assert bundle.dtype_reason == "dtype auto -> float32 (no native bf16)"


def test_the_check_runs_once_per_spec_in_a_process(monkeypatch, model_cache) -> None:
    has_feature(monkeypatch, "AVX512-BF16")
    first = load_models(spec(model_cache), progress=False)
    monkeypatch.setattr(precision, "_check_frame", pytest.fail)
    again = load_models(spec(model_cache), progress=False)
    assert again.dtype == first.dtype and again.dtype_reason == first.dtype_reason
    assert same_weights(again, first)


def test_explicit_dtypes_are_kept_without_a_check(monkeypatch, model_cache) -> None:
    has_feature(monkeypatch, "AVX512-BF16")
    monkeypatch.setattr(precision, "_check_frame", pytest.fail)
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        bundle = load_models(spec(model_cache, name), progress=False)
        assert bundle.dtype == dtype and bundle.dtype_reason == f"dtype {name} (as configured)"


def test_the_real_check_on_this_cpu_matches_its_reason(model_cache) -> None:
    """Nothing injected: whatever this CPU decides, the reason names it, and the measurement
    it reports is the difference between the float32 and bfloat16 loads' outputs."""
    bundle = load_models(spec(model_cache), progress=False)
    feature = native_bf16()
    if feature is None:
        assert bundle.dtype == torch.float32
        assert bundle.dtype_reason == "dtype auto -> float32 (no native bf16)"
        return
    measured = float(MEASURED.search(bundle.dtype_reason).group(1))
    assert f"CPU has {feature}" in bundle.dtype_reason
    assert bundle.dtype == (torch.bfloat16 if measured <= BF16_TOLERANCE else torch.float32)
    reference = precision._check_frame(load_models(spec(model_cache, "float32"), False))
    candidate = precision._check_frame(load_models(spec(model_cache, "bfloat16"), False))
    assert float((candidate - reference).abs().mean()) == pytest.approx(measured, abs=1e-4)


def test_the_daemon_logs_the_choice_when_it_loads(monkeypatch, model_cache, tmp_path) -> None:
    has_feature(monkeypatch, "AVX512-BF16")
    path = write_config(
        tmp_path,
        source="testsrc",
        sinks=["null"],
        size=(64, 64),
        fps=10,
        start="warm",
        cache_dir=model_cache,
    )
    lines = Lines()
    daemon = build_daemon(load_config(path), status=StatusLine(lines), progress=False)
    daemon.stop()  # never run: the load is what is under test
    logged = [line for line in lines.lines if "dtype" in line]
    assert len(logged) == 1
    assert logged[0].startswith("model tiny: dtype auto -> bfloat16 (CPU has AVX512-BF16; ")


# ------------------------------------------------------------------- doctor


def test_doctor_names_the_choice_for_the_demo_config_on_auto() -> None:
    config = load_config(ROOT / "configs" / "demo.yaml")  # it pins float32; auto is under test
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, dtype="auto"))
    out: list[str] = []
    assert run_checks(config, out=out.append) == 0
    [line] = [line for line in out if "dtype" in line]
    assert re.fullmatch(r"ok    dtype auto -> (bfloat16|float32) \(.+\)", line)
    assert line == f"ok    {load_models(config.model, progress=False).dtype_reason}"


@pytest.mark.parametrize(
    ("feature", "expected"),
    [
        (None, "dtype auto -> float32 (no native bf16)"),
        ("AVX512-BF16", "dtype auto -> bfloat16 (CPU has AVX512-BF16; bf16 output within"),
    ],
)
def test_doctor_says_which_and_why(monkeypatch, model_cache, feature, expected) -> None:
    has_feature(monkeypatch, feature)
    config = dataclasses.replace(
        load_config(ROOT / "configs" / "demo.yaml"), model=spec(model_cache)
    )
    [(level, what, hint)] = check_dtype(config)
    assert level == "ok" and what.startswith(expected) and hint == ""


def test_doctor_downloads_nothing_and_says_when_the_check_runs(monkeypatch, tmp_path) -> None:
    has_feature(monkeypatch, "AVX512-BF16")
    config = dataclasses.replace(
        load_config(ROOT / "configs" / "demo.yaml"),
        model=ModelSpec(id="someone/not-cached", device="cpu", cache_dir=str(tmp_path)),
    )
    [(level, what, hint)] = check_dtype(config)
    assert level == "ok"
    assert what == "dtype auto -> bfloat16 or float32 (CPU has AVX512-BF16; checked at model load)"
    assert "not on disk" in hint
    assert not any(tmp_path.iterdir()), "doctor wrote to the hub cache"


def test_doctor_keeps_an_explicit_dtype() -> None:
    config = load_config(ROOT / "configs" / "demo.yaml")
    pinned = dataclasses.replace(config, model=dataclasses.replace(config.model, dtype="float32"))
    assert check_dtype(pinned) == [("ok", "dtype float32 (as configured)", "")]

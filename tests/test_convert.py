"""Frame conversion: fit geometry, the numpy fitter and PyAV's swscale path agree exactly."""

import av
import numpy as np
import pytest

from broadcast_filter.media.convert import Fit, FrameConverter, fit_geometry, fit_image


def bands(width: int, height: int) -> np.ndarray:
    """Three vertical bands, red | green | blue, each a third of the width."""
    image = np.zeros((height, width, 3), np.uint8)
    third = width // 3
    image[:, :third, 0] = image[:, third : 2 * third, 1] = image[:, 2 * third :, 2] = 255
    return image


def test_crop_of_a_wide_source_covers_the_output_and_keeps_the_centre():
    assert fit_geometry(1920, 1080, 512, 512, "crop") == Fit(910, 512, 199, 0, 0, 0, 512, 512)


def test_crop_of_a_tall_source_cuts_top_and_bottom():
    assert fit_geometry(720, 1280, 512, 512, "crop") == Fit(512, 910, 0, 199, 0, 0, 512, 512)


def test_letterbox_of_a_wide_source_has_top_and_bottom_bars():
    g = fit_geometry(1920, 1080, 512, 512, "letterbox")
    assert g == Fit(512, 288, 0, 0, 0, 112, 512, 288)
    assert g.dst_y * 2 + g.height == 512  # two equal bars


def test_letterbox_of_a_tall_source_has_side_bars():
    assert fit_geometry(1080, 1920, 640, 360, "letterbox") == Fit(202, 360, 0, 0, 219, 0, 202, 360)


def test_stretch_ignores_the_aspect_ratio():
    assert fit_geometry(1920, 1080, 512, 512, "stretch") == Fit(512, 512, 0, 0, 0, 0, 512, 512)


@pytest.mark.parametrize("policy", ["crop", "letterbox", "stretch"])
def test_same_aspect_ratio_is_a_plain_scale_for_every_policy(policy):
    assert fit_geometry(1280, 720, 640, 360, policy) == Fit(640, 360, 0, 0, 0, 0, 640, 360)


def test_unknown_policy_names_the_accepted_ones():
    with pytest.raises(ValueError, match="crop, letterbox, stretch"):
        fit_geometry(10, 10, 5, 5, "zoom")
    with pytest.raises(ValueError, match="crop, letterbox, stretch"):
        FrameConverter(5, 5, "zoom")


def test_fit_image_letterbox_bars_are_black_and_exactly_sized():
    out = fit_image(np.full((90, 160, 3), 200, np.uint8), 64, 64, "letterbox")
    assert out.shape == (64, 64, 3)
    # 160x90 -> 64x36, bars of (64 - 36) / 2 = 14 rows
    assert (out[:14] == 0).all() and (out[50:] == 0).all()
    assert (out[14:50] == 200).all()


def test_fit_image_crop_keeps_the_centre_columns():
    image = np.zeros((100, 200, 1), np.uint8)
    image[:, :, 0] = np.arange(200) // 2  # column c holds c // 2
    out = fit_image(image, 100, 100, "crop")
    assert out.shape == (100, 100, 1)
    np.testing.assert_array_equal(out[0, :, 0], np.arange(50, 150) // 2)


def test_fit_image_stretch_scales_each_axis():
    out = fit_image(bands(300, 100), 30, 60, "stretch")
    assert out.shape == (60, 30, 3)
    assert (out[:, :10, 0] == 255).all() and (out[:, 10:20, 1] == 255).all()
    assert (out[:, 20:, 2] == 255).all()


def av_frame(image: np.ndarray, fmt: str = "yuv420p") -> av.VideoFrame:
    return av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format=fmt)


def test_converter_crop_keeps_the_middle_band_of_a_real_yuv_frame():
    out = FrameConverter(96, 96, "crop").convert(av_frame(bands(480, 160)))
    assert out.shape == (96, 96, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    inner = out[:, 4:-4].astype(int)  # chroma subsampling blurs the band edges
    assert (inner[..., 1] > 200).all() and (inner[..., [0, 2]] < 60).all()


def test_converter_letterbox_has_black_bars_of_the_computed_size():
    converter = FrameConverter(96, 96, "letterbox")
    out = converter.convert(av_frame(bands(480, 160)))
    g = converter.geometry(480, 160)
    assert (g.dst_y, g.height) == (32, 32)
    assert (out[:32] == 0).all() and (out[64:] == 0).all()
    picture = out[32:64].astype(int)
    assert picture[:, 4:28, 0].min() > 200 and picture[:, 36:60, 1].min() > 200
    assert picture[:, 68:92, 2].min() > 200


@pytest.mark.parametrize("fmt", ["yuv420p", "yuyv422", "nv12", "bgr0", "rgb24"])
def test_converter_reads_any_pixel_format_to_rgb(fmt):
    out = FrameConverter(60, 20, "stretch").convert(av_frame(bands(300, 100), fmt))
    assert out.shape == (20, 60, 3)
    assert out[10, 5, 0] > 200 and out[10, 30, 1] > 200 and out[10, 55, 2] > 200


def test_converter_returns_a_new_array_for_each_frame():
    converter = FrameConverter(32, 32, "crop")
    first = converter.convert(av_frame(np.zeros((64, 64, 3), np.uint8)))
    second = converter.convert(av_frame(np.full((64, 64, 3), 255, np.uint8)))
    assert first.max() < 20 and second.min() > 235  # the first was not overwritten

"""The MFU denominator: never an MFU above 1 from a peak measured in a busy moment."""

from __future__ import annotations

from gopher_jax import hardware


def test_cpu_mfu_never_exceeds_one_and_a_low_peak_is_measured_again():
    peak = hardware.Peak("float32")
    assert peak.measured and peak.per_device > 0
    true_peak = peak.per_device
    peak.per_device = true_peak / 100  # as if the start-up timing ran while the machine was busy
    mfu = peak.mfu(true_peak / 2)
    assert peak.per_device > true_peak / 10, "a model rate above the peak must re-measure it"
    assert mfu is None or 0 < mfu <= 1
    assert peak.mfu(peak.per_device * 3) is None  # faster than any measured peak: unknown


def test_accelerator_peaks_come_from_the_datasheet_table():
    assert hardware.peak_bf16("TPU v5p") == 459e12
    assert hardware.peak_bf16("NVIDIA H100 80GB HBM3") == 989e12
    assert hardware.peak_bf16("cpu") is None

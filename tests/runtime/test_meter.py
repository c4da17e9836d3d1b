"""The meter's peaks and arithmetic: a CPU's peak is probed once and then read from its cache, a GPU's comes
from the datasheet table by its name and dtype, and MFU is the model FLOPs per second over every device's peak."""

from __future__ import annotations

import json

import pytest
import torch

from shardflow.ops.flop_count import Flops
from shardflow.runtime.meter import Meter, Peak, device_peak


def test_a_cpu_peak_is_probed_once_then_read_from_the_cache(tmp_path):
    cache = tmp_path / "peaks.json"
    first = device_peak("cpu", torch.float32, cache=cache)
    assert first.flops_per_s > 1e6 and "probe" in first.source
    (key,) = json.loads(cache.read_text())
    cache.write_text(json.dumps({key: 123.0}))  # a value no probe would measure: read, not measured again
    assert device_peak("cpu", torch.float32, cache=cache).flops_per_s == 123.0
    cache.write_text(json.dumps({key: 0}))  # not a peak (a probe that never ran): measured again
    assert device_peak("cpu", torch.float32, cache=cache).flops_per_s > 1e6


@pytest.mark.parametrize(
    ("name", "dtype", "tf32", "want"),
    [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, False, 989.4e12),
        ("NVIDIA H100 80GB HBM3", torch.float32, True, 494.7e12),
        ("NVIDIA H100 PCIe", torch.float16, False, 756.5e12),
        ("NVIDIA H200", torch.float32, False, 66.9e12),
        ("NVIDIA H100 NVL", torch.bfloat16, False, 835.5e12),
        ("NVIDIA H200 NVL", torch.float32, True, 417.5e12),
        ("NVIDIA A100-SXM4-80GB", torch.bfloat16, False, 312e12),
    ],
)
def test_a_gpu_peak_is_its_datasheet_figure(monkeypatch, name, dtype, tf32, want):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high" if tf32 else "highest")
    assert device_peak("cuda", dtype).flops_per_s == want


def test_float32_convolutions_on_tf32_blend_into_the_peak_by_their_share_of_the_work(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-40GB")
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")  # matmuls at fp32: 19.5
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)  # convolutions at tf32: 156
    # three quarters of the work at 156 and a quarter at 19.5: the step takes 0.75 / 156 + 0.25 / 19.5
    assert device_peak("cuda", torch.float32, conv_share=0.75).flops_per_s == pytest.approx(
        1 / (0.75 / 156e12 + 0.25 / 19.5e12)
    )


def test_mfu_is_the_job_s_model_flops_per_second_over_every_device_s_peak():
    step = Flops(forward=3_000, backward=6_000, rank=Flops(forward=2_000, backward=4_000, recompute=1_000))
    meter = Meter(step, devices=2, peak=Peak(10_000.0, "given"))
    got = meter.measure(0.5, steps=2, samples=8, tokens=64)
    assert got.flops_per_s == 9_000 * 2 / 0.5
    assert got.mfu == 36_000 / 20_000
    assert got.hfu == 7_000 * 2 / 0.5 / 10_000  # this rank's work, recomputation included, over its own peak
    assert (got.samples_per_s, got.tokens_per_s) == (32, 256)
    assert str(got) == "256 tokens/s, 36 kFLOP/s, MFU 180.0%"
    with pytest.raises(ValueError, match="positive"):
        meter.measure(0.0)


def test_tf32_set_by_torch_s_newer_setting_is_read_without_error(monkeypatch):
    """Once ``fp32_precision`` is set, torch's older getter raises: the peak reads the newer setting."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    before = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        assert device_peak("cuda", torch.float32).flops_per_s == 494.7e12
    finally:
        torch.backends.cuda.matmul.fp32_precision = before

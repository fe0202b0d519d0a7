"""benchmarks/gpu_clocks.py: parsing nvidia-smi's CSV samples, and nothing recorded where it is missing."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import gpu_clocks  # noqa: E402


def test_parse_skips_lines_that_are_not_samples():
    text = "1515, 693.45\n1980, 120.50\n[N/A], 700.00\n\n1440, 698.17\n1500"
    assert gpu_clocks.parse(text) == [(1515.0, 693.45), (1980.0, 120.5), (1440.0, 698.17)]


def test_summary_is_the_median():
    sampler = gpu_clocks.ClockSampler()
    sampler.samples = [(1500.0, 690.0), (1980.0, 300.0), (1455.0, 706.0)]
    assert sampler.summary() == "SM 1500 MHz, 690 W (3 samples)"


def test_without_nvidia_smi_nothing_is_recorded(monkeypatch):
    monkeypatch.setattr(gpu_clocks.shutil, "which", lambda name: None)
    with gpu_clocks.ClockSampler() as sampler:
        pass
    assert sampler.samples == [] and sampler.summary() == ""


def test_samples_come_from_the_running_command(monkeypatch, tmp_path):
    """A stand-in nvidia-smi that prints two samples and waits: the sampler stops it and keeps what it printed."""
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho '1515, 693.45'\necho '1530, 699.00'\nexec sleep 30\n")
    fake.chmod(0o755)
    monkeypatch.setattr(gpu_clocks.shutil, "which", lambda name: str(fake))
    import time

    with gpu_clocks.ClockSampler() as sampler:
        time.sleep(0.5)
    assert sampler.samples == [(1515.0, 693.45), (1530.0, 699.0)]

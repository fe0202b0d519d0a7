"""The GPU's SM clock and power draw while a timed region runs, sampled by ``nvidia-smi`` in the background.

    with ClockSampler() as clocks:
        ...  # timed GPU work
    print(clocks.summary())  # "SM 1515 MHz, 693 W (12 samples)"

Under sustained matrix work an H200 of the device machine sits at its 700 W power limit with the SM clock near
1500 MHz, against 1980 MHz lightly loaded (docs/moe_layer_benchmark.md), so two rows of a table can differ by their
clocks as much as by their code: the benchmarks print the clocks beside each timed row. Without ``nvidia-smi`` (the
CPU, CI) the sampler records nothing and ``summary()`` is empty.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess

QUERY = ["--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits"]


def parse(text: str) -> list[tuple[float, float]]:
    """(SM clock in MHz, power in W) samples from ``nvidia-smi``'s CSV lines for one GPU. Lines that do not parse
    (a "[N/A]", a cut-off last line) are skipped."""
    samples = []
    for line in text.splitlines():
        try:
            clock, power = (float(v) for v in line.split(","))
        except ValueError:
            continue
        samples.append((clock, power))
    return samples


class ClockSampler:
    """Context manager that samples every ``interval_ms`` with ``nvidia-smi -lms`` while its block runs."""

    def __init__(self, interval_ms: int = 100, gpu: int = 0) -> None:
        self.interval_ms, self.gpu = interval_ms, gpu
        self.samples: list[tuple[float, float]] = []
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> ClockSampler:
        exe = shutil.which("nvidia-smi")
        if exe:
            cmd = [exe, f"--id={self.gpu}", *QUERY, "-lms", str(self.interval_ms)]  # as run by hand on the H200
            self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return self

    def __exit__(self, *exc) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            out, _ = self._proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            out, _ = self._proc.communicate()
        self.samples = parse(out)
        self._proc = None

    def summary(self) -> str:
        """Median SM clock and power over the samples, or "" without any."""
        if not self.samples:
            return ""
        clock = statistics.median(c for c, _ in self.samples)
        power = statistics.median(p for _, p in self.samples)
        return f"SM {clock:.0f} MHz, {power:.0f} W ({len(self.samples)} samples)"

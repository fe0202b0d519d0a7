"""Where the GPU waits: idle gaps between kernels in a ``torch.profiler`` Chrome trace.

    python benchmarks/gpu_gaps.py trace.json --steps 3

Steps can be delimited by a marker kernel launched before each step and after the last one (``MARKER``: the kernel
of ``torch.cuda._sleep``). Then the first step is left out, since after a synchronisation it waits for the host to
launch it while a training step finds the previous step's work still queued; without markers the whole trace is
divided by ``--steps``.

For each gap it reports the kernels on both sides and the launch delay of the kernel after it: how long after its
launch call (``cudaLaunchKernel`` and friends, joined by correlation id) the kernel started. A gap whose next kernel
started right after its launch means the GPU waited for the host; the CPU operator that was running the launch says
where the host spent that time.
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
from pathlib import Path

GPU_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}
MARKER = "spin_kernel"


def load(path: str | Path) -> list[dict]:
    path = Path(path)
    raw = gzip.open(path, "rt").read() if path.suffix == ".gz" else path.read_text()
    return [e for e in json.loads(raw)["traceEvents"] if e.get("ph") == "X"]


def _short(name: str, width: int = 60) -> str:
    return name if len(name) <= width else name[:width - 3] + "..."


def gap_report(events: list[dict], steps: int = 1, top: int = 12, min_gap_us: float = 5.0) -> str:
    gpu = sorted((e for e in events if e.get("cat") in GPU_CATS), key=lambda e: e["ts"])
    marks = [i for i, e in enumerate(gpu) if MARKER in e["name"]]
    if len(marks) >= 3:  # steps 2.. between markers
        steps = len(marks) - 2
        gpu = [e for e in gpu[marks[1]:marks[-1] + 1] if MARKER not in e["name"]]
    if not gpu:
        return "no GPU events in the trace\n"
    launches = {e["args"].get("correlation"): e for e in events
                if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}
    cpu_ops = sorted((e for e in events if e.get("cat") == "cpu_op"), key=lambda e: e["ts"])
    cpu_starts = [e["ts"] for e in cpu_ops]

    def enclosing_op(ts: float, tid) -> str:
        """The innermost CPU operator on thread ``tid`` running at ``ts``."""
        best, last = None, bisect.bisect_right(cpu_starts, ts) - 1  # the last operator starting before ts
        for i in range(last, max(-1, last - 400), -1):  # its 400 predecessors: enough nesting for any launch
            e = cpu_ops[i]
            if e.get("tid") == tid and e["ts"] <= ts <= e["ts"] + e["dur"]:
                if best is None or e["dur"] < best["dur"]:
                    best = e
        return best["name"] if best else "-"

    busy, end, gaps = 0.0, gpu[0]["ts"], []
    for prev, e in zip([None] + gpu[:-1], gpu):
        start, stop = e["ts"], e["ts"] + e["dur"]
        if start > end and prev is not None:
            gaps.append((start - end, prev, e))
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    span = end - gpu[0]["ts"]
    idle = sum(g for g, _, _ in gaps)
    lines = [
        f"GPU span {span / steps / 1e3:.2f} ms per step, busy {busy / steps / 1e3:.2f} ms, "
        f"idle {idle / steps / 1e3:.2f} ms in {len(gaps)} gaps ({len([g for g in gaps if g[0] >= min_gap_us])} of "
        f"{min_gap_us:g} us or more); {len(gpu) / steps:.0f} GPU events per step",
        "",
        "| gap (us) | before | after | launch delay (us) | host op launching `after` |",
        "| ---: | --- | --- | ---: | --- |",
    ]
    for g, prev, e in sorted(gaps, key=lambda x: -x[0])[:top]:
        launch = launches.get(e["args"].get("correlation"))
        delay = f"{e['ts'] - launch['ts']:.0f}" if launch else "-"
        host = enclosing_op(launch["ts"], launch.get("tid")) if launch else "-"
        lines.append(f"| {g:.0f} | {_short(prev['name'])} | {_short(e['name'])} | {delay} | {_short(host, 50)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace")
    p.add_argument("--steps", type=int, default=1, help="steps in the trace (for per-step figures)")
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args(argv)
    print(gap_report(load(args.trace), args.steps, args.top))


if __name__ == "__main__":
    main()

"""Size and read speed of the trace store on long runs, through covshift's public API only.

A "deep narrow" MLP (``--layers-blocks`` × (Linear(64, 64) + Tanh) + Linear(64, 10): 24 blocks
give 49 hooked layers) trains with SGD on fresh random batches of 32 (fixed seed) under a
``covshift.Tracer`` with its defaults, so every step is recorded. For each ``--steps`` count
the benchmark writes one trace and prints:

- the trace's size (the file and its side files, such as SQLite's -wal) and bytes per step per layer;
- ``covshift.load`` + a full ``trace.scalars()``: wall and CPU time and peak RSS, measured in a
  fresh subprocess (``--measure-read TRACE``), which also times a filtered read of one middle
  layer's ``var`` (median of 5), ``trace.series`` where the Trace has one, and ``covshift.analyze``;
- ``python -m covshift report``: wall and CPU time and peak RSS of that subprocess;
- the share of the traced loop's CPU time spent flushing (gathering, summarising and writing).

A Markdown table with the targets ends the output. Training and each measurement run in
their own process, started from this one, which imports neither torch nor pandas: on Linux a
child's ``ru_maxrss`` starts at its parent's peak RSS (fork and exec keep it), so a parent
holding torch would inflate the children's figures. The covshift imported is this
checkout's (the parent of this folder), in every process, whatever else is installed.

    python benchmarks/store.py              # 1000 and 10000 steps, 49 layers (the 10k trace takes minutes)
    python benchmarks/store.py --quick      # 200 steps, 13 layers: checks the script (well under a minute)
    python benchmarks/store.py --steps 1000 --layers-blocks 100 --out /tmp/store   # 201 layers, kept
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's covshift, not an installed copy elsewhere

import covshift  # noqa: E402

#: File size target: 50 MB for 10,000 steps × 49 layers, as bytes per step per layer.
BYTES_TARGET = 50e6 / (10_000 * 49)
#: (key, header, format, target text, upper limit or None) of each table column.
COLUMNS = [
    ("steps", "steps", "{:d}", "", None),
    ("layers", "layers", "{:d}", "", None),
    ("file_mb", "file MB", "{:.1f}", "≤ 50 at 10k×49", None),
    ("bytes", "B/step/layer", "{:.0f}", f"≤ {BYTES_TARGET:.0f}", BYTES_TARGET),
    ("rows", "scalar rows", "{:,}", "", None),
    ("read_s", "load+scalars s", "{:.2f}", "≤ 3", 3.0),
    ("read_cpu_s", "read CPU s", "{:.2f}", "", None),
    ("read_rss_mb", "read RSS MB", "{:.0f}", "≤ 600", 600.0),
    ("filtered_ms", "filtered ms", "{:.1f}", "≤ 50", 50.0),
    ("series_ms", "series ms", "{:.1f}", "", None),
    ("analyze_s", "analyze s", "{:.2f}", "", None),
    ("report_s", "report s", "{:.1f}", "≤ 30", 30.0),
    ("report_cpu_s", "report CPU s", "{:.1f}", "", None),
    ("report_rss_mb", "report RSS MB", "{:.0f}", "≤ 1024", 1024.0),
    ("flush_pct", "flush % CPU", "{:.1f}", "≤ 10", 10.0),
]
_flush_cpu = [0.0]  # CPU seconds spent flushing, summed by the patched method


def count_flush_cpu() -> None:
    """Patch the Tracer's flush to add its CPU time to ``_flush_cpu``: ``Tracer._flush``,
    which every flush goes through (every ``flush_every`` steps, ``flush()`` and ``close()``)."""
    original = covshift.Tracer._flush

    def flush(self: Any, now: bool) -> None:
        start = time.process_time()
        try:
            original(self, now)
        finally:
            _flush_cpu[0] += time.process_time() - start

    covshift.Tracer._flush = flush


def trace_files(path: Path) -> list[Path]:
    """The trace file and its side files (``-wal``, ``-shm``, ...)."""
    return [f for f in path.parent.glob(path.name + "*") if f.is_file()]


def write_trace(path: Path, steps: int, blocks: int, threads: int) -> dict[str, float]:
    """Runs in a fresh process: train the deep narrow model for ``steps`` steps under a Tracer,
    printing progress on stderr; returns the flush CPU as a share of the traced loop's CPU."""
    import torch
    from torch import nn

    torch.set_num_threads(threads)
    count_flush_cpu()
    print(f"  torch {torch.__version__}, {threads} thread(s)", file=sys.stderr, flush=True)
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers += [nn.Linear(64, 64), nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    data = torch.Generator().manual_seed(0)
    for f in trace_files(path):
        f.unlink()
    wall, cpu = time.perf_counter(), time.process_time()
    with covshift.Tracer(model, path, optimizer=opt) as tracer:
        for step in range(1, steps + 1):
            x = torch.randn(32, 64, generator=data)
            y = torch.randint(0, 10, (32,), generator=data)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            tracer.step(loss=loss)
            if step % max(1, steps // 10) == 0:
                print(f"  step {step}/{steps}  {time.perf_counter() - wall:.0f} s", file=sys.stderr, flush=True)
    return {"flush_pct": 100 * _flush_cpu[0] / (time.process_time() - cpu)}


def median_ms(read: Any, repeats: int = 5) -> float:
    """Median wall time of ``read()`` over ``repeats`` calls, in ms."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        read()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure_read(path: str) -> dict[str, Any]:
    """Runs in a fresh process: load + full scalars (time, peak RSS), a filtered read, analyze.
    The store's module (and pandas) is imported before the clock starts."""
    load = covshift.load
    wall, cpu = time.perf_counter(), time.process_time()
    trace = load(path)
    frame = trace.scalars()
    result: dict[str, Any] = {
        "read_s": time.perf_counter() - wall, "read_cpu_s": time.process_time() - cpu,
        "read_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rows": len(frame)}
    del frame
    query = {"run": trace.runs[0], "layer": trace.layers[len(trace.layers) // 2], "metric": "var"}
    result["filtered_ms"] = median_ms(lambda: trace.scalars(**query))
    result["series_ms"] = median_ms(lambda: trace.series(**query)) if hasattr(trace, "series") else None
    start = time.perf_counter()
    covshift.analyze(path)
    result["analyze_s"] = time.perf_counter() - start
    return result


def child(args: list[str], log: Path | None) -> tuple[int, str, float, os.struct_rusage]:
    """Run ``python ARGS`` on this checkout's covshift; returns its exit status, stdout, wall
    time and resource usage (its own, from wait4). Its stderr goes to ``log``, or to our stdout."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    with tempfile.TemporaryFile("w+") as out, open(log or os.devnull, "w") as err:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, *args], stdout=out, stderr=err if log else sys.stdout,
                                env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        return proc.returncode, out.read(), wall, usage


def failed(what: str, code: int, log: Path) -> None:
    tail = log.read_text().strip().splitlines()[-5:]
    print(f"  {what} failed (exit {code}):", *tail, sep="\n    ", flush=True)


def measure(path: Path, steps: int, blocks: int, threads: int) -> dict[str, Any]:
    """Write one trace and measure it; a failed measurement leaves its cells empty."""
    layers = 2 * blocks + 1
    print(f"{steps} steps, {layers} layers -> {path}", flush=True)
    script = str(Path(__file__).resolve())
    code, out, _, _ = child([script, "--write-trace", str(path), "--steps", str(steps),
                             "--layers-blocks", str(blocks), "--threads", str(threads)], None)
    if code != 0:
        raise SystemExit(f"error: writing {path} failed (exit {code})")
    row: dict[str, Any] = {"steps": steps, "layers": layers, **json.loads(out.strip().splitlines()[-1])}
    size = sum(f.stat().st_size for f in trace_files(path))
    row.update(file_mb=size / 1e6, bytes=size / (steps * layers))
    log = path.with_name(path.stem + ".log")  # stderr of the measurements
    code, out, _, _ = child([script, "--measure-read", str(path)], log)
    if code == 0:
        row.update(json.loads(out.strip().splitlines()[-1]))
    else:
        failed("read measurement", code, log)
    report_dir = path.with_name(path.stem + "-report")
    code, _, wall, usage = child(["-m", "covshift", "report", str(path), "--out", str(report_dir)], log)
    if code == 0:
        row.update(report_s=wall, report_cpu_s=usage.ru_utime + usage.ru_stime, report_rss_mb=usage.ru_maxrss / 1024)
    else:
        failed("covshift report", code, log)
    print("  " + ", ".join(f"{header} {cell(row, key, fmt, None)}" for key, header, fmt, _, _ in COLUMNS[2:]),
          flush=True)
    return row


def cell(row: dict[str, Any], key: str, fmt: str, limit: float | None) -> str:
    value = row.get(key)
    if value is None:
        return "–"
    return fmt.format(value) + (" ✗" if limit is not None and value > limit else "")


def table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table of ``rows``, a target row, and the growth of bytes per step per layer."""
    lines = ["| " + " | ".join(header for _, header, _, _, _ in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(row, key, fmt, limit) for key, _, fmt, _, limit in COLUMNS) + " |"
              for row in rows]
    lines.append("| target | | " + " | ".join(text for _, _, _, text, _ in COLUMNS[2:]) + " |")
    first, last = rows[0], rows[-1]
    if last["steps"] != first["steps"]:
        lines.append(f"\ngrowth: {first['bytes']:.1f} B/step/layer at {first['steps']} steps, {last['bytes']:.1f} at "
                     f"{last['steps']} (×{last['bytes'] / first['bytes']:.2f}; target ≈ 1)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="1000,10000", help="comma-separated step counts, one trace each")
    parser.add_argument("--layers-blocks", type=int, default=24, help="Linear+Tanh blocks (layers = 2 × blocks + 1)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the traces (default: a temporary one)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads while training (default 1)")
    parser.add_argument("--quick", action="store_true", help="200 steps, 6 blocks: check that the script works")
    parser.add_argument("--write-trace", metavar="TRACE", help=argparse.SUPPRESS)
    parser.add_argument("--measure-read", metavar="TRACE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    try:
        steps = [int(s) for s in ("200" if args.quick else args.steps).split(",")]
    except ValueError:
        parser.error(f"--steps takes comma-separated integers, not {args.steps!r}")
    blocks = 6 if args.quick else args.layers_blocks
    if min(steps) < 1 or blocks < 1 or args.threads < 1:
        parser.error("--steps, --layers-blocks and --threads must be positive")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file, not a folder")
    if args.write_trace or args.measure_read:  # the subprocesses
        result = (write_trace(Path(args.write_trace), steps[0], blocks, args.threads) if args.write_trace
                  else measure_read(args.measure_read))
        print(json.dumps(result))
        return
    print(f"covshift {covshift.__version__} from {Path(covshift.__file__).parent}", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        folder = (args.out or Path(scratch)).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        rows = [measure(folder / f"deep_narrow_{blocks}_{n}.covshift", n, blocks, args.threads) for n in steps]
    print("\n" + table(rows))


if __name__ == "__main__":
    main()

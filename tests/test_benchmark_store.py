"""benchmarks/store.py --quick runs end to end and prints its Markdown table."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_store_benchmark_quick_prints_table(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "store.py"), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "failed" not in done.stdout
    lines = done.stdout.splitlines()
    header = cells(next(line for line in lines if line.startswith("| steps |")))
    wanted = {"file MB", "B/step/layer", "load+scalars s", "read RSS MB", "filtered ms", "report s", "flush % CPU"}
    assert wanted <= set(header)
    row = dict(zip(header, cells(next(line for line in lines if line.startswith("| 200 | 13 |")))))
    assert len(row) == len(header)
    assert [name for name, value in row.items() if value == "–"] in ([], ["series ms"])  # all measured
    assert cells(next(line for line in lines if line.startswith("| target |")))[0] == "target"
    assert list(tmp_path.glob("deep_narrow_6_200.covshift"))

"""bench/factory_throughput.py --smoke: the issue-18 benchmark's every path (its own stack, `submit
--wait`, the warm second batch, the control-plane timings, the naive process per job, the fused
trainers alone, and a second submit/fused pair as ``--pairs 2`` alternates them) on four tiny jobs, so that
the script a CPU or GPU run relies on cannot rot."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(620)
def test_factory_bench_smoke(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(REPO / "bench/factory_throughput.py"), "--smoke", "--pairs", "2",
                        "--deadline-s", "480"],  # (its own deadline stops the stack it started; a kill would not)
                       capture_output=True,
                       text=True, timeout=600, cwd=tmp_path)  # (74-118 s; its deadline first)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = json.loads(r.stdout[r.stdout.rindex('{\n "ratios"'):r.stdout.rindex("}") + 1])
    assert out["ratios"]["submit_over_naive"] > 0 and out["ratios"]["submit_over_fused"] > 0
    assert "warm probe" in r.stdout and "control plane" in r.stdout
    assert "warm trainers []" not in r.stdout  # the second batch found the first one's trainers
    # the second pair's submit trained its jobs (as other tenants), none reused from the first
    m = re.search(r"pair 2: submit [0-9.]+ s \(([0-9]+) groups trained, ([0-9]+) of ([0-9]+) jobs succeeded\)",
                  r.stdout)
    assert m and int(m[1]) > 0 and m[2] == m[3], r.stdout[-3000:]

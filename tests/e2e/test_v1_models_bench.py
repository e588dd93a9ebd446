"""bench/v1_models.py --smoke: a tenant's served `/v1/models` and `/v1/registry/adapters` through the
OpenAI client against `adapterfab serve` on its own stack, listed from MLflow
(`--registry-from-mlflow`) and from the registry catalogue the server completes itself; the script
checks both listings are equal before it reports a time, so it cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(420)
def test_v1_models_bench_smoke(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(REPO / "bench/v1_models.py"), "--smoke", "--deadline-s", "300"],
                       capture_output=True,
                       text=True, timeout=400, cwd=tmp_path)  # (52-110 s; its deadline first)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = json.loads(r.stdout[r.stdout.index('{\n "date"'):r.stdout.rindex("}") + 1])
    assert out["tenant_adapters"] == 5 and out["versions"] == 60
    assert out["catalogue"]["v1_models"]["median_ms"] > 0 and out["from_mlflow"]["v1_models"]["median_ms"] > 0

"""The short soak of the serving endpoint: bench/soak.py's harness for ~30 s on the
tiny model: 16 concurrent clients across 12 tenants (each its own key and two adapters), streaming and
not, over loopback HTTP into the real API and the batched engine. Zero errors, every request answered
well within its timeout, p99 bounded, memory flat. The long run is `python bench/soak.py`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _soak_module():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("af_bench_soak", REPO / "bench" / "soak.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.timeout(240)
def test_short_soak_zero_errors_bounded_p99_flat_memory(tiny_model_path: str, tmp_path: Path) -> None:
    out = _soak_module().run_soak(tiny_model_path, tmp_path, duration_s=30, clients=16, tenants=12,
                                  adapters_per_tenant=2, max_tokens=12, timeout_s=20, warmup_s=3)
    print({k: v for k, v in out.items() if k != "rss_samples"})
    assert out["warmup"]["errors"] == 0, out["warmup"]
    assert out["errors"] == 0, out["error_examples"]
    assert out["requests"] >= 100  # it really was under load the whole time
    assert out["latency_p99_s"] < 10.0  # timeouts are 20 s: nothing came near one
    assert out["rss_growth_mb"] < 60, out["rss_samples"]  # first vs last fifth: no leak per request
    assert out["adapters"] == 24 and out["tiers"]["store_loads"] + out["tiers"].get("disk_hits", 0) >= 24

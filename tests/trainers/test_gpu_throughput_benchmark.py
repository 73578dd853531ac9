"""`benchmarks/gpu_throughput.py --tiny` runs on the CPU and reports its rates."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_throughput.py"


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("gpu_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_throughput_tiny_run(benchmark, tmp_path, capsys):
    output = tmp_path / "results.json"

    status = benchmark.main(["--tiny", "--json", str(output)])
    printed = capsys.readouterr().out
    results = json.loads(output.read_text())

    assert status == 0
    assert "tokens/s" in printed
    assert "images/s" in printed
    assert results["lm"]["tokens_per_sec"] > 0
    assert results["lm"]["timed_steps"] == 3
    assert results["lm"]["mfu"] is None
    assert results["vision"]["examples_per_sec"] > 0
    # One epoch of the 256 tiny images at batch 32, less one warm-up step.
    assert results["vision"]["timed_steps"] == 7
    assert results["vision"]["augment"] is True


def test_lm_flops_per_token_of_llama_0_2b(benchmark):
    config = benchmark.paper_trial("lm", {})

    flops = benchmark.lm_flops_per_token(config, 32128)

    # 6 * (200.3M + 28 * 768 padding rows * 2 - 32128 * 768 embedding)
    # + 12 * 16 layers * 768 * 256 positions.
    matmul_params = 200_325_888 + 2 * 28 * 768 - 32128 * 768
    assert flops == 6 * matmul_params + 12 * 16 * 768 * 256


def test_rate_after_warmup_rejects_short_runs(benchmark):
    reports = [{"step": 1, "time/train_sec": 1.0, "progress/tokens": 10}]

    with pytest.raises(ValueError, match="leave none after --warmup-steps 1"):
        benchmark.rate_after_warmup(reports, "tokens", 1)

"""The GPU-only benchmark scripts, run on the CPU with CUDA faked, so that a mistake in their own
logic is found here rather than in the few minutes a lent GPU gives (tools/device_check.sh).

`backend='cuda'` is served by the C++ CPU backend (the same contract), tensors stay on the CPU,
and torch.cuda's timers and memory counters are stubs: what is checked is the script (its
schedules, budgets, parity arithmetic, output), not the CUDA kernels (test_cuda_emulated.py).
"""
from __future__ import annotations

import runpy
import sys
import types
from pathlib import Path

import pytest
import torch

import entropy_kernels
from entropy_kernels import backends
from entropy_kernels.ops import _extension

ROOT = Path(__file__).resolve().parents[1]
TWO_BLOCKS_PER_SM = 2**64 - 1  # csrc/entropy_cuda.h's kTwoBlocksPerSm


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda present but a no-op, the CUDA extension a stand-in holding its two budgets."""
    if backends.not_supported_reasons("cpp", torch.device("cpu"), torch.float32, 32):
        pytest.skip("the C++ extension is unavailable")
    budgets = {"ring": TWO_BLOCKS_PER_SM, "column_ring": TWO_BLOCKS_PER_SM, "history": []}

    def setter(name):
        def set_budget(value):
            budgets[name] = value
            budgets["history"].append((name, value))
        return set_budget

    module = types.SimpleNamespace(
        cuda_max_shared_for_ring=lambda: budgets["ring"],
        cuda_max_shared_for_column_ring=lambda: budgets["column_ring"],
        set_cuda_max_shared_for_ring=setter("ring"),
        set_cuda_max_shared_for_column_ring=setter("column_ring"),
    )
    monkeypatch.syspath_prepend(str(ROOT / "tools"))  # as when a script runs: its folder first
    load = _extension.load
    monkeypatch.setattr(_extension, "load", lambda cuda: (module, None) if cuda else load(cuda))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "fake GPU")
    for name in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *args: None)
    for name in ("memory_allocated", "max_memory_allocated"):
        monkeypatch.setattr(torch.cuda, name, lambda *args: 0)
    loss = entropy_kernels.spatial_entropy_loss

    def cpu_loss(*args, backend="auto", **kwargs):
        return loss(*args, backend="cpp" if backend == "cuda" else backend, **kwargs)

    monkeypatch.setattr(entropy_kernels, "spatial_entropy_loss", cpu_loss)
    triton_testing = pytest.importorskip("triton.testing")
    monkeypatch.setattr(triton_testing, "do_bench", lambda fn, **kwargs: (fn(), 1.5)[1])
    return budgets


def test_cuda_variants_schedules_parity_and_budgets(fake_cuda, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["cuda_variants.py", "--batch", "1", "--size", "20"])
    runpy.run_path(str(ROOT / "tools" / "cuda_variants.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "budgets (G ring, column ring) by default ('two blocks per SM', 'two blocks per SM')" in out
    rows = [line.split(" | ") for line in out.splitlines() if line.count(" | ") == 4 and "parity" not in line]
    assert [row[0] for row in rows] == ["fused, defaults", "fused, both rings", "fused, two states",
                                        "unfused, defaults", "forward, defaults", "forward, no column ring"]
    for name, f64, f32, ms, _ in rows:
        # against the float64 reference with the same neighbour weights: rounding only
        assert float(f64) < 1e-8 and float(f32) < 1e-4, name
        assert float(ms) == 1.5
    # each schedule's budgets were set for it, and the defaults restored at the end
    assert ("column_ring", 0) in fake_cuda["history"] and ("ring", 0) in fake_cuda["history"]
    assert fake_cuda["ring"] == fake_cuda["column_ring"] == TWO_BLOCKS_PER_SM


def test_profile_step_runs_the_training_steps(fake_cuda, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["profile_step.py", "--backend", "cuda", "--batch", "1", "--size", "12",
                                      "--bins", "8", "--window", "5", "--steps", "2"])
    runpy.run_path(str(ROOT / "tools" / "profile_step.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert out.startswith("cuda: 2 steps, loss ") and "grad norm" in out
    assert float(out.split("grad norm")[1]) > 0

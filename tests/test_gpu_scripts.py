"""The GPU-only benchmark scripts, run on the CPU with CUDA faked, so that a mistake in their own
logic is found here rather than in the few minutes a lent GPU gives (tools/device_check.sh).

`backend='cuda'` is served by the C++ CPU backend (the same contract), tensors stay on the CPU,
and torch.cuda's timers and memory counters are stubs: what is checked is the script (its
schedules, parity arithmetic, output), not the CUDA kernels (test_cuda_emulated.py).
"""
from __future__ import annotations

import runpy
import sys
import types
from pathlib import Path

import pytest
import torch

from entropy_kernels import backends
from entropy_kernels.ops import _extension
from entropy_kernels.ops.cuda import _Schedule

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda present but a no-op; backend='cuda' the C++ CPU backend, recording the launch
    schedule (the private _schedule argument) of each call."""
    if backends.not_supported_reasons("cpp", torch.device("cpu"), torch.float32, 32):
        pytest.skip("the C++ extension is unavailable")
    schedules = []
    cpp = backends.select("cpp", torch.device("cpu"), torch.float32, 32)

    def local_divergence(*args, _schedule=None):
        schedules.append(_schedule)
        return cpp.local_divergence(*args)

    standin = types.SimpleNamespace(local_divergence=local_divergence)
    select = backends.select
    monkeypatch.setattr(backends, "select", lambda name, *args: standin if name == "cuda" else select(name, *args))
    monkeypatch.syspath_prepend(str(ROOT / "tools"))  # as when a script runs: its folder first
    load = _extension.load
    monkeypatch.setattr(_extension, "load", lambda cuda: (standin, None) if cuda else load(cuda))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "fake GPU")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *args: types.SimpleNamespace(
        major=9, minor=0, shared_memory_per_block_optin=227 * 1024))
    for name in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *args: None)
    for name in ("memory_allocated", "max_memory_allocated"):
        monkeypatch.setattr(torch.cuda, name, lambda *args: 0)
    triton_testing = pytest.importorskip("triton.testing")
    monkeypatch.setattr(triton_testing, "do_bench", lambda fn, **kwargs: (fn(), 1.5)[1])
    return schedules


def test_cuda_variants_schedules_parity_and_budgets(fake_cuda, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["cuda_variants.py", "--batch", "1", "--size", "20"])
    runpy.run_path(str(ROOT / "tools" / "cuda_variants.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "budgets (G ring, column ring) by default: what a block may have for the tensor-core step" in out
    assert "float training step at this case: tensor-core step" in out
    rows = [line.split(" | ") for line in out.splitlines() if line.count(" | ") == 4 and "parity" not in line]
    assert [row[0] for row in rows] == ["fused, defaults", "fused, step without column ring", "fused, sliding",
                                        "fused, sliding, both rings", "fused, sliding, two states",
                                        "fused, sliding, tensor cores", "unfused, defaults", "forward, defaults",
                                        "forward, no column ring"]
    for name, f64, f32, ms, _ in rows:
        # against the float64 reference with the same neighbour weights: rounding only
        assert float(f64) < 1e-8 and float(f32) < 1e-4, name
        assert float(ms) == 1.5
    # each schedule reached the backend as its private argument: the timed ones as given, the
    # parity runs with each ring they use allowed an SM
    sm = 227 * 1024
    off = dict(tensor_core_step=False)
    for schedule in (_Schedule(), _Schedule(None, 0), _Schedule(**off), _Schedule(sm, sm, **off),
                     _Schedule(0, 0, **off), _Schedule(tensor_core_column_sums=True, **off), _Schedule(sm, 0),
                     _Schedule(sm, sm), _Schedule(sm, sm, True, False)):
        assert schedule in fake_cuda, schedule
    assert None not in fake_cuda


def test_profile_step_runs_the_training_steps(fake_cuda, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["profile_step.py", "--backend", "cuda", "--batch", "1", "--size", "12",
                                      "--bins", "8", "--window", "5", "--steps", "2"])
    runpy.run_path(str(ROOT / "tools" / "profile_step.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert out.startswith("cuda: 2 steps, loss ") and "grad norm" in out
    assert float(out.split("grad norm")[1]) > 0

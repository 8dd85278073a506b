"""The Triton kernels compile for an H100 (sm_90) without one: what the interpreter cannot check.

The other Triton tests run the kernels in Triton's interpreter, which executes the Python of a
kernel and never lowers it: a construct the GPU compiler rejects, or a launch configuration that
spills registers, passes there. Triton compiles for a named target with the ptxas its wheel
carries, so this runs `tools/triton_static.py` (in a subprocess: this pytest process may have
bound the kernels to the interpreter) on a machine without a GPU.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "triton_static.py"


def _python(code_or_args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *code_or_args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def tools():
    result = _python(["-c", f"import sys; sys.path.insert(0, {str(ROOT / 'tools')!r}); "
                            "import triton_static; print(triton_static.tools_missing() or '')"])
    assert result.returncode == 0, result.stderr
    if result.stdout.strip():
        pytest.skip(result.stdout.strip())


def test_every_launched_configuration_compiles_for_sm90_without_spills(tools):
    result = _python([str(SCRIPT), "--check"])
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith(("slide |", "strip |"))]
    # 18 configurations of the default algorithm (forward, backward, fused forward), 2 of the other, 3 Gaussian
    assert len(rows) == 23, result.stdout


def _compile(algorithm, direction, dtype, bins, warps, maxnreg=None):
    code = (f"import sys, json; sys.path.insert(0, {str(ROOT / 'tools')!r}); import triton_static; "
            f"triton_static.MAXNREG = {maxnreg!r}; "
            f"print(json.dumps(triton_static.compile_kernel({algorithm!r}, {direction!r}, {dtype!r}, {bins}, "
            f"warps={warps})))")
    result = _python(["-c", code])
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_static_report_sees_spills_and_registers(tools):
    """The numbers the check relies on are read, not defaulted: a configuration far beyond the
    register file (64 x 64 float64 tiles on 4 warps) spills, and the default one reports its registers."""
    spilling = _compile("slide", "bwd", "float64", 64, 4)
    assert spilling["spill_st"] > 0 and spilling["stack"] > 0, spilling
    assert spilling["regs"] == 255
    default = _compile("slide", "fwd", "float32", 32, None)
    assert 32 <= default["regs"] <= 255 and default["spill_st"] == 0 and default["sass"] > 500, default
    assert default["FFMA"] > 0 and default["MUFU"] > 0 and default["programs_per_sm"] >= 1, default


def test_a_register_cap_of_128_puts_two_forward_programs_on_an_sm(tools):
    """The premise of triton_variants.py's 'slide-maxnreg128': capped at 128 registers, the 8-warp
    'slide' forward fits two programs per SM without spilling (uncapped it takes one)."""
    capped = _compile("slide", "fwd", "float32", 32, None, maxnreg=128)
    assert capped["regs"] <= 128 and capped["spill_st"] == 0 and capped["programs_per_sm"] == 2, capped
    uncapped = _compile("slide", "fwd", "float32", 32, None)
    assert uncapped["regs"] > 128 and uncapped["programs_per_sm"] == 1, uncapped

"""Reading compiled NVIDIA kernels without a GPU: the cuobjdump that Triton's wheel carries, the SASS
instruction list of a cubin's text, and its loop nest. Shared by tools/triton_static.py and
tools/cuda_static.py; imports nothing heavy and changes no state (Triton is located, not
imported).
"""
from __future__ import annotations

import collections
import importlib.util
import re
import subprocess
from pathlib import Path

_TRITON = importlib.util.find_spec("triton")
# ptxas, cuobjdump, nvdisasm of Triton's NVIDIA backend (None without Triton).
TOOLS = Path(_TRITON.origin).parent / "backends" / "nvidia" / "bin" if _TRITON else None


def run(*cmd) -> str:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed:\n{result.stderr}")
    return result.stdout


def instructions(sass: str):
    """(address, opcode, operands) of each instruction in cuobjdump -sass text (predicates dropped)."""
    return [(int(m.group(1), 16), m.group(2), m.group(3)) for m in re.finditer(
        r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9]*)([^;]*);", sass)]


def opcode_counts(instructions) -> collections.Counter:
    return collections.Counter(op for _, op, _ in instructions)


def loop_nest(instructions):
    """The kernel's loops as nested 'instructions[inner loops]' (per thread, static): a backward branch
    closes a loop that starts at its target. How often each runs per window is the algorithm's, so
    a loop body's count times its trips per window, times the warps, is the issue work of a window."""
    spans = sorted({(int(m.group(1), 16), addr) for addr, op, rest in instructions if op == "BRA"
                    for m in [re.search(r"0x([0-9a-f]+)", rest)] if m and int(m.group(1), 16) < addr},
                   key=lambda span: (span[0], -span[1]))

    def count(lo, hi):
        return sum(lo <= addr <= hi for addr, _, _ in instructions)

    def render(lo, hi, inner):
        children, rest = [], inner
        while rest:
            (a, b), rest = rest[0], rest[1:]
            nested = [span for span in rest if span[1] <= b]
            rest = [span for span in rest if span[1] > b]
            children.append(render(a, b, nested))
        return f"{count(lo, hi)}" + (f"[{' '.join(children)}]" if children else "")

    return render(0, max(addr for addr, _, _ in instructions), spans)

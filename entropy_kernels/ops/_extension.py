"""The compiled extension behind backend='cpp' and backend='cuda', and its torch.library ops.

The extension is built by ``setup.py`` when torch is importable at install time
(``entropy_kernels._C_cpu`` always, ``entropy_kernels._C_cuda`` where torch has CUDA and
nvcc exists). Otherwise it is JIT-built from ``csrc/`` (``entropy_kernels/csrc/`` in a wheel)
with ninja at first use into torch's extension cache (``TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``). A failed build is reported as a reason the backend cannot
serve, never raised at import.

Each backend registers two ops in the ``entropy_kernels`` namespace, ``<name>_local_divergence``
and its backward, with fake (meta) implementations and autograd, so that ``torch.compile``
traces through them and ``torch.library.opcheck`` passes. Both take a trailing ``schedule``
(None: the library's policy), the CUDA launch schedule of :class:`entropy_kernels.ops.cuda._Schedule`
as a list; the CPU code takes none.
"""
from __future__ import annotations

import importlib
import os
import shutil
from pathlib import Path
from typing import List, Optional, Tuple

import torch

# An installed wheel carries the sources in the package (setup.py copies them there); a source
# checkout compiles the top-level csrc/ itself.
_PACKAGE = Path(__file__).resolve().parents[1]
CSRC = _PACKAGE / "csrc" if (_PACKAGE / "csrc").is_dir() else _PACKAGE.parent / "csrc"
KERNEL_IDS = {"logistic": 0, "gaussian": 1}
DIVERGENCE_IDS = {"kl": 0, "hellinger": 1}
CUDA_MAX_BINS = 64  # kCudaMaxBins in csrc/entropy_cuda.h


def cxx_flags(portable: Optional[bool] = None):
    """Optimisation flags for the C++ sources, shared with setup.py.

    -fopenmp: at::parallel_for is an inline `omp parallel`, and `omp simd` reductions
    vectorise without -ffast-math (which would let the compiler assume NaN never occurs).
    -fno-trapping-math and -fno-math-errno only drop floating-point exception flags and
    errno, which lets the branch-free selects of csrc/entropy_math.h vectorise; NaN and Inf
    values propagate as before. -march=native suits a build made on the machine that runs
    it (JIT or editable install); set ENTROPY_KERNELS_PORTABLE=1 for a wheel (``portable``
    overrides the variable; tests/test_cpp_portable.py builds both).
    """
    if portable is None:
        portable = os.environ.get("ENTROPY_KERNELS_PORTABLE", "0") == "1"
    flags = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]
    if not portable:
        flags.append("-march=native")
    return flags


def sources(cuda: bool):
    names = ["bindings_cuda.cpp", "entropy_cpu.cpp", "entropy_cuda.cu"] if cuda else ["bindings.cpp", "entropy_cpu.cpp"]
    return [str(CSRC / n) for n in names]


def _jit_build(cuda: bool):
    if not (CSRC / "entropy_cpu.cpp").exists():
        raise RuntimeError(f"the C++ sources are not at {CSRC} (install from a source checkout to build them)")
    if shutil.which("ninja") is None:
        raise RuntimeError("ninja is not installed (pip install ninja) and no prebuilt extension was found")
    from torch.utils import cpp_extension

    flags = cxx_flags()
    return cpp_extension.load(
        name="entropy_kernels_cuda" if cuda else "entropy_kernels_cpu",
        sources=sources(cuda),
        extra_cflags=flags,
        extra_cuda_cflags=["-O3"] if cuda else None,
        extra_include_paths=[str(CSRC)],
        with_cuda=cuda,
        verbose=os.environ.get("ENTROPY_KERNELS_VERBOSE_BUILD", "0") == "1",
    )


# A plain dict rather than functools.lru_cache: torch.compile traces through a cache hit of this
# dict, while it ignores lru_cache and would try to trace the import itself.
_LOADED = {}


def load(cuda: bool) -> Tuple[Optional[object], Optional[str]]:
    """(module, None), or (None, why it is unavailable). Tried once per process."""
    if cuda not in _LOADED:
        _LOADED[cuda] = _import_or_build(cuda)
    return _LOADED[cuda]


def _import_or_build(cuda: bool):
    try:
        return importlib.import_module("entropy_kernels._C_cuda" if cuda else "entropy_kernels._C_cpu"), None
    except ImportError:
        pass
    if cuda:
        from torch.utils import cpp_extension

        if torch.version.cuda is None:
            return None, "this torch build has no CUDA"
        if cpp_extension.CUDA_HOME is None:
            return None, "nvcc / CUDA_HOME not found, so the CUDA extension cannot be built"
    try:
        return _jit_build(cuda), None
    except Exception as exc:  # noqa: BLE001 - a failed build is a reason, reported to the caller
        text = str(exc).strip().splitlines()
        return None, f"building the {'CUDA' if cuda else 'C++'} extension failed: {type(exc).__name__}: " + (
            text[-1] if text else ""
        )


def output_shape(u: torch.Tensor, win_h: int, win_w: int, valid: bool):
    n, height, width = u.shape
    return (n, height - win_h + 1, width - win_w + 1) if valid else (n, height, width)


def check_call(maps, win_h, win_w, valid, bins, bandwidth, kernel, divergence, cuda: bool, schedule=None):
    """The checks of csrc/bindings.cpp, made in Python first.

    The C++ checks stay (they guard direct calls of the module), but an exception thrown inside
    the extension killed the process with a segmentation fault on one GPU image (torch 2.11 +
    CUDA 13.0, extension built there; docs/cuda.md), so the ops never rely on them.
    """
    first = maps[0]
    if first.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"entropy_kernels: maps must be float32 or float64, got {first.dtype}")
    if first.dim() != 3:
        raise ValueError(f"entropy_kernels: maps must be (N, H, W), got shape {tuple(first.shape)}")
    for t in maps[1:]:
        if (t.shape, t.dtype, t.device) != (first.shape, first.dtype, first.device):
            raise ValueError(f"entropy_kernels: maps must share shape, dtype and device, got {tuple(t.shape)} "
                             f"{t.dtype} {t.device} and {tuple(first.shape)} {first.dtype} {first.device}")
    if win_h < 1 or win_w < 1:
        raise ValueError(f"entropy_kernels: window sides must be >= 1, got {win_h}x{win_w}")
    if valid and (win_h > first.shape[1] or win_w > first.shape[2]):
        raise ValueError(f"entropy_kernels: a 'valid' window of {win_h}x{win_w} does not fit an image of "
                         f"{first.shape[1]}x{first.shape[2]}")
    if bins < 2 or (cuda and bins > CUDA_MAX_BINS):
        limit = f" and <= {CUDA_MAX_BINS}" if cuda else ""
        raise ValueError(f"entropy_kernels: bins must be >= 2{limit}, got {bins}")
    if not bandwidth > 0:
        raise ValueError(f"entropy_kernels: bandwidth must be > 0, got {bandwidth}")
    if kernel not in KERNEL_IDS.values() or divergence not in DIVERGENCE_IDS.values():
        raise ValueError(f"entropy_kernels: unknown kernel id {kernel} or divergence id {divergence}")
    if schedule is not None and not (
        cuda and len(schedule) == 3 and min(schedule[:2]) >= -1 and schedule[2] in (0, 1)
    ):
        raise ValueError("entropy_kernels: schedule must be None or, on the cuda backend, [ring bytes >= -1, "
                         f"column ring bytes >= -1, tensor cores 0 or 1], got {schedule} ({'cuda' if cuda else 'cpp'})")


def register(name: str, device_type: str, cuda: bool):
    """Define entropy_kernels::<name>_local_divergence (+ backward) served by the extension."""

    def ext():
        module, error = load(cuda)
        if module is None:
            raise RuntimeError(f"entropy_kernels {name} extension unavailable: {error}")
        return module

    @torch.library.custom_op(f"entropy_kernels::{name}_local_divergence", mutates_args=(), device_types=device_type)
    def forward(
        u_pred: torch.Tensor, m_pred: torch.Tensor, u_tgt: torch.Tensor, m_tgt: torch.Tensor,
        win_h: int, win_w: int, valid: bool, bins: int, bandwidth: float, kernel: int, divergence: int, eps: float,
        with_grad: bool, schedule: Optional[List[int]] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        check_call((u_pred, m_pred, u_tgt, m_tgt), win_h, win_w, valid, bins, bandwidth, kernel, divergence, cuda,
                   schedule)
        d, gu1, gm1 = ext().forward(
            u_pred, m_pred, u_tgt, m_tgt, win_h, win_w, valid, bins, bandwidth, kernel, divergence, eps, with_grad,
            schedule or [],
        )
        return d, gu1, gm1

    @forward.register_fake
    def _(u_pred, m_pred, u_tgt, m_tgt, win_h, win_w, valid, bins, bandwidth, kernel, divergence, eps, with_grad,
          schedule=None):
        grads = with_grad and eps > 0
        extra = (lambda: torch.empty_like(u_pred)) if grads else (lambda: u_pred.new_empty((0,)))
        return u_pred.new_empty(output_shape(u_pred, win_h, win_w, valid)), extra(), extra()

    @torch.library.custom_op(
        f"entropy_kernels::{name}_local_divergence_backward", mutates_args=(), device_types=device_type
    )
    def backward(
        grad: torch.Tensor, d: torch.Tensor, u_pred: torch.Tensor, m_pred: torch.Tensor, u_tgt: torch.Tensor,
        m_tgt: torch.Tensor, grad_u1: torch.Tensor, grad_m1: torch.Tensor, win_h: int, win_w: int, valid: bool,
        bins: int, bandwidth: float, kernel: int, divergence: int, eps: float, schedule: Optional[List[int]] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        check_call((u_pred, m_pred, u_tgt, m_tgt), win_h, win_w, valid, bins, bandwidth, kernel, divergence, cuda,
                   schedule)
        expected = output_shape(u_pred, win_h, win_w, valid)
        for what, t in (("D", d), ("grad_output", grad)):
            if tuple(t.shape) != expected or t.dtype != u_pred.dtype or t.device != u_pred.device:
                raise ValueError(f"entropy_kernels: {what} must be {expected} {u_pred.dtype} on {u_pred.device}, "
                                 f"got {tuple(t.shape)} {t.dtype} {t.device}")
        gu, gm = ext().backward(
            grad, d, u_pred, m_pred, u_tgt, m_tgt, grad_u1, grad_m1, win_h, win_w, valid, bins, bandwidth, kernel,
            divergence, eps, schedule or [],
        )
        return gu, gm

    @backward.register_fake
    def _(grad, d, u_pred, m_pred, u_tgt, m_tgt, grad_u1, grad_m1, win_h, win_w, valid, bins, bandwidth, kernel,
          divergence, eps, schedule=None):
        return torch.empty_like(u_pred), torch.empty_like(m_pred)

    def setup_context(ctx, inputs, output):
        u_pred, m_pred, u_tgt, m_tgt, *params, _with_grad, schedule = inputs
        d, gu1, gm1 = output
        ctx.save_for_backward(u_pred, m_pred, u_tgt, m_tgt, d, gu1, gm1)
        ctx.params, ctx.schedule = params, schedule

    def backward_rule(ctx, grad, _grad_u1, _grad_m1):
        u_pred, m_pred, u_tgt, m_tgt, d, gu1, gm1 = ctx.saved_tensors
        gu, gm = backward(grad.contiguous(), d, u_pred, m_pred, u_tgt, m_tgt, gu1, gm1, *ctx.params, ctx.schedule)
        # The target maps are constants of the loss (docs/spec.md): no gradient flows to them.
        return (gu, gm, None, None) + (None,) * (len(ctx.params) + 2)

    forward.register_autograd(backward_rule, setup_context=setup_context)
    return forward


def reasons(device: torch.device, dtype: torch.dtype, device_type: str, cuda: bool):
    """Why the extension cannot serve (device, dtype); empty when it can."""
    out = []
    if device.type != device_type:
        out.append(f"serves {device_type} tensors only, got {device.type}")
    if dtype not in (torch.float32, torch.float64):
        out.append(f"computes float32 and float64 only, got {dtype}")
    if not out:
        module, error = load(cuda)
        if module is None:
            out.append(error)
    return out


def call(op, u_pred, m_pred, u_tgt, m_tgt, win_h, win_w, valid, bins, bandwidth, kernel, divergence, eps,
         schedule=None):
    """The backend contract (reference.py) on top of a registered op.

    When a gradient will be needed, the forward also computes the gradient for grad_output = 1
    (one pass, which a separate backward would have to repeat) and the backward only rescales
    it when grad_output is uniform, as the 'mean' and 'sum' reductions make it.
    """
    maps = [t.contiguous() for t in (u_pred, m_pred, u_tgt, m_tgt)]
    with_grad = torch.is_grad_enabled() and (u_pred.requires_grad or m_pred.requires_grad)
    d, _, _ = op(
        *maps, int(win_h), int(win_w), bool(valid), int(bins), float(bandwidth),
        KERNEL_IDS[kernel], DIVERGENCE_IDS[divergence], float(eps), bool(with_grad), schedule,
    )
    return d

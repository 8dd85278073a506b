"""`python -m entropy_kernels.check`: the user's parity and gradcheck of the backends against the reference."""
import pytest

from entropy_kernels import backends, check

SMALL = ["--size", "11", "9", "--gradcheck-size", "5", "4", "--batch", "1", "--channels", "2", "--bins", "7"]


@pytest.fixture
def cpp_module():
    module, error = backends._load("cpp")
    if module is None:
        pytest.skip(error)
    return module


def test_cpp_passes_every_check(cpp_module, capsys):
    assert check.main(["--backends", "cpp", *SMALL, "--window", "3", "5", "--seed", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:4] for line in lines[:4]] == [
        ["cpp", "float64", "parity", "ok"], ["cpp", "gradcheck", "ok", "passed"], ["cpp", "float32", "ok", "loss"],
        ["cpp", "float32", "mean", "ok"]]
    assert lines[-1] == "all checks passed"


def test_float32_mean_judges_the_training_steps_gradient(cpp_module, monkeypatch, capsys):
    """A backend whose gradient is wrong only for a uniform grad_output (its training step; the
    backward pass of a weighted map is right) fails the 'float32 mean' check alone."""
    monkeypatch.setattr(check, "_loss_and_grad", _wrong_mean(check._loss_and_grad))
    assert check.main(["--backends", "cpp", *SMALL, "--window", "3"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:4] for line in lines[:4]] == [
        ["cpp", "float64", "parity", "ok"], ["cpp", "gradcheck", "ok", "passed"], ["cpp", "float32", "ok", "loss"],
        ["cpp", "float32", "mean", "FAIL"]]


def _wrong_mean(loss_and_grad):
    """_loss_and_grad whose cpp gradient of a 'mean' loss is off by a relative 1e-3."""
    def wrong(backend, pred, target, ring, weight, opts, reduction=None):
        loss, grad = loss_and_grad(backend, pred, target, ring, weight, opts, reduction)
        return loss, grad * (1 + 1e-3) if backend == "cpp" and reduction == "mean" else grad
    return wrong


@pytest.mark.parametrize("scale", [1.001, 1 + 1e-5])
def test_a_wrong_backend_fails(cpp_module, monkeypatch, capsys, scale):
    """A backend whose D is off by a relative 1e-3 or 1e-5 (gradient too, through autograd) must not pass."""
    original = cpp_module.local_divergence
    monkeypatch.setattr(cpp_module, "local_divergence", lambda *args: original(*args) * scale)
    assert check.main(["--backends", "cpp", *SMALL, "--window", "3"]) == 1
    out = capsys.readouterr().out
    assert "cpp       float64 parity  FAIL" in out and out.rstrip().endswith("some checks FAILED")


def test_valid_padding_with_several_windows_weights_the_sum(cpp_module, capsys):
    assert check.main(["--backends", "cpp", *SMALL, "--window", "3", "5", "--padding", "valid",
                       "--divergence", "hellinger", "--kernel", "gaussian"]) == 0


def test_bad_options_and_missing_devices_are_reported(capsys):
    with pytest.raises(SystemExit, match="2"):
        check.main(["--window", "4"])
    assert "window sides must be odd and >= 1, got 4" in capsys.readouterr().err
    assert check.main(["--backends", "cuda"]) == 2  # cuda serves CUDA tensors only: nothing ran on the CPU
    assert "cuda      skipped: " in capsys.readouterr().out

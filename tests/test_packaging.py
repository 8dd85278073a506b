"""The package as another project installs it: a built wheel's contents; its console scripts and
loss run from a venv outside the repository, not shadowed by the working directory; presets by
name; the core loss without the `train` extra, and the one-line error of a training command
without it."""
import configparser
import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import entropy_kernels
from train import extra, presets
from train.__main__ import main

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {"entropy-sde": "train.__main__:main", "entropy-kernels-check": "entropy_kernels.check:main"}
CSRC_SUFFIXES = (".cpp", ".cu", ".h")
# A fixed tiny case, computed by the installed copy and by this checkout.
LOSS_CASE = """
import torch
from entropy_kernels import spatial_entropy_loss
g = torch.Generator().manual_seed(7)
pred = torch.rand(2, 3, 9, 7, generator=g, dtype=torch.float64, requires_grad=True)
target = torch.rand(2, 3, 9, 7, generator=g, dtype=torch.float64)
ring = torch.rand(8, generator=g, dtype=torch.float64) + 0.1
loss = spatial_entropy_loss(pred, target, bins=5, window=3, neighbor_weights=ring, backend=BACKEND)
(grad,) = torch.autograd.grad(loss * 1.7, pred)
"""


def run(args, cwd, env=None, check=True):
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, f"{args} exited {result.returncode}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


def clean_env():
    """No PYTHONPATH: it would put a checkout ahead of what the venv installed."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel of the sources alone (ENTROPY_KERNELS_NO_BUILD=1): compiling the extension into it
    took minutes of this project's 2-core machine, and setup.py's extension build is what the
    editable install of the test set-up runs anyway. Built from a copy, so that the checkout gets
    no build/ folder."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", "*.so", "runs", "bench_out", ".pytest_cache"))
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", root / "dist", source],
        cwd=root, env={**clean_env(), "ENTROPY_KERNELS_NO_BUILD": "1"})
    (built,) = (root / "dist").glob("*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory):
    """A fresh venv outside the repository that sees the system's torch, with the wheel installed
    into it. --ignore-installed: where the test set-up's editable install lives in the system's
    site-packages, pip would otherwise count the wheel as installed already."""
    root = tmp_path_factory.mktemp("venv") / "env"
    run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", root], cwd=root.parent)
    python = root / "bin" / "python"
    if sys.prefix != sys.base_prefix:
        # Run from a venv, whose packages (the train extra, an editable install of this checkout)
        # the new venv would not see: add them after its own, as the system's are.
        site_packages = run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                            cwd=root).stdout.strip()
        lines = [f"import site; site.addsitedir({path!r})\n" for path in site.getsitepackages()]
        Path(site_packages, "outer_venv.pth").write_text("".join(lines))
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--ignore-installed", wheel],
        cwd=root.parent, env=clean_env())
    return root


def test_wheel_holds_the_packages_presets_sources_and_entry_points(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
        entry_points = configparser.ConfigParser()
        entry_points.read_string(archive.read(f"{info}/entry_points.txt").decode())
        metadata = archive.read(f"{info}/METADATA").decode()
        assert {n.split("/")[0] for n in names} == {"entropy_kernels", "model", "train", info}
        for package in ("entropy_kernels", "entropy_kernels/ops", "model", "train", "train/presets"):
            assert f"{package}/__init__.py" in names
        assert {f"train/presets/{name}.yaml" for name in presets.names()} <= names
        sources = [p for p in sorted((REPO / "csrc").iterdir()) if p.suffix in CSRC_SUFFIXES]
        assert {"bindings.cpp", "entropy_cpu.cpp", "entropy_cuda.cu", "entropy_math.h"} <= {p.name for p in sources}
        for source in sources:  # the copies the installed JIT build compiles, byte for byte
            assert archive.read(f"entropy_kernels/csrc/{source.name}") == source.read_bytes()
        assert f"{info}/licenses/LICENSE" in names
    assert dict(entry_points["console_scripts"]) == SCRIPTS
    assert f"\nVersion: {entropy_kernels.__version__}\n" in metadata
    assert "\nRequires-Dist: torch\n" in metadata and "\nRequires-Dist: ninja\n" in metadata


def test_installed_copy_runs_its_scripts_and_the_loss_from_another_folder(venv, tmp_path):
    env = clean_env()
    sde = run([venv / "bin" / "entropy-sde", "--help"], cwd=tmp_path, env=env).stdout
    assert sde.startswith("usage: entropy-sde ")
    assert all(command in sde for command in ("fit", "enhance", "evaluate", "fetch-metric-weights"))
    check = run([venv / "bin" / "entropy-kernels-check", "--help"], cwd=tmp_path, env=env).stdout
    assert check.startswith("usage: entropy-kernels-check ")

    probe = LOSS_CASE.replace("BACKEND", "'reference'") + """
import importlib.metadata, json, entropy_kernels, model, train.presets
from entropy_kernels.ops import _extension
print(json.dumps({
    "files": [m.__file__ for m in (entropy_kernels, model, train.presets, _extension)],
    "csrc": str(_extension.CSRC), "missing": [s for s in _extension.sources(True) + _extension.sources(False)
                                             if not __import__("os").path.exists(s)],
    "presets": train.presets.names(), "version": importlib.metadata.version("entropy-kernels"),
    "loss": loss.item(), "grad": grad.flatten().tolist()}))
"""
    out = json.loads(run([venv / "bin" / "python", "-c", probe], cwd=tmp_path, env=env).stdout)
    # The venv's own copy, not the checkout (nor an editable install of it the venv can see).
    venv_root = str(venv.resolve())
    assert all(path.startswith(venv_root) for path in out["files"] + [out["csrc"]]), out
    assert out["csrc"].endswith(os.path.join("entropy_kernels", "csrc")) and out["missing"] == []
    assert out["presets"] == presets.names() and out["version"] == entropy_kernels.__version__
    scope = {}
    exec(LOSS_CASE.replace("BACKEND", "'reference'"), scope)
    assert out["loss"] == pytest.approx(scope["loss"].item(), rel=1e-12)
    assert torch.allclose(torch.tensor(out["grad"], dtype=torch.float64), scope["grad"].flatten(), rtol=1e-10, atol=0)


def test_console_script_is_not_shadowed_by_the_working_directory(venv, tmp_path):
    for name in ("model.py", "train.py"):
        (tmp_path / name).write_text(f"raise SystemExit('the working directory\\'s {name} was imported')\n")
    env = clean_env()
    # The folder really shadows: `python -m train` from it imports its train.py ...
    shadowed = run([venv / "bin" / "python", "-m", "train", "--help"], cwd=tmp_path, env=env, check=False)
    assert shadowed.returncode == 1 and "train.py was imported" in shadowed.stderr
    # ... the console script runs the installed train (which imports model) and its presets.
    ours = run([venv / "bin" / "entropy-sde", "fit", "--config", "dem"], cwd=tmp_path, env=env, check=False)
    assert ours.returncode == 2, ours.stderr
    assert "error: --config: unknown preset 'dem'" in ours.stderr
    assert ", ".join(presets.names()) in ours.stderr


def test_config_takes_a_preset_name_or_a_path(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").write_text("not: [yaml")  # a bare name is a preset, never a file of the working directory
    assert presets.resolve("demo") == presets.FOLDER / "demo.yaml"
    assert presets.names() == ["demo", "lol_v1", "lol_v1_large_crop", "lol_v2_real"]
    mine = tmp_path / "configs" / "mine.yaml"
    mine.parent.mkdir()
    mine.write_text("out_dir: runs/mine\ntrain: {steps: 3}\n")
    assert presets.resolve("configs/mine.yaml") == Path("configs/mine.yaml")
    from train.config import load_config

    assert load_config("configs/mine.yaml")["train"]["steps"] == 3
    assert load_config("demo")["out_dir"] == "runs/demo"
    for config, message in (("dem", "--config: unknown preset 'dem': the presets are demo, lol_v1, lol_v1_large_crop, lol_v2_real"),
                            ("demo.yaml", "demo.yaml: no such config file (the presets by name are demo, ")):
        assert main(["fit", "--config", config], prog="entropy-sde") == 2
        err = capsys.readouterr().err
        assert f"error: {message}" in err


def test_loss_needs_torch_alone():
    """The train extra's modules (numpy among them) made unimportable: the loss still runs, on the
    reference and on the C++ backend, and they agree."""
    blocked = sorted(extra.MODULES)
    script = f"import sys\nfor name in {blocked!r}:\n    sys.modules[name] = None\n" + (
        LOSS_CASE.replace("BACKEND", "'cpp'") + "cpp = (loss.item(), grad.clone())\n"
        + LOSS_CASE.replace("BACKEND", "'reference'")
        + "assert abs(cpp[0] - loss.item()) <= 1e-9 * abs(loss.item()), (cpp[0], loss.item())\n"
        + "assert torch.allclose(cpp[1], grad, rtol=1e-6, atol=1e-12)\n"
        + f"assert not any(sys.modules.get(name) for name in {blocked!r})\n"
        + "print('ok', loss.item())\n")
    result = run([sys.executable, "-c", script], cwd=REPO)
    assert result.stdout.startswith("ok ")


def test_training_command_without_the_train_extra_names_it():
    script = ("import sys\nsys.modules['yaml'] = None\nsys.modules['safetensors'] = None\n"
              "sys.argv = ['entropy-sde', 'fit', '--config', 'demo']\n"
              "import runpy\nrunpy.run_module('train', run_name='__main__')\n")
    result = run([sys.executable, "-c", script], cwd=REPO, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: the training commands need the train extra (pyyaml, safetensors not installed): "
        "pip install 'entropy-kernels[train]' (from a checkout: pip install --no-build-isolation -e '.[train]')"]


def test_train_extra_modules_are_the_extra_in_pyproject():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert sorted(extra.MODULES.values()) == sorted(project["optional-dependencies"]["train"])
    assert project["dependencies"] == ["torch", "ninja"]
    assert {f"{name} = {target}" for name, target in SCRIPTS.items()} == {
        f"{name} = {target}" for name, target in project["scripts"].items()}
    import importlib.metadata

    provided = importlib.metadata.packages_distributions()
    for module, distribution in extra.MODULES.items():
        if module in provided:  # installed here: the import name is that distribution's
            assert distribution in {d.lower() for d in provided[module]}, (module, provided[module])

"""Inference: loading a checkpoint or exported weights, one-line errors for bad files, output
formats by extension, 16-bit images, threads, evaluate's own folder, and the Python entry points."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import png
import pytest
import tifffile
import torch
from PIL import Image
from safetensors.torch import save_file

import train
from test_train import data_root, tiny_config  # noqa: F401 - data_root: the tiny pairs fixture
from train.__main__ import main
from train.data import DataError, read_image, write_image
from train.fit import fit
from train.inference import WEIGHTS_FORMAT, load_for_sampling

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(data_root, tmp_path_factory):
    """A real (2-step) training checkpoint of a run whose train.threads is 1."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    summary = fit(tiny_config(data_root, out, "train.steps=2", "train.checkpoint_every=2", "model.sigma_data=0.3",
                              "train.threads=1", "sample.steps=3"))
    return Path(summary["checkpoint"])


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def export(checkpoint, path, **metadata):
    """What `python -m train export` writes (docs: the shared format): EMA weights + metadata."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    fields = {"format": WEIGHTS_FORMAT, "config": json.dumps(state["config"]), "step": str(state["step"]), **metadata}
    save_file({k: v.contiguous() for k, v in state["ema"].items()}, str(path), metadata=fields)
    return path


def enhance(checkpoint, source, target, *extra):
    return main(["enhance", "--checkpoint", str(checkpoint), str(source), str(target), "--steps", "2", *extra])


def test_exported_weights_enhance_exactly_as_the_checkpoint(checkpoint, data_root, tmp_path, keep_threads):
    weights = export(checkpoint, tmp_path / "tiny.safetensors")
    low = data_root / "test" / "low" / "000.png"
    assert enhance(checkpoint, low, tmp_path / "from_ckpt.png", "--bits", "16") == 0
    assert enhance(weights, low, tmp_path / "from_export.png", "--bits", "16") == 0
    from_ckpt, from_export = read_image(tmp_path / "from_ckpt.png"), read_image(tmp_path / "from_export.png")
    assert torch.equal(from_ckpt, from_export)
    assert not torch.equal(from_ckpt, read_image(low))  # the network did something
    net_a, _, config_a = load_for_sampling(checkpoint)
    net_b, _, config_b = load_for_sampling(weights)
    assert config_a == config_b
    assert all(torch.equal(a, b) for a, b in zip(net_a.state_dict().values(), net_b.state_dict().values()))


def test_checkpoint_is_read_on_the_cpu_memory_mapped_and_ema_only(checkpoint, monkeypatch):
    calls = []
    original = torch.load
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: calls.append(kwargs) or original(*args, **kwargs))
    network, _, _ = load_for_sampling(checkpoint, "cpu")
    assert calls == [{"map_location": "cpu", "weights_only": True, "mmap": True}]
    state = original(checkpoint, map_location="cpu", weights_only=True)
    assert not torch.equal(state["model"]["intro.weight"], state["ema"]["intro.weight"])
    assert torch.equal(network.state_dict()["intro.weight"], state["ema"]["intro.weight"])


def _bad_files(checkpoint, folder):
    folder.mkdir()
    good = checkpoint.read_bytes()
    (folder / "truncated.pt").write_bytes(good[: len(good) // 2])
    (folder / "text.pt").write_text("these are not weights\n" * 4)
    (folder / "empty.pt").write_bytes(b"")
    torch.save({"model": {"w": torch.ones(1)}}, folder / "no_ema.pt")
    exported = export(checkpoint, folder / "good.safetensors").read_bytes()
    (folder / "truncated.safetensors").write_bytes(exported[:-10])
    export(checkpoint, folder / "other_format.safetensors", format="someone-else/2")
    export(checkpoint, folder / "no_config.safetensors", config="{not json")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    config = dict(state["config"], model={**state["config"]["model"], "width": 4})
    save_file({k: v.contiguous() for k, v in state["ema"].items()}, str(folder / "other_network.safetensors"),
              metadata={"format": WEIGHTS_FORMAT, "config": json.dumps(config), "step": "2"})
    return {
        "missing.pt": "no such file",
        "truncated.pt": "not a readable training checkpoint",
        "text.pt": "neither a training checkpoint",
        "empty.pt": "neither a training checkpoint",
        "no_ema.pt": "without the 'ema' weights",
        "truncated.safetensors": "not a readable safetensors file",
        "other_format.safetensors": "metadata format is 'someone-else/2'",
        "no_config.safetensors": "no readable 'config'",
        "other_network.safetensors": "weights do not fit the network of its config: shape of",
    }


@pytest.mark.parametrize("command", ["enhance", "evaluate"])
def test_bad_weight_files_are_one_error_line_and_exit_2(command, checkpoint, data_root, tmp_path, capsys):
    cases = _bad_files(checkpoint, tmp_path / "bad")
    for name, reason in cases.items():
        path = tmp_path / "bad" / name
        args = ([str(data_root / "test" / "low" / "000.png"), str(tmp_path / "out.png")] if command == "enhance"
                else ["--data", str(data_root / "test"), "--out", str(tmp_path / "eval")])
        assert main([command, "--checkpoint", str(path), *args]) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: {path}: ") and reason in err, (name, err)
    assert not (tmp_path / "out.png").exists() and not (tmp_path / "eval").exists()


def test_output_format_follows_the_extension(checkpoint, data_root, tmp_path, capsys, keep_threads):
    low = data_root / "test" / "low" / "000.png"
    magic = {"png": b"\x89PNG", "jpg": b"\xff\xd8\xff", "jpeg": b"\xff\xd8\xff", "tif": b"II*\x00", "tiff": b"II*\x00"}
    for ext, head in magic.items():
        assert enhance(checkpoint, low, tmp_path / f"out.{ext}") == 0
        assert (tmp_path / f"out.{ext}").read_bytes().startswith(head), ext
        with Image.open(tmp_path / f"out.{ext}") as img:
            assert img.size == (23, 19) and img.mode == "RGB"
    png8 = read_image(tmp_path / "out.png")
    assert (read_image(tmp_path / "out.jpg") - png8).abs().mean() < 0.03  # the same picture, lossily
    assert torch.equal(read_image(tmp_path / "out.tif"), png8)  # 8-bit input: 8-bit TIFF
    capsys.readouterr()
    for target, message in (("out.gif", "unknown image extension '.gif'"), ("out.jpg", "JPEG holds 8 bits")):
        assert enhance(checkpoint, low, tmp_path / "new" / target, *(["--bits", "16"] if target == "out.jpg" else [])) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {tmp_path / 'new' / target}: {message}"), err
    assert not (tmp_path / "new").exists()  # refused before sampling anything


def _sixteen_bit_image(rng, height=9, width=11):
    """Values whose low byte carries information: truncating to 8 bits changes every pixel."""
    return (rng.integers(0, 256, (height, width, 3)) * 256 + rng.integers(1, 256, (height, width, 3))).astype(np.uint16)


def test_sixteen_bit_png_and_tiff_are_read_with_all_bits(tmp_path):
    rng = np.random.default_rng(7)
    values = _sixteen_bit_image(rng)
    with open(tmp_path / "rgb16.png", "wb") as fh:
        png.Writer(11, 9, greyscale=False, bitdepth=16).write(fh, values.reshape(9, 33))
    grey = values[..., 0]
    with open(tmp_path / "grey16.png", "wb") as fh:
        png.Writer(11, 9, greyscale=True, bitdepth=16).write(fh, grey)
    tifffile.imwrite(tmp_path / "rgb16.tif", values, photometric="rgb")
    tifffile.imwrite(tmp_path / "planar16.tif", np.moveaxis(values, -1, 0), photometric="rgb", planarconfig="separate")
    expected = torch.from_numpy(values.astype(np.float64) / 65535).permute(2, 0, 1)
    for name in ("rgb16.png", "rgb16.tif", "planar16.tif"):
        image = read_image(tmp_path / name)
        assert image.dtype == torch.float32 and image.shape == (3, 9, 11)
        torch.testing.assert_close(image.double(), expected, rtol=0, atol=1e-7)
        assert torch.equal((image.double() * 65535).round().long(), torch.from_numpy(values.astype(np.int64)).permute(2, 0, 1))
    grey_image = read_image(tmp_path / "grey16.png")
    assert torch.equal((grey_image.double() * 65535).round().long(), torch.from_numpy(grey.astype(np.int64)).expand(3, 9, 11))


def test_sixteen_bit_write_round_trips_and_eight_bit_rounds(tmp_path):
    x = torch.rand(3, 7, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for name, bits in (("a.png", 16), ("a.tiff", 16), ("b.png", 8), ("b.tif", 8)):
        write_image(tmp_path / name, x.float(), bits)
        back = read_image(tmp_path / name).double()
        scale = 2**bits - 1
        assert torch.equal((back * scale).round(), (x.float().double() * scale).round()), name
    with pytest.raises(DataError, match="bits must be 8 or 16, got 12"):
        write_image(tmp_path / "c.png", x, 12)


def test_sixteen_bit_input_gives_sixteen_bit_output_by_default(checkpoint, tmp_path, keep_threads):
    values = _sixteen_bit_image(np.random.default_rng(2), 13, 17) // 8  # dark
    with open(tmp_path / "low16.png", "wb") as fh:
        png.Writer(17, 13, greyscale=False, bitdepth=16).write(fh, values.reshape(13, 51))
    assert enhance(checkpoint, tmp_path / "low16.png", tmp_path / "out16.png") == 0
    assert enhance(checkpoint, tmp_path / "low16.png", tmp_path / "out8.png", "--bits", "8") == 0
    assert (tmp_path / "out16.png").read_bytes()[24] == 16 and (tmp_path / "out8.png").read_bytes()[24] == 8
    deep, shallow = read_image(tmp_path / "out16.png"), read_image(tmp_path / "out8.png")
    assert torch.equal((deep * 255).round(), (shallow * 255).round())
    assert not torch.equal(deep, shallow)


def test_threads_default_to_the_runs_setting(checkpoint, data_root, tmp_path, capsys, keep_threads):
    low = data_root / "test" / "low" / "000.png"
    torch.set_num_threads(2)
    assert enhance(checkpoint, low, tmp_path / "a.png") == 0
    assert torch.get_num_threads() == 1  # the checkpoint's train.threads
    assert enhance(checkpoint, low, tmp_path / "b.png", "--threads", "2") == 0
    assert torch.get_num_threads() == 2
    assert torch.equal(read_image(tmp_path / "a.png"), read_image(tmp_path / "b.png"))
    with pytest.raises(SystemExit) as exit_info:
        enhance(checkpoint, low, tmp_path / "c.png", "--threads", "0")
    assert exit_info.value.code == 2 and "threads must be a positive integer, got 0" in capsys.readouterr().err
    torch.set_num_threads(2)
    train.load_enhancer(checkpoint, "cpu")
    assert torch.get_num_threads() == 2  # the Python function leaves the process's threads unless asked


def test_evaluate_writes_its_own_folder_in_the_working_directory(checkpoint, data_root, tmp_path, monkeypatch,
                                                                 keep_threads):
    run_dir = checkpoint.parent.parent
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(data_root / "test"), "--steps", "2"]) == 0
    out = tmp_path / "eval" / f"{run_dir.name}_last_test"
    assert json.loads((out / "results.json").read_text())["images"][0]["image"] == "000.png"
    assert sorted(p.name for p in (out / "outputs").iterdir()) == ["000.png", "001.png"]
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before  # the run is untouched
    weights = export(checkpoint, tmp_path / "tiny.safetensors")
    assert main(["evaluate", "--checkpoint", str(weights), "--data", str(data_root / "test"), "--steps", "2"]) == 0
    assert (tmp_path / "eval" / "tiny_test" / "results.json").is_file()


def test_load_enhancer_on_tensors_and_enhance_file(checkpoint, data_root, tmp_path, keep_threads):
    enhancer = train.load_enhancer(checkpoint, "cpu", steps=2, seed=5)
    assert enhancer.sample["steps"] == 2 and enhancer.sample["method"] == "posterior"
    low = read_image(data_root / "test" / "low" / "000.png")
    other = read_image(data_root / "test" / "low" / "001.png")
    single = enhancer(low)
    assert single.shape == low.shape and single.min() >= 0 and single.max() <= 1
    torch.testing.assert_close(enhancer(torch.stack([other, low]))[1], single, rtol=0, atol=1e-6)  # batch-independent
    assert torch.equal(enhancer(low, seed=5), single) and not torch.equal(enhancer(low, seed=6), single)
    written = train.enhance_file(checkpoint, data_root / "test" / "low", tmp_path / "all", steps=2, seed=5, bits=16)
    assert [p.name for p in written] == ["000.png", "001.png"]
    torch.testing.assert_close(read_image(written[0]), single, rtol=0, atol=0.5 / 65535)
    with pytest.raises(ValueError, match=r"low must be a float tensor \(3, H, W\) or \(N, 3, H, W\)"):
        enhancer(low[0])
    with pytest.raises(ValueError, match="sample.method must be 'posterior' or 'sde', got 'ddim'"):
        train.load_enhancer(checkpoint, "cpu", method="ddim")
    with pytest.raises(TypeError, match=r"unknown sampling settings \['stepz'\]"):
        train.load_enhancer(checkpoint, "cpu", stepz=3)
    with pytest.raises(DataError, match="no such file"):
        train.load_enhancer(tmp_path / "nothing.pt")


def test_example_enhances_from_python(checkpoint, data_root, tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "enhance_from_python.py"), str(checkpoint),
         str(data_root / "test" / "low" / "001.png"), str(tmp_path / "bright.jpg"), "--steps", "2", "--device", "cpu"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "mean brightness" in result.stdout
    assert (tmp_path / "bright.jpg").read_bytes().startswith(b"\xff\xd8\xff")
    with Image.open(tmp_path / "bright.jpg") as img:
        assert img.size == (23, 19)

"""The training layer end to end on a tiny model: loss goes down, resume is exact, the CLI
enhances and evaluates, data errors name the file, and two Gloo processes train together."""
import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model import IRSDE, TiledNetwork, build_network, build_noise_network
from train import inference, presets
from train import fit as fit_module
from train.__main__ import main
from train.checkpoint import load_checkpoint, save_checkpoint
from train.config import ConfigError, load_config
from train.data import DataError, RandomCrops, make_demo_dataset, pair_folders, read_image, split_pairs
from train.fit import TrainingLoss, fit, step_loss
from train.inference import load_for_sampling
from train.metrics import psnr, ssim

REPO = Path(__file__).resolve().parents[1]


def write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_pairs(folder, count, height, width, seed, low_prefix="", high_prefix=""):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    for k in range(count):
        phase = rng.uniform(0, 6, size=3)
        high = 0.5 + 0.4 * np.sin(6 * xx[..., None] + 4 * yy[..., None] + phase)
        low = np.clip(high * 0.15 + rng.normal(0, 0.01, high.shape), 0, 1)
        write_png(folder / "high" / f"{high_prefix}{k:03d}.png", (high * 255).astype(np.uint8))
        write_png(folder / "low" / f"{low_prefix}{k:03d}.png", (low * 255).astype(np.uint8))


def tiny_config(data_root, out_dir, *extra):
    return load_config(None, [
        f"out_dir={out_dir}", "data.layout=folders",
        f"data.train={{low: {data_root}/train/low, high: {data_root}/train/high}}",
        f"data.test={{low: {data_root}/test/low, high: {data_root}/test/high}}",
        "data.crop=16", "data.batch_size=2", "data.val_images=1",
        "model.width=8", "model.enc_blocks=[1, 1]", "model.dec_blocks=[1, 1]",
        "loss.entropy={bins: 8, window: 3}", "loss.weights={entropy: 1.0}",
        "train.steps=6", "train.log_every=1", "train.checkpoint_every=3", "train.lr=0.002",
        "sample.steps=4", "evaluate_at_end=false", *extra,
    ])


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    make_pairs(root / "train", 4, 24, 28, seed=0)
    make_pairs(root / "test", 2, 19, 23, seed=1)
    return root


@pytest.fixture(scope="module")
def checkpoint(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    summary = fit(tiny_config(data_root, out, "train.val_every=3", "model.sigma_data=0.3"))
    return Path(summary["checkpoint"])


def test_training_steps_lower_the_loss(data_root):
    torch.manual_seed(0)
    cfg = tiny_config(data_root, "unused")
    pairs = split_pairs(cfg["data"], "train")
    low, high = (torch.stack(x) for x in zip(*[RandomCrops(pairs, 16, 4, seed=3)[i] for i in range(4)]))
    sde = IRSDE(steps=100)
    model_cfg = dict(cfg["model"])
    net = build_network(model_cfg.pop("preset"), **model_cfg)
    criterion = TrainingLoss(cfg["loss"], torch.Generator().manual_seed(0))

    def held_out_loss():  # the same four draws of t, noise and neighbour weights every time
        fixed = TrainingLoss(cfg["loss"], torch.Generator().manual_seed(0))
        gen = torch.Generator().manual_seed(123)
        with torch.no_grad():
            return sum(float(step_loss(net, sde, fixed, low, high, gen)[0]) for _ in range(4)) / 4

    before = held_out_loss()
    optimiser = torch.optim.AdamW(net.parameters(), lr=2e-3, betas=(0.9, 0.99), weight_decay=0)
    gen = torch.Generator().manual_seed(7)
    for _ in range(30):
        loss, _ = step_loss(net, sde, criterion, low, high, gen)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert held_out_loss() < 0.8 * before


def test_resume_continues_exactly(data_root, tmp_path, monkeypatch):
    saved = {}
    original = fit_module.save_checkpoint

    def keep_step_3(path, state):
        original(path, state)
        if state["step"] == 3:
            saved["path"] = shutil.copy(path, tmp_path / "step3.pt")

    monkeypatch.setattr(fit_module, "save_checkpoint", keep_step_3)
    whole = fit(tiny_config(data_root, tmp_path / "whole"))
    resumed = fit(tiny_config(data_root, tmp_path / "resumed"), resume=saved["path"])
    a, b = load_checkpoint(whole["checkpoint"]), load_checkpoint(resumed["checkpoint"])
    assert a["step"] == b["step"] == 6
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after resume"
    assert a["scheduler"] == b["scheduler"]
    assert all(torch.equal(x["exp_avg"], y["exp_avg"]) for x, y in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()))
    losses = lambda run: [json.loads(l)["loss"] for l in open(tmp_path / run / "log.jsonl") if '"loss"' in l]  # noqa: E731
    assert losses("whole")[3:] == losses("resumed")
    with pytest.raises(ConfigError, match="already holds a run"):  # a fresh run in the same folder
        fit(tiny_config(data_root, tmp_path / "whole", "train.steps=2"))
    fit(tiny_config(data_root, tmp_path / "whole", "train.steps=2"), overwrite=True)
    assert len(losses("whole")) == 2


def test_checkpoint_is_written_atomically_and_loads_weights_only(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"w": torch.ones(2), "step": 4})
    save_checkpoint(path, {"w": torch.zeros(2), "step": 5})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]
    assert load_checkpoint(path)["step"] == 5
    torch.save({"bad": Path("x")}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="weights_only|Unsupported|global"):
        load_checkpoint(tmp_path / "evil.pt")


def test_checkpoint_and_log_contents(checkpoint):
    state = load_checkpoint(checkpoint)
    assert state["step"] == 6 and state["config"]["model"]["width"] == 8
    assert not any(name.startswith("c_") for name in state["ema"])  # preconditioning follows from the config
    network, sde, _ = load_for_sampling(checkpoint)
    torch.testing.assert_close(network.c_skip, sde.preconditioning(0.3)[1].float())
    records = [json.loads(l) for l in open(checkpoint.parent.parent / "log.jsonl")]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if "val_psnr" in r] == [3, 6]


def test_enhance_file_and_folder(checkpoint, data_root, tmp_path):
    src = data_root / "test" / "low" / "000.png"
    assert main(["enhance", "--checkpoint", str(checkpoint), str(src), str(tmp_path / "one.png"), "--steps", "3"]) == 0
    assert main(["enhance", "--checkpoint", str(checkpoint), str(data_root / "test" / "low"), str(tmp_path / "all")]) == 0
    assert read_image(tmp_path / "one.png").shape == (3, 19, 23)
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == ["000.png", "001.png"]


def test_enhance_on_tiles(checkpoint, data_root, tmp_path, capsys, monkeypatch):
    src = data_root / "test" / "low" / "000.png"  # 19 x 23
    run = lambda name, *extra: main(["enhance", "--checkpoint", str(checkpoint), str(src), str(tmp_path / name),  # noqa: E731
                                     "--steps", "3", *extra])
    assert run("whole.png") == 0 and run("one_tile.png", "--tile", "32") == 0
    assert run("tiles.png", "--tile", "16", "--tile-overlap", "4") == 0
    whole, one_tile, tiles = (read_image(tmp_path / f"{n}.png") for n in ("whole", "one_tile", "tiles"))
    assert torch.equal(one_tile, whole)  # an image within one tile is not tiled
    assert tiles.shape == whole.shape and not torch.equal(tiles, whole)  # the network saw 16 x 16 tiles
    made = []
    monkeypatch.setattr(inference, "TiledNetwork", lambda *args: made.append(args[1:]) or TiledNetwork(*args))
    assert run("pooled.png", "--tile", "16", "--tile-pooling", "tile") == 0 and run("default.png", "--tile", "20") == 0
    assert made == [(16, None, "tile"), (20, None, "image")]
    for bad, message in ((["--tile", "0"], "tile must be a positive integer, got 0"),
                         (["--tile", "16", "--tile-overlap", "16"], r"got 16")):
        with pytest.raises(SystemExit) as exit_info:
            run("bad.png", *bad)
        assert exit_info.value.code == 2
        assert re.search(message, capsys.readouterr().err)
    with pytest.raises(ValueError, match="sample.tile"):
        load_config(None, ["sample.tile=64", "sample.tile_overlap=64"])
    with pytest.raises(ValueError, match="sample.tile_pooling: must be one of"):
        load_config(None, ["sample.tile_pooling=global"])


def test_tiled_enhance_benchmark_runs(checkpoint, tmp_path, capsys):
    """benchmarks/tiled_enhance.py end to end at a tiny size: whole and tiled runs, its table and CSV."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import tiled_enhance
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    assert tiled_enhance.main(["--checkpoint", str(checkpoint), "--side", "40", "--tiles", "0", "16",
                               "--steps", "2", "--device", "cpu", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "tiled_enhance.csv")))
    assert [int(r["tile"]) for r in rows] == [0, 16]
    assert float(rows[1]["psnr_vs_whole"]) < 100  # 16-pixel tiles changed the output
    assert "PSNR vs whole" in capsys.readouterr().out


def test_evaluate_writes_table_json_and_grid(checkpoint, data_root, tmp_path, capsys):
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(data_root / "test"), "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "PSNR in" in table and "mean" in table and "fid: unavailable" in table
    result = json.loads((tmp_path / "results.json").read_text())
    assert len(result["images"]) == 2
    low, high = read_image(data_root / "test/low/000.png"), read_image(data_root / "test/high/000.png")
    assert result["images"][0]["input"]["psnr"] == pytest.approx(psnr(low, high))
    assert read_image(tmp_path / "grid.png").shape == (3, 2 * 19, 3 * 23)


def test_psnr_and_ssim_conventions():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 20, 24, generator=gen)
    assert psnr(x, (x + 0.1).clamp(0, 1)) == pytest.approx(10 * np.log10(1 / float(((x + 0.1).clamp(0, 1) - x).square().mean())))
    assert ssim(x, x) == pytest.approx(1.0)
    assert ssim(x, torch.rand(3, 20, 24, generator=gen)) < 0.2


def test_unreadable_image_names_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png"):
        read_image(bad)


def test_low_without_pair_names_the_file(tmp_path):
    make_pairs(tmp_path, 2, 20, 20, seed=0)
    (tmp_path / "high" / "001.png").unlink()
    with pytest.raises(DataError, match="001.png"):
        pair_folders(tmp_path / "low", tmp_path / "high")


def test_lol_v2_prefixes_pair_up(tmp_path):
    make_pairs(tmp_path, 2, 20, 20, seed=0, low_prefix="low", high_prefix="normal")
    pairs = pair_folders(tmp_path / "low", tmp_path / "high")
    assert [(a.name, b.name) for a, b in pairs] == [("low000.png", "normal000.png"), ("low001.png", "normal001.png")]


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "low").mkdir()
    (tmp_path / "high").mkdir()
    with pytest.raises(DataError, match="no images in folder .*low"):
        pair_folders(tmp_path / "low", tmp_path / "high")


def test_crop_larger_than_image_names_the_file(tmp_path):
    make_pairs(tmp_path, 1, 20, 30, seed=0)
    with pytest.raises(DataError, match=r"crop 24 is larger than image .*000.png \(20x30\)"):
        RandomCrops(pair_folders(tmp_path / "low", tmp_path / "high"), crop=24, length=4)


def test_unknown_config_key_is_an_error():
    with pytest.raises(ValueError, match="train.stepz"):
        load_config(None, ["train.stepz=3"])
    assert load_config(None, ["loss=l1"])["loss"]["weights"] == {"l1": 1.0}


@pytest.mark.parametrize("name", presets.names())
def test_shipped_presets_load_and_build(name):
    config = load_config(name)
    sde = IRSDE(**config["sde"])
    with torch.device("meta"):
        network = build_noise_network(config["model"], sde)
    assert network.preconditioned == (config["model"].get("sigma_data") is not None)
    TrainingLoss(config["loss"], torch.Generator())


def test_demo_dataset_is_made_once(tmp_path):
    root = make_demo_dataset(tmp_path / "demo", train_side=48, test_side=40, variants=1)
    lows = sorted((root / "test" / "low").iterdir())
    assert [p.name for p in lows] == ["chelsea_0.png", "coffee_0.png"]
    low, high = read_image(lows[0]), read_image(root / "test" / "high" / "chelsea_0.png")
    assert max(high.shape[1:]) == 40 and low.shape == high.shape
    assert float(low.mean()) < 0.6 * float(high.mean())
    stamp = lows[0].stat().st_mtime_ns
    make_demo_dataset(tmp_path / "demo", train_side=48, test_side=40, variants=1)
    assert lows[0].stat().st_mtime_ns == stamp


def test_two_process_gloo_training(data_root, tmp_path):
    overrides = [
        f"out_dir={tmp_path}", "data.layout=folders",
        f"data.train={{low: {data_root}/train/low, high: {data_root}/train/high}}",
        "data.crop=16", "data.batch_size=2", "model.width=8", "model.enc_blocks=[1, 1]", "model.dec_blocks=[1, 1]",
        "loss.entropy={bins: 8, window: 3}", "train.steps=4", "train.log_every=1", "train.checkpoint_every=2",
        "evaluate_at_end=false",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "train", "fit", *overrides],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["step"] == 4
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["noise"], state["rng"][1]["noise"])
    records = [json.loads(l) for l in open(tmp_path / "log.jsonl")]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]  # rank 0 alone logs

"""Training runs through the command line: one `error:` line per config, checkpoint and file
mistake; run folders that refuse a fresh run; resume with and without --config (bitwise equal to
the uninterrupted run); snapshots, best.pt and export; what the run prints."""
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from contextlib import redirect_stderr, redirect_stdout

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from model import IRSDE, build_noise_network
from test_train import REPO, data_root  # noqa: F401 - data_root is a fixture
from train.__main__ import main
from train.checkpoint import WEIGHTS_FORMAT, load_checkpoint
from train.inference import load_for_sampling


def tiny(data_root, out_dir, *extra):
    return [
        f"out_dir={out_dir}", "data.layout=folders",
        f"data.train={{low: {data_root}/train/low, high: {data_root}/train/high}}",
        f"data.test={{low: {data_root}/test/low, high: {data_root}/test/high}}",
        "data.crop=16", "data.batch_size=2", "data.val_images=1",
        "model.width=8", "model.enc_blocks=[1, 1]", "model.dec_blocks=[1, 1]",
        "loss.entropy={bins: 8, window: 3}", "train.steps=4", "train.log_every=1", "train.checkpoint_every=2",
        "train.snapshot_every=1", "train.keep_snapshots=3", "train.val_every=2", "train.lr=0.002",
        "sample.steps=3", "evaluate_at_end=false", *extra,
    ]


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def expect_error(capsys, start, *argv):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith(f"error: {start}"), err
    assert "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def run(data_root, tmp_path_factory):
    """A finished 4-step run with validation at steps 2 and 4; (folder, stderr)."""
    folder = tmp_path_factory.mktemp("run") / "tiny"
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        assert main(["fit", *tiny(data_root, folder)]) == 0
    return folder, err.getvalue()


def log_records(folder):
    return [json.loads(line) for line in open(folder / "log.jsonl")]


@pytest.mark.parametrize("overrides, start", [
    (["train.stepz=3"], "train.stepz: unknown key; did you mean 'train.steps'?"),
    (["train.steps"], "train.steps: an override needs a value"),
    (["train.steps=abc"], "train.steps: must be an integer, got 'abc'"),
    (["model.widht=8"], "model.widht: not a parameter of the network; did you mean 'width'?"),
    (["loss.entropy.binz=3"], "loss.entropy.binz: "),
    (["loss.entropy.bins=1"], "loss.entropy.bins: bins must be in [2, 1024]"),
    (["data.layout=folders"], "data.train: data.layout=folders needs data.train"),
    (["train.steps=0"], "train.steps: must be > 0, got 0"),
    (["train.checkpoint_every=0"], "train.checkpoint_every: must be > 0"),
    (["train.lr=-1e-3"], "train.lr: must be > 0"),
    (["train.ema=1.5"], "train.ema: must be in [0, 1]"),
    (["data.crop=0"], "data.crop: must be > 0"),
    (["model.enc_blocks=[1]"], "model.enc_blocks: "),
])
def test_config_errors_are_one_line_naming_the_key(capsys, overrides, start):
    expect_error(capsys, start, "fit", *overrides)


def test_file_errors_are_one_line_naming_the_path(capsys, tmp_path, run):
    folder, _ = run
    expect_error(capsys, f"{tmp_path / 'missing.yaml'}: no such config file", "fit", "--config", str(tmp_path / "missing.yaml"))
    (tmp_path / "bad.yaml").write_text("train: [1,\n")
    expect_error(capsys, f"{tmp_path / 'bad.yaml'}: not valid YAML", "fit", "--config", str(tmp_path / "bad.yaml"))
    expect_error(capsys, f"{tmp_path / 'gone.pt'}: no such checkpoint", "fit", "--resume", str(tmp_path / "gone.pt"))
    data = (folder / "checkpoints" / "last.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    expect_error(capsys, f"{tmp_path / 'cut.pt'}: cannot load the checkpoint", "fit", "--resume", str(tmp_path / "cut.pt"))
    expect_error(capsys, f"{tmp_path / 'cut.pt'}: cannot load", "export", "--checkpoint", str(tmp_path / "cut.pt"),
                 str(tmp_path / "w.safetensors"))
    torch.save({"w": torch.ones(1)}, tmp_path / "other.pt")
    expect_error(capsys, f"{tmp_path / 'other.pt'}: not a training checkpoint", "export", "--checkpoint",
                 str(tmp_path / "other.pt"), str(tmp_path / "w.safetensors"))


def test_run_folder_holds_snapshots_best_and_validation_grids(run):
    folder, err = run
    checkpoints = folder / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "best.pt", "last.pt", "step_0000002.pt", "step_0000003.pt", "step_0000004.pt"]  # keep_snapshots=3
    records = log_records(folder)
    val = {r["step"]: r["val_psnr"] for r in records if "val_psnr" in r}
    assert sorted(val) == [2, 4]
    best_step = max(val, key=val.get)
    best = load_checkpoint(checkpoints / "best.pt")
    assert best["step"] == best_step and best["best"] == {"psnr": val[best_step], "step": best_step}
    assert torch.equal(best["ema"]["intro.weight"], load_checkpoint(checkpoints / f"step_{best_step:07d}.pt")["ema"]["intro.weight"])
    grids = sorted((folder / "validation").iterdir())
    assert [p.name for p in grids] == ["step_0000002.png", "step_0000004.png"]


def test_run_prints_summary_validation_and_file_progress(run):
    _, err = run
    assert "fit: fresh run in" in err
    assert "device cpu" in err and "CPU thread(s)" in err and "backend cpp (auto)" in err
    assert "training pairs" in err and "M parameters" in err
    assert "validation at step 2: PSNR" in err and "validation at step 4: PSNR" in err
    # stderr is not a terminal here: one line per log_every step instead of a bar
    assert [line.split()[1] for line in err.splitlines() if line.startswith("step ")] == ["1/4", "2/4", "3/4", "4/4"]
    assert "\r" not in err
    assert err.count("note: tensorboard is not installed") <= 1


def test_fresh_fit_into_a_run_folder_refuses_and_overwrite_replaces(run, data_root, capsys, tmp_path):
    folder, _ = run
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    before = (copy / "log.jsonl").read_text(), (copy / "checkpoints" / "last.pt").read_bytes()
    err = expect_error(capsys, f"{copy}: already holds a run", "fit", *tiny(data_root, copy))
    assert "--resume" in err and "out_dir" in err and "--overwrite" in err
    assert ((copy / "log.jsonl").read_text(), (copy / "checkpoints" / "last.pt").read_bytes()) == before
    # a data error stops --overwrite before it deletes anything
    missing = f"data.train={{low: {tmp_path}/none, high: {data_root}/train/high}}"
    expect_error(capsys, f"image folder {tmp_path}/none does not exist", "fit", *tiny(data_root, copy, missing), "--overwrite")
    assert ((copy / "log.jsonl").read_text(), (copy / "checkpoints" / "last.pt").read_bytes()) == before
    code, _, _ = run_cli(capsys, "fit", *tiny(data_root, copy, "train.steps=1", "train.val_every=0"), "--overwrite")
    assert code == 0
    assert [r["step"] for r in log_records(copy) if "loss" in r] == [1]
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == ["last.pt", "step_0000001.pt"]
    assert not (copy / "validation").exists()


def killed_at_step_2(folder, copy):
    """`folder` as a kill after step 3 would have left it: last.pt at step 2, a half-written
    last.pt.tmp, and log lines of step 3 that no checkpoint kept."""
    shutil.copytree(folder, copy)
    checkpoints = copy / "checkpoints"
    shutil.copy(checkpoints / "step_0000002.pt", checkpoints / "last.pt")
    for name in ("step_0000003.pt", "step_0000004.pt", "best.pt"):
        (checkpoints / name).unlink()
    (checkpoints / "last.pt.tmp").write_bytes(b"half a checkpoint")
    lines = [line for line in (copy / "log.jsonl").read_text().splitlines() if json.loads(line)["step"] <= 3]
    (copy / "log.jsonl").write_text("\n".join(lines) + "\n")


def assert_same_state(a, b):
    assert a["step"] == b["step"]
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    assert a["scheduler"] == b["scheduler"]
    for x, y in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(x["exp_avg"], y["exp_avg"]) and torch.equal(x["exp_avg_sq"], y["exp_avg_sq"])


def test_resume_alone_continues_the_checkpoints_run_exactly(run, capsys, tmp_path):
    folder, _ = run
    copy = tmp_path / "killed"
    killed_at_step_2(folder, copy)
    code, _, err = run_cli(capsys, "fit", "--resume", str(copy / "checkpoints" / "last.pt"))
    assert code == 0, err
    assert f"resuming {copy / 'checkpoints' / 'last.pt'} at step 2 in {copy}" in err
    # the run folder is where the checkpoint sits, here a copy of the original
    assert [line for line in err.splitlines() if "changed on resume" in line] == [
        f"  changed on resume: out_dir: '{folder}' -> '{copy}'"]
    assert_same_state(load_checkpoint(folder / "checkpoints" / "last.pt"), load_checkpoint(copy / "checkpoints" / "last.pt"))
    strip = lambda records: [{k: v for k, v in r.items() if k not in ("seconds", "train_seconds")}  # noqa: E731
                             for r in records if "train_seconds" not in r]
    assert strip(log_records(copy)) == strip(log_records(folder))  # no step twice, none lost
    assert not (copy / "checkpoints" / "last.pt.tmp").exists()
    assert load_checkpoint(copy / "checkpoints" / "best.pt")["step"] == load_checkpoint(folder / "checkpoints" / "best.pt")["step"]


def test_resume_with_changes_prints_them_and_refuses_unsafe_ones(run, data_root, capsys, tmp_path):
    folder, _ = run
    copy = tmp_path / "more"
    shutil.copytree(folder, copy)
    last = str(copy / "checkpoints" / "last.pt")
    err = expect_error(capsys, "loss.entropy.bins, model.width: cannot change when resuming", "fit", "--resume", last,
                       "model.width=16", "loss.entropy.bins=4", "train.steps=6")
    assert "8 in the checkpoint, 16 requested" in err
    before = (copy / "checkpoints" / "last.pt").read_bytes()
    expect_error(capsys, "train.steps: 3 is before the checkpoint's step 4", "fit", "--resume", last, "train.steps=3")
    assert (copy / "checkpoints" / "last.pt").read_bytes() == before
    # nothing left to train: no checkpoint write would replace a stale temporary file, the clean-up must
    (copy / "checkpoints" / "last.pt.tmp").write_bytes(b"half a checkpoint")
    assert run_cli(capsys, "fit", "--resume", last)[0] == 0
    assert not (copy / "checkpoints" / "last.pt.tmp").exists() and (copy / "checkpoints" / "last.pt").read_bytes() == before
    # --config as well: the run's own config.yaml (out_dir pointing at the copy), six steps instead of four
    code, _, err = run_cli(capsys, "fit", "--resume", last, "--config", str(copy / "config.yaml"), f"out_dir={copy}",
                           "train.steps=6", "train.val_every=0")
    assert code == 0, err
    assert "changed on resume: train.steps: 4 -> 6" in err and "changed on resume: train.val_every: 2 -> 0" in err
    state = load_checkpoint(last)
    assert state["step"] == 6 and state["scheduler"]["T_max"] == 6
    lr = [r["lr"] for r in log_records(copy) if "lr" in r]
    assert lr[4:] == [lr[3], lr[3]] == [pytest.approx(1e-6)] * 2  # past the old end it stays at lr_min, no rise
    # a snapshot behind last.pt: resuming it in place would discard steps 5-6
    err = expect_error(capsys, f"{copy}: holds this run at step 6", "fit", "--resume", str(copy / "checkpoints" / "step_0000004.pt"))
    assert "--overwrite" in err


def test_more_steps_mid_run_stretch_the_cosine_to_the_new_end(run, capsys, tmp_path):
    folder, _ = run
    code, _, err = run_cli(capsys, "fit", "--resume", str(folder / "checkpoints" / "step_0000002.pt"),
                           f"out_dir={tmp_path / 'longer'}", "train.steps=6", "train.val_every=0")
    assert code == 0, err
    lr = [r["lr"] for r in log_records(tmp_path / "longer") if "lr" in r]
    assert [r["step"] for r in log_records(tmp_path / "longer") if "lr" in r] == [3, 4, 5, 6]
    assert all(a > b for a, b in zip(lr, lr[1:])) and lr[-1] == pytest.approx(1e-6)


def test_auto_resume_starts_an_empty_folder_and_continues_a_run(data_root, capsys, tmp_path, monkeypatch):
    images = []
    fake = types.ModuleType("torch.utils.tensorboard")

    class SummaryWriter:
        def __init__(self, logdir):
            self.logdir = logdir

        def add_scalar(self, *args):
            pass

        def add_image(self, tag, image, step):
            images.append((tag, tuple(image.shape), step))

        def close(self):
            pass

    fake.SummaryWriter = SummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    folder = tmp_path / "auto"
    argv = ["fit", "--resume", "auto", *tiny(data_root, folder, "train.steps=2", "train.snapshot_every=0")]
    code, _, err = run_cli(capsys, *argv)
    assert code == 0 and "fresh run in" in err
    assert images == [("validation/input_output_target", (3, 19, 3 * 23), 2)]
    code, _, err = run_cli(capsys, *argv[:-1], "train.steps=3")
    assert code == 0 and "at step 2 in" in err and "changed on resume: train.steps: 2 -> 3" in err
    assert [r["step"] for r in log_records(folder) if "loss" in r] == [1, 2, 3]


def test_export_writes_the_ema_weights_and_config(run, capsys, tmp_path):
    folder, _ = run
    checkpoint = folder / "checkpoints" / "best.pt"
    out = tmp_path / "weights" / "tiny.safetensors"
    code, stdout, _ = run_cli(capsys, "export", "--checkpoint", str(checkpoint), str(out))
    assert code == 0 and str(out) in stdout
    state = load_checkpoint(checkpoint)
    with safe_open(str(out), "pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == WEIGHTS_FORMAT and metadata["step"] == str(state["step"])
    config = json.loads(metadata["config"])
    assert config["model"] == state["config"]["model"] and config["train"]["snapshot_every"] == 1
    weights = load_file(str(out))
    assert sorted(weights) == sorted(state["ema"]) and all(torch.equal(weights[k], state["ema"][k]) for k in weights)
    sde = IRSDE(**config["sde"])
    network = build_noise_network(config["model"], sde)
    network.load_state_dict(weights)  # strict: exactly the network's keys
    sampled, _, _ = load_for_sampling(checkpoint)
    x = torch.rand(1, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([5])
    assert torch.equal(network.eval()(x, x * 0.3, t), sampled(x, x * 0.3, t))


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_killed_run_resumes_to_the_uninterrupted_result(data_root, capsys, tmp_path, sig):
    overrides = lambda out: tiny(data_root, out, "train.steps=8", "train.checkpoint_every=1", "train.val_every=0",  # noqa: E731
                                 "train.snapshot_every=0", "train.threads=1")
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-m", "train", "fit", *overrides(killed)], cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log, deadline = killed / "log.jsonl", time.time() + 240
    while not (log.is_file() and log.read_text().count("\n") >= 3) and child.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    child.send_signal(sig)  # mid-run: between steps, inside a step or inside a checkpoint write
    child.wait(timeout=60)
    assert child.returncode == -sig
    step = load_checkpoint(killed / "checkpoints" / "last.pt")["step"]  # loads: never half written
    assert 1 <= step < 8
    assert run_cli(capsys, "fit", "--resume", "auto", *overrides(killed))[0] == 0
    assert run_cli(capsys, "fit", *overrides(tmp_path / "whole"))[0] == 0
    assert_same_state(load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.pt"),
                      load_checkpoint(killed / "checkpoints" / "last.pt"))
    assert [r["step"] for r in log_records(killed) if "loss" in r] == list(range(1, 9))
    assert not list((killed / "checkpoints").glob("*.tmp"))

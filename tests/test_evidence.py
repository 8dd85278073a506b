"""Fast checks of the evidence scripts: the crop search, the memory watch, the ablation's
statistics and a two-step ablation run, and the figures (tiny sizes; the real runs are in docs/results.md)."""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import random
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import ablation  # noqa: E402
import max_crop  # noqa: E402
import plots  # noqa: E402


# ---- the crop search ----

@pytest.mark.parametrize("limit", [0, 15, 16, 17, 100, 128, 129, 500, 1023, 1024, 5000])
def test_search_finds_the_largest_fitting_multiple(limit):
    calls = []

    def fits(side):
        calls.append(side)
        return side <= limit

    found = max_crop.search_max_side(fits, multiple=16, max_side=1024)
    assert found == min(limit // 16 * 16, 1024)
    assert all(side % 16 == 0 and 16 <= side <= 1024 for side in calls)
    assert len(calls) <= 2 * math.log2(1024 / 16) + 2  # doubling + bisection, not a linear scan


def fake_args(**overrides):
    values = dict(budget_gib=1.0, device="cpu", model="tiny", batch=8, bins=32, window=11, threads=1, amp=False,
                  repeats=1, predict=True, timeout=10.0, multiple=16, max_side=2048, time_at=None)
    values.update(overrides)
    return argparse.Namespace(**values)


def fake_probe(fixed, per_pixel, log):
    """A step whose memory is fixed + per_pixel * side^2 bytes, refused over the budget like the watch does."""
    def probe(case, timeout):
        log.append(case)
        peak = fixed + per_pixel * case["side"] ** 2
        if peak > case["budget"]:
            return dict(status="over budget")
        result = dict(status="ok", peak_MiB=peak / 2**20, step_s=1e-6 * case["side"] ** 2)
        if case["time"]:
            result.update(step_s=2e-6 * case["side"] ** 2, loss_s=1e-6 * case["side"] ** 2, loss_share=0.5)
        return result
    return probe


@pytest.mark.parametrize("predict", [True, False])
def test_max_crop_row_and_probes(predict):
    random.seed(1)
    fixed, per_pixel = random.uniform(50, 200) * 2**20, random.uniform(5e3, 5e4)
    budget = 2**30
    expected = int(math.sqrt((budget - fixed) / per_pixel)) // 16 * 16
    log = []
    row, probes = max_crop.max_crop("cpp", fake_args(predict=predict), probe=fake_probe(fixed, per_pixel, log))
    assert row["max_side"] == expected
    assert row["budget_GiB"] == 1.0 and row["backend"] == "cpp"
    assert row["loss_share_at_max"] == pytest.approx(0.5)
    assert abs(row["peak_MiB_at_max"] - (fixed + per_pixel * expected**2) / 2**20) < 1e-6
    timed = [c["side"] for c in log if c["time"]]
    assert timed == [expected, 128]
    ok_sides = [p["side"] for p in probes if p["status"] == "ok"]
    assert max(ok_sides) == expected
    skipped = [p for p in probes if "not run" in p["status"]]
    assert predict or not skipped
    for p in skipped:  # a side is only skipped when it truly does not fit
        assert fixed + per_pixel * p["side"] ** 2 > budget


@pytest.mark.parametrize("side", [128, 96])
def test_time_at_skips_the_search_and_times_128_once(side):
    log = []
    row, probes = max_crop.max_crop("cpp", fake_args(time_at=side), probe=fake_probe(0, 1.0, log))
    assert not probes and row["max_side"] == side and row["searched"] is False
    assert [c["side"] for c in log] == ([128] if side == 128 else [side, 128])  # timed runs only
    assert row["step_s_128"] == pytest.approx(2e-6 * 128**2) and row["loss_share_128"] == pytest.approx(0.5)
    assert row["status_128"] == "ok" and row["peak_MiB_128"] == pytest.approx(128**2 / 2**20)


def test_a_side_extrapolated_far_over_budget_is_not_run():
    log = []
    per_pixel = 2**30 / 100**2  # fits up to side 100: 16, 32, 64 fit; 128 extrapolates to 1.64 x the budget
    row, probes = max_crop.max_crop("reference", fake_args(), probe=fake_probe(0, per_pixel, log))
    assert row["max_side"] == 96
    assert [p["side"] for p in probes if "not run" in p["status"]] == [128]
    assert 128 not in [c["side"] for c in log if not c["time"]]


def test_predicted_bytes_is_linear_in_pixels():
    assert max_crop.predicted_bytes([(16, 1000.0)], 64) is None
    fitted = [(16, 100 + 3 * 16**2), (32, 100 + 3 * 32**2), (8, 100 + 3 * 64)]
    assert max_crop.predicted_bytes(fitted, 100) == pytest.approx(100 + 3 * 100**2)


def test_watch_probe_measures_a_real_step_and_kills_one_over_budget():
    case = dict(backend="l1", device="cpu", model="tiny", B=1, bins=8, window=3, threads=1, amp=False, repeats=1,
                side=16, time=True, budget=2**30)
    ok = max_crop.watch_probe(case, timeout=120)
    assert ok["status"] == "ok", ok
    assert 0 < ok["peak_MiB"] < 1024 and ok["step_s"] > 0 and 0 <= ok["loss_share"] < 1
    killed = max_crop.watch_probe(dict(case, side=256, B=8, budget=4 * 2**20), timeout=120)
    assert killed["status"] == "over budget"


# ---- the ablation ----

def fake_run(arm, seed, psnr_by_image):
    images = {name: {"input": {"psnr": 10.0, "ssim": 0.1}, "output": {"psnr": p, "ssim": p / 100}}
              for name, p in psnr_by_image.items()}
    mean_psnr = sum(psnr_by_image.values()) / len(psnr_by_image)
    return dict(arm=arm, seed=seed, images=images, mean={"psnr": mean_psnr, "ssim": mean_psnr / 100},
                input_mean={"psnr": 10.0, "ssim": 0.1}, train_seconds=1.0, eval_seconds=1.0, final_loss=0.1)


def test_summarise_means_spread_and_paired_wins():
    runs = [fake_run("l1", 0, {"a": 20, "b": 22}), fake_run("entropy", 0, {"a": 21, "b": 21}),
            fake_run("l1", 1, {"a": 18, "b": 20}), fake_run("entropy", 1, {"a": 19, "b": 23}),
            fake_run("entropy-noclamp", 1, {"a": 17, "b": 20})]
    runs[1]["mean"]["lpips"], runs[0]["mean"]["lpips"] = 0.3, 0.4  # lower is better; seed 0 only
    s = ablation.summarise(runs)
    assert s["per_arm"]["l1"]["psnr"]["mean"] == pytest.approx(20.0)
    assert s["per_arm"]["l1"]["psnr"]["std"] == pytest.approx(math.sqrt(2.0))  # seeds 21 and 19
    assert s["per_arm"]["entropy"]["psnr"]["mean"] == pytest.approx(21.0)
    diff = s["minus_l1"]["entropy"]["psnr"]
    assert diff["mean"] == pytest.approx(1.0) and diff["n"] == 2
    assert diff["std"] == pytest.approx(math.sqrt(2.0))  # per-seed differences 0 and 2
    assert (diff["better_cases"], diff["cases"]) == (3, 4)
    lpips = s["minus_l1"]["entropy"]["lpips"]
    assert lpips["mean"] == pytest.approx(-0.1) and lpips["n"] == 1
    noclamp = s["minus_l1"]["entropy-noclamp"]["psnr"]  # paired on seed 1 alone
    assert (noclamp["mean"], noclamp["n"], noclamp["better_cases"], noclamp["cases"]) == (-0.5, 1, 0, 2)
    assert "entropy - l1 psnr: +1.0000" in ablation.format_summary(s)


def test_two_step_ablation_end_to_end(tmp_path, monkeypatch):
    if importlib.util.find_spec("train.fit") is None:
        pytest.skip("the train package's fit is not on this branch")
    monkeypatch.setenv("ENTROPY_KERNELS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(ablation, "MATE_NATURE", tmp_path / "absent")
    heldout = ablation.make_heldout_set(tmp_path / "heldout", side=32, extra=0)
    assert sorted(p.name for p in (heldout / "low").iterdir()) == ["chelsea.png", "coffee.png", "grace_hopper.png"]
    profile = dict(steps=2, crop=16, batch=2, bins=8, window=3, lr=1e-3, sample_steps=2, threads=1,
                   entropy_backend="reference", sigma_data=0.3)
    (tmp_path / "out" / "runs").mkdir(parents=True)
    arms = ["l1", "entropy"]
    runs = [ablation.run_one(arm, 0, heldout, tmp_path / "out", profile) for arm in arms]
    for run in runs:
        assert set(run["images"]) == {"chelsea.png", "coffee.png", "grace_hopper.png"}
        assert math.isfinite(run["mean"]["psnr"]) and -1 <= run["mean"]["ssim"] <= 1
    checkpoint = tmp_path / "out" / "runs" / "l1_seed0" / "checkpoints" / "last.pt"
    written = checkpoint.stat().st_mtime_ns
    again = ablation.run_one("l1", 0, heldout, tmp_path / "out", profile)  # finished: evaluated, not retrained
    assert checkpoint.stat().st_mtime_ns == written and again["images"] == runs[0]["images"]
    assert ablation.finished_training(tmp_path / "out" / "runs" / "l1_seed0",
                                      ablation.fit_overrides("l1", 0, tmp_path / "out" / "runs" / "l1_seed0", profile))
    assert ablation.finished_training(tmp_path / "out" / "runs" / "l1_seed0",
                                      ablation.fit_overrides("l1", 0, tmp_path / "out" / "runs" / "l1_seed0",
                                                             dict(profile, steps=3))) is None
    config = (tmp_path / "out" / "runs" / "entropy_seed0" / "config.yaml").read_text()
    assert "entropy: 1.0" in config and "l1: 1.0" not in config
    record = dict(environment={"date": "2026-01-01"}, profile=dict(profile, steps=2), seeds=[0], arms=arms,
                  heldout_dir=str(heldout), heldout=["chelsea", "coffee", "grace_hopper"], runs=runs,
                  summary=ablation.summarise(runs))
    ablation.write_outputs(tmp_path / "out", record)
    written = plots.plot_ablation(tmp_path / "out", tmp_path / "img", grid_images=2)
    assert all(p.stat().st_size < plots.MAX_PNG_BYTES for p in written)


# ---- the figures ----

def test_max_crop_and_bench_plots_from_csv(tmp_path):
    info = {"date": "2026-01-01", "cpu": "x86_64", "threads": 1, "torch": "x", "commit": "abc"}
    args = fake_args()
    rows, probes = [], []
    for backend, per_pixel in (("reference", 5e5), ("cpp", 2e4)):
        row, backend_probes = max_crop.max_crop(backend, args, probe=fake_probe(1e8, per_pixel, []))
        rows.append(row)
        probes += backend_probes
    max_crop.write_csv(tmp_path / "max_crop.csv", info, max_crop.SUMMARY_FIELDS, rows)
    max_crop.write_csv(tmp_path / "max_crop_probes.csv", info, max_crop.PROBE_FIELDS, probes)
    assert "reference" in max_crop.format_summary(rows)
    with open(tmp_path / "bench.csv", "w") as fh:
        fh.write("# " + json.dumps(info) + "\n")
        fh.write("backend,device,B,C,H,W,bins,window,fwd_ms,bwd_ms,fwd_bwd_ms,peak_extra_MiB,status\n")
        for backend in ("reference", "cpp"):
            for side in (16, 32):
                fh.write(f"{backend},cpu,1,3,{side},{side},32,11,1.0,2.0,3.0,{side * 1.5},ok\n")
    written = plots.plot_max_crop([tmp_path], tmp_path / "img")
    written += plots.plot_bench([tmp_path / "bench.csv"], tmp_path / "img")
    assert [p.name for p in written] == ["max_crop_memory.png", "max_crop_time.png", "bench_loss.png"]
    assert all(0 < p.stat().st_size < plots.MAX_PNG_BYTES for p in written)


def test_arms_become_train_configs_that_differ_only_in_the_loss():
    from train.config import load_config

    profile = dict(steps=7, crop=16, batch=2, bins=8, window=3, lr=1e-3, sample_steps=2, threads=1,
                   entropy_backend="reference", sigma_data=0.3)
    configs = {arm: load_config(None, ablation.fit_overrides(arm, 3, Path("/tmp/x"), profile)) for arm in ablation.ARMS}
    assert configs["l1"]["loss"]["weights"] == {"l1": 1.0}
    assert configs["entropy"]["loss"]["weights"] == {"entropy": 1.0}
    assert configs["l1+entropy"]["loss"]["weights"] == {"l1": 1.0, "entropy": 1.0}
    assert configs["entropy"]["loss"]["entropy"] == {"bins": 8, "window": 3, "backend": "reference"}
    assert configs["entropy-noclamp"]["loss"]["entropy"] == {"bins": 8, "window": 3, "backend": "reference",
                                                             "clamp": False}
    plain = load_config(None, ablation.fit_overrides("l1", 3, Path("/tmp/x"), dict(profile, sigma_data=0)))
    assert plain["model"]["sigma_data"] is None  # --sigma-data 0: the paper's plain noise network
    for config in configs.values():
        assert (config["seed"], config["train"]["steps"], config["data"]["crop"]) == (3, 7, 16)
        assert config["model"]["sigma_data"] == 0.3
        others = {k: v for k, v in config.items() if k != "loss"}
        assert others == {k: v for k, v in configs["l1"].items() if k != "loss"}


def test_below_zero_fraction_grows_with_the_noise_level():
    fractions = ablation.below_zero_fraction(16, steps=(1, 100), crops=8)
    assert 0 <= fractions[1] < fractions[100] <= 1

"""`fit`: the paper's training recipe, one section each: data -> SDE -> network -> loss -> optimiser.

A step draws t and x_t ~ p(x_t | x_0, mu), predicts the noise, and compares the predicted
x_hat_{t-1} with the optimal x*_{t-1} under the configured loss. Every random draw comes from
seeded generators whose states go into the checkpoint with everything else, so `--resume`
continues exactly where the run stopped. Under torchrun every process trains on its own shard
(DistributedSampler) and rank 0 alone logs, validates and writes checkpoints.

A run folder (`out_dir`) belongs to one run: a fresh run refuses a folder that holds one unless
told to overwrite it, and a resumed run cuts its log back to the resumed step (docs/runs.md).
"""
from __future__ import annotations

import copy
import json
import os
import random
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from entropy_kernels import ClampWarning, SpatialEntropyLoss
from model import IRSDE, build_noise_network

from .checkpoint import (
    checkpoint_step, load_training_state, remove_temporaries, rng_state, save_checkpoint, save_snapshot, set_rng_state,
    snapshots,
)
from .config import ConfigError, check_resume_changes, save_config
from .data import RandomCrops, split_pairs, write_image
from .inference import comparison_grid, evaluate_pairs, run_evaluation


# ---- processes and devices ----

def setup_distributed():
    """(rank, world size, device); initialises the process group when run under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


# ---- data ----

def training_batches(dataset, batch_size, rank, world, seed, start_step, workers, pin):
    """Endless batches from step `start_step` on: epoch e is DistributedSampler's permutation for e."""
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    per_epoch = len(sampler) // batch_size
    epoch, skip = divmod(start_step, per_epoch)
    while True:
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        indices = list(sampler)
        chunks = [indices[i * batch_size : (i + 1) * batch_size] for i in range(skip, per_epoch)]
        yield from DataLoader(dataset, batch_sampler=chunks, num_workers=workers, pin_memory=pin)
        epoch, skip = epoch + 1, 0


# ---- loss ----

class TrainingLoss:
    """Weighted sum of the configured terms, each comparing x_hat_{t-1} with x*_{t-1}."""

    def __init__(self, loss_cfg: dict, generator: torch.Generator):
        self.weights = {name: float(w) for name, w in loss_cfg["weights"].items()}
        self.entropy = SpatialEntropyLoss(generator=generator, **loss_cfg["entropy"])
        # The terms compare SDE states x_{t-1}, whose noise takes dark pixels below 0: with clamp on
        # (the paper's setting) those get no entropy gradient by design, so the loss's advice to
        # widen data_range does not apply here.
        warnings.filterwarnings("ignore", category=ClampWarning)

    def __call__(self, pred: torch.Tensor, target: torch.Tensor):
        terms = {}
        if "entropy" in self.weights:
            terms["entropy"] = self.entropy(pred.float(), target.float())
        if "l1" in self.weights:
            terms["l1"] = F.l1_loss(pred.float(), target.float())
        total = sum(self.weights[name] * value for name, value in terms.items())
        return total, {name: float(value.detach()) for name, value in terms.items()}


def step_loss(network, sde, criterion, low, high, generator, use_amp=False):
    """One draw of the training objective: t ~ U{1..T}, x_t ~ p(x_t | x_0, mu), then
    loss(x_hat_{t-1}, x*_{t-1}) with x_hat from the predicted noise."""
    t = torch.randint(1, sde.T + 1, (low.shape[0],), device=low.device, generator=generator)
    x_t, _ = sde.sample_marginal(high, low, t, generator)
    with torch.autocast(low.device.type, dtype=torch.bfloat16, enabled=use_amp):
        noise_pred = network(x_t, low, t)
    predicted = sde.predicted_previous(x_t, low, noise_pred.float(), t)
    return criterion(predicted, sde.optimal_previous(x_t, high, low, t))


# ---- run folders ----

# What a run writes into its out_dir; --overwrite removes these and nothing else.
RUN_FILES = ("config.yaml", "log.jsonl", "checkpoints", "validation", "tensorboard", "eval")


def run_folder_plan(out_dir: Path, resume, step: int, overwrite: bool) -> str:
    """'new' (the folder holds no run), 'clear' (it does; overwrite), 'continue' (`resume` is the
    folder's own checkpoint and nothing in the folder is further on); ConfigError naming the folder
    and the ways out otherwise. Reads only, so every process can check before any writes."""
    present = [name for name in RUN_FILES if (out_dir / name).exists()]
    if not present:
        return "new"
    if overwrite:
        return "clear"
    last = out_dir / "checkpoints" / "last.pt"
    if resume is not None and Path(resume).resolve().parent == (out_dir / "checkpoints").resolve():
        ahead = checkpoint_step(last) if last.is_file() and last.resolve() != Path(resume).resolve() else step
        if ahead > step:
            raise ConfigError(out_dir, f"holds this run at step {ahead}, past the checkpoint's step {step}: resuming "
                              f"there would discard steps {step + 1}-{ahead}; resume {last} instead, choose another "
                              "out_dir=..., or pass --overwrite to discard them")
        return "continue"
    held = sorted((out_dir / "checkpoints").glob("*.pt"))
    return_to = f"--resume {last if last.is_file() else held[-1]} (or --resume auto)" if held else "--resume auto"
    raise ConfigError(out_dir, f"already holds a run ({', '.join(present)}); continue it with {return_to}, "
                      "choose another out_dir=..., or pass --overwrite to replace it")


def apply_run_folder_plan(out_dir: Path, plan: str, step: int) -> None:
    if plan == "clear":
        for name in RUN_FILES:
            path = out_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    elif plan == "continue":
        checkpoints = out_dir / "checkpoints"
        remove_temporaries(checkpoints)
        for snapshot_step, path in snapshots(checkpoints):
            if snapshot_step > step:  # left behind by a later resume from an older snapshot
                path.unlink()


# ---- logging ----

class RunLog:
    """JSON lines in out_dir/log.jsonl, and TensorBoard scalars and images when tensorboard is
    installed. A fresh run starts a new log; a resumed one keeps the lines up to its step (a killed
    run logged steps that no checkpoint kept) and appends."""

    def __init__(self, out_dir: Path, enabled: bool, resume_step=None):
        self.enabled = enabled
        self.path = out_dir / "log.jsonl"
        self.writer = None
        if enabled:
            out_dir.mkdir(parents=True, exist_ok=True)
            kept = [] if resume_step is None else self._lines_up_to(resume_step)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(kept))
            os.replace(tmp, self.path)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:
                note_once("tensorboard is not installed: scalars go to log.jsonl and validation grids to "
                          "validation/ only (pip install tensorboard for its charts)")

    def _lines_up_to(self, step: int) -> list:
        if not self.path.is_file():
            return []
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # the last line of a killed write
                continue
            if record.get("step", 0) <= step:
                kept.append(line + "\n")
        return kept

    def write(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **record}) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, image, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


_notes = set()


def note_once(text: str) -> None:
    if text not in _notes:
        _notes.add(text)
        print(f"note: {text}", file=sys.stderr, flush=True)


def say(text: str) -> None:
    """A line on the console that does not break the progress bar."""
    tqdm.write(text, file=sys.stderr)


def entropy_backend(entropy: SpatialEntropyLoss, device: torch.device) -> str:
    """The backend the entropy loss runs on for `device`, as the loss itself resolves it."""
    try:
        name = entropy.backend_for(device)
    except ValueError as exc:
        raise ConfigError("loss.entropy.backend", str(exc)) from None
    return name + (" (auto)" if entropy.options.backend == "auto" else "")


def start_up_summary(config, device, world, network, entropy, train_pairs, val_pairs, resume_note) -> list:
    """`entropy`: the run's SpatialEntropyLoss, whose backend the summary names."""
    train_cfg, data_cfg, model_cfg = config["train"], config["data"], config["model"]
    weights = config["loss"]["weights"]
    terms = "; ".join(f"{name} x{w:g}" + (f", backend {entropy_backend(entropy, device)}"
                                            if name == "entropy" else "") for name, w in weights.items())
    preconditioning = (f", preconditioned (sigma_data {model_cfg['sigma_data']:g})"
                       if model_cfg.get("sigma_data") is not None else "")
    validation = (f"{len(val_pairs)} test pair(s) every {train_cfg['val_every']} steps, grids in validation/"
                  if val_pairs else "off (train.val_every=0)")
    snapshots_line = (f"snapshots every {train_cfg['snapshot_every']} (keeping "
                      f"{train_cfg['keep_snapshots'] or 'all'})" if train_cfg["snapshot_every"] else "no snapshots")
    return [
        f"fit: {resume_note}",
        f"  device {device}, {torch.get_num_threads()} CPU thread(s), {world} process(es)",
        f"  model {model_cfg['preset']}: {sum(p.numel() for p in network.parameters()) / 1e6:.3f}M parameters"
        f"{preconditioning}; SDE {config['sde']['steps']} steps",
        f"  loss {terms}",
        f"  data {data_cfg['layout']}: {len(train_pairs)} training pairs, crop {data_cfg['crop']}, "
        f"batch {data_cfg['batch_size']}; validation {validation}",
        f"  {train_cfg['steps']} steps; last.pt every {train_cfg['checkpoint_every']}, {snapshots_line}",
    ]


def progress_line(step: int, total: int, loss: float, lr: float, seconds: float, steps_done: int) -> str:
    per_step = seconds / max(steps_done, 1)
    return (f"step {step}/{total}  loss {loss:.4g}  lr {lr:.3g}  {per_step:.3g} s/step  "
            f"eta {time.strftime('%H:%M:%S', time.gmtime(per_step * (total - step)))}")


# ---- the run ----

def fit(config: dict, resume=None, overwrite: bool = False) -> dict:
    """Trains per `config` into `config['out_dir']`; resume: a checkpoint path to continue from
    exactly (only the keys :data:`train.config.RESUMABLE` may differ from its config); overwrite:
    replace a run the folder holds. Returns a summary (final loss, seconds, checkpoint, evaluation
    on rank 0) with the trained `network` and its `ema` copy."""
    rank, world, device = setup_distributed()
    train_cfg, data_cfg = config["train"], config["data"]
    if train_cfg["threads"]:
        torch.set_num_threads(int(train_cfg["threads"]))
    out_dir = Path(config["out_dir"])
    seed = int(config["seed"])
    total_steps = int(train_cfg["steps"])

    state, step, changes = None, 0, []
    if resume is not None:
        state = load_training_state(resume, device)
        step = int(state["step"])
        changes = check_resume_changes(state["config"], config)
        if total_steps < step:
            raise ConfigError("train.steps", f"{total_steps} is before the checkpoint's step {step}")
    plan = run_folder_plan(out_dir, resume, step, overwrite)  # every process checks before rank 0 writes

    torch.manual_seed(seed + rank)
    np.random.seed(seed + rank)
    random.seed(seed + rank)
    generators = {"noise": torch.Generator(device).manual_seed(seed + rank), "loss": torch.Generator().manual_seed(seed)}

    # data: rank 0 makes the demo set before the others look for it; all of it is read before the
    # run folder changes, so a data error does not cost the run --overwrite would replace
    if rank == 0:
        train_pairs = split_pairs(data_cfg, "train")
    if world > 1:
        dist.barrier()
    if rank != 0:
        train_pairs = split_pairs(data_cfg, "train")
    batch_size = int(data_cfg["batch_size"])
    dataset = RandomCrops(train_pairs, int(data_cfg["crop"]), max(len(train_pairs), 8 * batch_size * world), seed)
    test_pairs = split_pairs(data_cfg, "test") if train_cfg["val_every"] or config["evaluate_at_end"] else []
    val_pairs = test_pairs[: int(data_cfg["val_images"])] if train_cfg["val_every"] else []
    if rank == 0:
        apply_run_folder_plan(out_dir, plan, step)

    # SDE and network
    sde = IRSDE(**config["sde"], device=device)
    network = build_noise_network(config["model"], sde).to(device)
    ema = copy.deepcopy(network).requires_grad_(False)
    trained = DistributedDataParallel(network, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else network

    # loss and optimiser
    criterion = TrainingLoss(config["loss"], generators["loss"])
    optimiser = torch.optim.AdamW(
        network.parameters(), lr=float(train_cfg["lr"]), betas=tuple(train_cfg["betas"]),
        weight_decay=float(train_cfg["weight_decay"]),
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=total_steps, eta_min=float(train_cfg["lr_min"]))
    use_amp = bool(train_cfg["amp"]) and device.type == "cuda"

    best = None  # {"psnr", "step"} of the best validation so far
    if state is not None:
        network.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimiser.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        # More steps than the checkpoint's: the cosine (updated recursively from the current rate)
        # then reaches lr_min at the new end instead of rising again after the old one.
        scheduler.T_max = total_steps
        set_rng_state(state["rng"][rank] if isinstance(state["rng"], list) else state["rng"], generators)
        best = state.get("best")
        del state

    def checkpoint_state():
        rngs = rng_state(generators)
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, rngs)
            rngs = gathered
        return {
            "model": network.state_dict(), "ema": ema.state_dict(), "optimizer": optimiser.state_dict(),
            "scheduler": scheduler.state_dict(), "rng": rngs, "step": step, "config": config, "best": best,
        }

    checkpoints = out_dir / "checkpoints"

    def save(name):
        state = checkpoint_state()  # every rank joins the gather; rank 0 writes
        if rank == 0:
            save_checkpoint(checkpoints / name, state)

    if rank == 0:
        note = (f"resuming {resume} at step {step} in {out_dir}" if resume is not None
                else f"fresh run in {out_dir}" + (" (replacing the run it held)" if plan == "clear" else ""))
        for line in start_up_summary(config, device, world, network, criterion.entropy, train_pairs, val_pairs, note):
            say(line)
        for key, old, new in changes:
            say(f"  changed on resume: {key}: {old!r} -> {new!r}")
    log = RunLog(out_dir, enabled=rank == 0, resume_step=step if resume is not None else None)
    if rank == 0:
        save_config(config, out_dir / "config.yaml")
    batches = training_batches(dataset, batch_size, rank, world, seed, step, int(data_cfg["workers"]), device.type == "cuda")
    decay = float(train_cfg["ema"])
    interactive = sys.stderr.isatty()  # in a file a bar is one endless line: print a line per log_every instead
    bar = tqdm(total=total_steps, initial=step, desc="fit", disable=rank != 0 or not interactive, dynamic_ncols=True)
    snapshot_every = int(train_cfg["snapshot_every"])
    started, first_step, last_loss = time.time(), step, float("nan")
    while step < total_steps:
        low, high = (x.to(device, non_blocking=True) for x in next(batches))
        loss, terms = step_loss(trained, sde, criterion, low, high, generators["noise"], use_amp)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        scheduler.step()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), network.parameters()):
                e.lerp_(p, 1 - decay)
        step += 1
        last_loss = float(loss.detach())
        bar.update(1)
        bar.set_postfix(loss=f"{last_loss:.4g}")
        if step % int(train_cfg["log_every"]) == 0 or step == total_steps:
            reduced = torch.tensor([last_loss], device=device)
            if world > 1:
                dist.all_reduce(reduced)
            log.write(step, {"loss": float(reduced) / world, **terms, "lr": scheduler.get_last_lr()[0],
                             "seconds": time.time() - started})
            if rank == 0 and not interactive:
                say(progress_line(step, total_steps, float(reduced) / world, scheduler.get_last_lr()[0],
                                  time.time() - started, step - first_step))
        if val_pairs and step % int(train_cfg["val_every"]) == 0:
            psnr = [validate(ema, sde, val_pairs, device, config, seed, step, log, out_dir) if rank == 0 else None]
            if world > 1:
                dist.broadcast_object_list(psnr)
            if best is None or psnr[0] > best["psnr"]:
                best = {"psnr": psnr[0], "step": step}
                save("best.pt")
                if rank == 0:
                    say(f"  best so far: {checkpoints / 'best.pt'}")
        snapshot = snapshot_every and step % snapshot_every == 0
        if step % int(train_cfg["checkpoint_every"]) == 0 or step == total_steps or snapshot:
            save("last.pt")
            if snapshot and rank == 0:
                save_snapshot(checkpoints / "last.pt", step, train_cfg["keep_snapshots"])
    bar.close()
    seconds = time.time() - started
    summary = {"steps": step, "final_loss": last_loss, "train_seconds": seconds,
               "checkpoint": str(checkpoints / "last.pt"), "network": network, "ema": ema}
    if rank == 0:
        log.write(step, {"train_seconds": seconds})
    if config["evaluate_at_end"] and rank == 0:
        summary["evaluation"] = run_evaluation(ema, sde, test_pairs, out_dir / "eval", device,
                                               config["sample"], seed)
    log.close()
    if world > 1:
        dist.barrier()
    return summary


def validate(ema, sde, pairs, device, config, seed, step, log, out_dir) -> float:
    """Scores the EMA network on the validation pairs: a console line, a log record and a grid image
    (validation/step_NNNNNNN.png, and TensorBoard). Returns the mean PSNR."""
    result = evaluate_pairs(ema, sde, pairs, device, config["sample"], seed)
    scores = result["mean"]
    psnr, ssim = scores["output"]["psnr"], scores["output"]["ssim"]
    log.write(step, {"val_psnr": psnr, "val_ssim": ssim})
    grid = comparison_grid(result["_images"])
    write_image(out_dir / "validation" / f"step_{step:07d}.png", grid)
    log.image("validation/input_output_target", grid, step)
    say(f"validation at step {step}: PSNR {psnr:.2f} dB (input {scores['input']['psnr']:.2f}), "
        f"SSIM {ssim:.4f} (input {scores['input']['ssim']:.4f})")
    return psnr

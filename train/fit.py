"""`fit`: the paper's training recipe, one section each: data -> SDE -> network -> loss -> optimiser.

A step draws t and x_t ~ p(x_t | x_0, mu), predicts the noise, and compares the predicted
x_hat_{t-1} with the optimal x*_{t-1} under the configured loss. Every random draw comes from
seeded generators whose states go into the checkpoint with everything else, so `--resume`
continues exactly where the run stopped. Under torchrun every process trains on its own shard
(DistributedSampler) and rank 0 alone logs, validates and writes checkpoints.
"""
from __future__ import annotations

import copy
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from entropy_kernels import SpatialEntropyLoss
from model import IRSDE, build_noise_network

from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import save_config
from .data import RandomCrops, split_pairs
from .inference import evaluate_pairs, run_evaluation


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


# ---- logging ----

class RunLog:
    """JSON lines in out_dir/log.jsonl, and TensorBoard scalars when tensorboard is installed.
    A fresh run starts a new log; a resumed one appends to it."""

    def __init__(self, out_dir: Path, enabled: bool, fresh: bool):
        self.enabled = enabled
        self.path = out_dir / "log.jsonl"
        self.writer = None
        if enabled:
            out_dir.mkdir(parents=True, exist_ok=True)
            if fresh:
                self.path.write_text("")
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:
                pass

    def write(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **record}) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# ---- the run ----

def fit(config: dict, resume=None) -> dict:
    """Trains per `config`; returns a summary (final loss, seconds, checkpoint, evaluation on rank 0)
    with the trained `network` and its `ema` copy."""
    rank, world, device = setup_distributed()
    train_cfg, data_cfg = config["train"], config["data"]
    if train_cfg["threads"]:
        torch.set_num_threads(int(train_cfg["threads"]))
    out_dir = Path(config["out_dir"])
    seed = int(config["seed"])
    torch.manual_seed(seed + rank)
    np.random.seed(seed + rank)
    random.seed(seed + rank)
    generators = {"noise": torch.Generator(device).manual_seed(seed + rank), "loss": torch.Generator().manual_seed(seed)}

    # data: rank 0 makes the demo set before the others look for it
    if rank == 0:
        train_pairs = split_pairs(data_cfg, "train")
    if world > 1:
        dist.barrier()
    if rank != 0:
        train_pairs = split_pairs(data_cfg, "train")
    batch_size = int(data_cfg["batch_size"])
    dataset = RandomCrops(train_pairs, int(data_cfg["crop"]), max(len(train_pairs), 8 * batch_size * world), seed)

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
    total_steps = int(train_cfg["steps"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=total_steps, eta_min=float(train_cfg["lr_min"]))
    use_amp = bool(train_cfg["amp"]) and device.type == "cuda"

    step = 0
    if resume is not None:
        state = load_checkpoint(resume, device)
        network.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimiser.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"][rank] if isinstance(state["rng"], list) else state["rng"], generators)
        step = int(state["step"])

    def checkpoint_state():
        rngs = rng_state(generators)
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, rngs)
            rngs = gathered
        return {
            "model": network.state_dict(), "ema": ema.state_dict(), "optimizer": optimiser.state_dict(),
            "scheduler": scheduler.state_dict(), "rng": rngs, "step": step, "config": config,
        }

    def save(name):
        state = checkpoint_state()  # every rank joins the gather; rank 0 writes
        if rank == 0:
            save_checkpoint(out_dir / "checkpoints" / name, state)

    log = RunLog(out_dir, enabled=rank == 0, fresh=resume is None)
    if rank == 0:
        save_config(config, out_dir / "config.yaml")
    val_pairs = split_pairs(data_cfg, "test")[: int(data_cfg["val_images"])] if train_cfg["val_every"] else []
    batches = training_batches(dataset, batch_size, rank, world, seed, step, int(data_cfg["workers"]), device.type == "cuda")
    decay = float(train_cfg["ema"])
    bar = tqdm(total=total_steps, initial=step, desc="fit", disable=rank != 0, dynamic_ncols=True)
    started, last_loss = time.time(), float("nan")
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
        if val_pairs and step % int(train_cfg["val_every"]) == 0 and rank == 0:
            scores = evaluate_pairs(ema, sde, val_pairs, device, config["sample"], seed)["mean"]
            log.write(step, {"val_psnr": scores["output"]["psnr"], "val_ssim": scores["output"]["ssim"]})
        if step % int(train_cfg["checkpoint_every"]) == 0 or step == total_steps:
            save("last.pt")
    bar.close()
    seconds = time.time() - started
    summary = {"steps": step, "final_loss": last_loss, "train_seconds": seconds,
               "checkpoint": str(out_dir / "checkpoints" / "last.pt"), "network": network, "ema": ema}
    if rank == 0:
        log.write(step, {"train_seconds": seconds})
    if config["evaluate_at_end"] and rank == 0:
        summary["evaluation"] = run_evaluation(ema, sde, split_pairs(data_cfg, "test"), out_dir / "eval", device,
                                               config["sample"], seed)
    log.close()
    if world > 1:
        dist.barrier()
    return summary

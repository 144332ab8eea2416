"""One training loop for every recipe (distilled student, heads, LoRA, ...).

A recipe hands over a model (what it trains has requires_grad=True), a dataset of equal-shape tensor
dicts, and `loss_fn(model, batch) -> (loss, metrics)`. The trainer owns everything else: accelerate
(same code on one CPU, one GPU or `accelerate launch` on several), gradient accumulation, warm-up + cosine
learning rate, clipping, mixed precision, checkpoints with exact resume, TensorBoard and console logging,
and a periodic evaluation hook.

Checkpoints hold only trainable weights (safetensors) plus optimizer, scheduler and RNG state written
with torch.save by this file and read back with weights_only=True. The data position needs no state of
its own: batches are a pure function of (seed, index), see BatchStream.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset, default_collate

from draftsmith.errors import ConfigError
from draftsmith.progress import Bar

Batch = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]]
EvalFn = Callable[[nn.Module], dict[str, float]]
# The run settings that fix which batch comes at which step: resuming with others cannot be exact.
RESUME_INVARIANTS = ("batch_size", "grad_accum", "seed", "world_size")


@dataclass
class TrainConfig:
    out_dir: Path = Path("runs/train")
    max_steps: int = 1000  # optimizer steps
    batch_size: int = 8  # sequences per micro-batch, per process
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at max_steps
    warmup_steps: int = 50
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    device: Literal["auto", "cpu", "cuda"] = "auto"
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # auto: bf16 (or fp16) on GPU, none on CPU
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200  # 0: evaluate only at the end
    checkpoint_every: int = 200  # 0: checkpoint only at the end
    keep_checkpoints: int = 2
    resume: bool = False
    progress: bool = True  # rich progress bar; False prints a plain line per log step
    max_minutes: float = 0.0  # wall-time budget of this run: stop (evaluate, checkpoint) at it; 0 = none

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        positive = {"max_steps": self.max_steps, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                    "log_every": self.log_every, "keep_checkpoints": self.keep_checkpoints}
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}")
        for name in ("warmup_steps", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"learning rate must be a positive number, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.max_minutes < 0:
            raise ConfigError(f"max_minutes must be 0 (no limit) or more, got {self.max_minutes}")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ConfigError("grad_clip and weight_decay must be 0 or more")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda (accelerate picks the GPU index), got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device 'cuda' was asked for but CUDA is not available on this machine")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ConfigError(f"mixed_precision must be auto, no, bf16 or fp16, got {self.mixed_precision!r}")


@dataclass
class TrainResult:
    step: int
    metrics: dict[str, float] = field(default_factory=dict)  # last logged training metrics
    eval: dict[str, float] = field(default_factory=dict)  # last evaluation


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up from ~0 to 1, then cosine decay to min_ratio at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class BatchStream:
    """Endless, reproducible batches. Epoch e visits the data in the order randperm(seed + e); each
    process reads its own slice of that order. Batch k is a pure function of k, so the number of batches
    already consumed is the whole data-position state a resume needs."""

    def __init__(self, data: Dataset, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.data, self.batch_size, self.seed, self.rank, self.world = data, batch_size, seed, rank, world
        self.per_rank = len(data) // world  # equal on every process, so no process waits on a missing batch
        self.batches_per_epoch = self.per_rank // batch_size
        if self.batches_per_epoch == 0:
            raise ConfigError(
                f"the training data has {len(data)} examples, fewer than one batch of {batch_size} "
                f"on each of {world} processes: use more data or a smaller batch size"
            )
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def batch(self, index: int) -> Batch:
        epoch, i = divmod(index, self.batches_per_epoch)
        if epoch != self._epoch:
            order = torch.randperm(len(self.data), generator=torch.Generator().manual_seed(self.seed + epoch))
            self._epoch, self._order = epoch, order[self.rank :: self.world][: self.per_rank]
        rows = self._order[i * self.batch_size : (i + 1) * self.batch_size]
        return default_collate([self.data[int(r)] for r in rows])


def _rng_state() -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        # numpy's state holds an ndarray, which weights_only loading refuses: store it as a tensor
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def _interrupt_at_step_end():
    """While training, the first Ctrl-C asks the loop to checkpoint the step it is in and stop (the event is
    set); a second one interrupts at once. Only the main thread can take signals: elsewhere, nothing changes."""
    interrupt = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield interrupt
        return

    def handler(signum, frame):
        interrupt.set()
        signal.signal(signal.SIGINT, previous)
        print("\ninterrupt: saving a checkpoint at the end of this step (Ctrl-C again stops at once)",
              flush=True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield interrupt
    finally:
        signal.signal(signal.SIGINT, previous)


def _one_line(error: Exception) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first (an interrupted save leaves only a .tmp folder)."""
    found = [p for p in folder.glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def task_settings(task: object | None) -> dict:
    """A recipe's dataclass config as a checkpoint records it (JSON values); `extra` (the command line and other
    notes for the artifact) is not a setting of the run."""
    if task is None:
        return {}
    return json.loads(json.dumps({k: v for k, v in asdict(task).items() if k != "extra"}, default=str))


class Trainer:
    """Create it first (it seeds the RNGs and picks the device), build the model, then call fit()."""

    def __init__(self, config: TrainConfig, task: object | None = None):
        """`task`: the recipe's own dataclass config (what is trained, on what data); a checkpoint records it and a
        resume with other task settings is refused, as one with another batch size is."""
        self.config, self.task = config, task_settings(task)
        on_gpu = config.device != "cpu" and torch.cuda.is_available()
        precision = config.mixed_precision
        if precision == "auto":
            precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if on_gpu else "no"
        self.accelerator = Accelerator(cpu=not on_gpu, mixed_precision=precision)
        set_seed(config.seed)
        self.checkpoint_dir = config.out_dir / "checkpoints"
        self.console = Console()
        found = list_checkpoints(self.checkpoint_dir) if config.resume else []
        if found and int(found[-1].name[5:]) >= config.max_steps:  # checked before a recipe writes anything
            raise ConfigError(f"the run in {config.out_dir} already finished: its latest checkpoint, "
                              f"{found[-1].name}, reached max_steps {config.max_steps}; nothing to resume "
                              "(pass more steps to train it further, or choose another output folder)")

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    def fit(self, model: nn.Module, data: Dataset, loss_fn: LossFn, evaluate: EvalFn | None = None) -> TrainResult:
        cfg, acc = self.config, self.accelerator
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("the model has no trainable parameters (nothing has requires_grad=True)")
        # nanoGPT's rule: decay matrices (weights, embeddings), not biases and norm gains
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
        # stepped by hand, once per optimizer step (accelerate's wrapper would step it once per process)
        schedule = partial(lr_factor, warmup=cfg.warmup_steps, total=cfg.max_steps, min_ratio=cfg.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        model, optimizer = acc.prepare(model, optimizer)
        raw = acc.unwrap_model(model)

        step = self._start(raw, optimizer, scheduler)
        with _interrupt_at_step_end() as interrupt:
            result = self._loop(model, raw, optimizer, scheduler, params, data, loss_fn, evaluate, step, interrupt)
        if interrupt.is_set() and result.step < self.config.max_steps:
            raise KeyboardInterrupt  # after the checkpoint of the step it was in
        return result

    def _loop(self, model, raw, optimizer, scheduler, params, data, loss_fn, evaluate, step: int,
              interrupt: threading.Event) -> TrainResult:
        cfg, acc = self.config, self.accelerator
        stream = BatchStream(data, cfg.batch_size, cfg.seed, acc.process_index, acc.num_processes)
        result = TrainResult(step)
        writer, progress, task = self._open_logs(step)
        sums: dict[str, torch.Tensor] = {}
        count, t0 = 0, time.perf_counter()
        deadline = t0 + 60 * cfg.max_minutes if cfg.max_minutes else math.inf
        last = step >= cfg.max_steps
        model.train()
        while not last:
            for micro in range(cfg.grad_accum):
                batch = {k: v.to(acc.device) for k, v in stream.batch(step * cfg.grad_accum + micro).items()}
                # gradients are all-reduced across processes only on the step's last micro-batch
                sync = nullcontext() if micro == cfg.grad_accum - 1 else acc.no_sync(model)
                with sync:
                    with acc.autocast():
                        loss, metrics = loss_fn(model, batch)
                    acc.backward(loss / cfg.grad_accum)
                for name, value in {"loss": loss, **metrics}.items():
                    sums[name] = sums.get(name, 0.0) + value.detach().float()
                count += 1
            grad_norm = acc.clip_grad_norm_(params, cfg.grad_clip or math.inf)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            stopped = self._stop_requested(deadline, interrupt.is_set())
            last = step >= cfg.max_steps or stopped

            if step % cfg.log_every == 0 or last:
                names = list(sums)
                means = acc.reduce(torch.stack([sums[n] for n in names]) / count, reduction="mean")
                result.metrics = {n: float(v) for n, v in zip(names, means)}
                if "ce" in result.metrics:  # perplexity of the mean CE, not the mean of per-batch perplexities
                    result.metrics["ppl"] = math.exp(min(result.metrics["ce"], 50.0))
                result.metrics["lr"] = scheduler.get_last_lr()[0]
                result.metrics["grad_norm"] = float(grad_norm)
                result.metrics["sec_per_step"] = (time.perf_counter() - t0) * cfg.grad_accum / count
                self._log(writer, progress, "train", result.metrics, step)
                sums, count, t0 = {}, 0, time.perf_counter()
            interrupted = stopped and interrupt.is_set()  # no final evaluation: checkpoint and leave
            if evaluate is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or last) \
                    and not interrupted:
                if acc.is_main_process:
                    raw.eval()
                    with torch.no_grad(), acc.autocast():
                        result.eval = evaluate(raw)
                    raw.train()
                    self._log(writer, progress, "eval", result.eval, step)
                acc.wait_for_everyone()
            if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or last:
                self.save_checkpoint(raw, optimizer, scheduler, step)
            if progress is not None:
                progress.update(task, completed=step)

        result.step = step
        if progress is not None:
            progress.stop()
        if writer is not None:
            writer.close()
        return result

    def _stop_requested(self, deadline: float, interrupted: bool) -> bool:
        """Past the wall-time budget or interrupted, on any process (so that every process stops at the same
        step)."""
        local = interrupted or time.perf_counter() >= deadline
        if self.accelerator.num_processes == 1:
            return local
        flag = torch.tensor(float(local), device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum") > 0)

    # ---- checkpoints -------------------------------------------------------------------------------

    def save_checkpoint(self, raw: nn.Module, optimizer, scheduler, step: int) -> Path:
        acc, final = self.accelerator, self.checkpoint_dir / f"step-{step:07d}"
        tmp = final.with_name(final.name + ".tmp")
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        torch.save(_rng_state(), tmp / f"rng-{acc.process_index}.pt")  # each process has its own RNG streams
        if acc.is_main_process:
            trainable = {n: p.detach().contiguous() for n, p in raw.named_parameters() if p.requires_grad}
            save_file(trainable, tmp / "trainable.safetensors")
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            state = {"step": step, "world_size": acc.num_processes, "config": asdict(self.config), "task": self.task}
            (tmp / "state.json").write_text(json.dumps(state, indent=2, default=str))
        acc.wait_for_everyone()
        if acc.is_main_process:  # rename last: a folder named step-N is always complete
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in list_checkpoints(self.checkpoint_dir)[: -self.config.keep_checkpoints]:
                shutil.rmtree(old)
        acc.wait_for_everyone()
        return final

    def _start(self, raw: nn.Module, optimizer, scheduler) -> int:
        """Step to start from: 0 for a fresh run, the latest checkpoint's step when resuming."""
        found = list_checkpoints(self.checkpoint_dir)
        if not self.config.resume:
            if found:
                raise ConfigError(
                    f"{self.config.out_dir} already holds checkpoints of a run (latest {found[-1].name}): "
                    "pass --resume to continue it, or choose another output folder"
                )
            return 0
        if not found:
            raise ConfigError(f"nothing to resume: no checkpoint in {self.checkpoint_dir}")
        ckpt, saved = self._latest_intact(found)
        acc = self.accelerator
        state = saved["state"]
        now = {**asdict(self.config), "world_size": acc.num_processes}
        before = {**state["config"], "world_size": state["world_size"]}
        changed = [f"{k} {before[k]} -> {now[k]}" for k in RESUME_INVARIANTS if before[k] != now[k]]
        recorded = state.get("task")  # absent from checkpoints written before tasks were recorded
        if recorded is not None:
            keys = sorted(recorded.keys() | self.task.keys())
            changed += [f"{k} {recorded.get(k)} -> {self.task.get(k)}" for k in keys if recorded.get(k) != self.task.get(k)]
        if changed:
            raise ConfigError(f"cannot resume {ckpt} exactly with different settings: {', '.join(changed)}")

        weights = saved["weights"]
        missing = {n for n, p in raw.named_parameters() if p.requires_grad} - weights.keys()
        unexpected = weights.keys() - dict(raw.named_parameters()).keys()
        if missing or unexpected:
            raise ConfigError(f"checkpoint {ckpt} does not fit this model: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]}")
        raw.load_state_dict(weights, strict=False)
        try:
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            _set_rng_state(saved["rng"])
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise ConfigError(f"checkpoint {ckpt} does not fit this run: {e}") from e
        if acc.is_main_process:
            self.console.print(f"resumed from {ckpt} at step {state['step']}")
        return int(state["step"])

    def _latest_intact(self, found: list[Path]) -> tuple[Path, dict]:
        """The newest checkpoint whose every file reads back; each newer one that does not is named."""
        broken = []
        for ckpt in reversed(found):
            try:
                saved = self._read_checkpoint(ckpt)
            except Exception as e:  # noqa: BLE001: any damage (truncation, garbage, a missing file) skips it
                broken.append(f"{ckpt.name} ({_one_line(e)})")
                continue
            if broken and self.accelerator.is_main_process:
                self.console.print(f"[yellow]checkpoint {'; '.join(broken)} is damaged: resuming from the "
                                   f"previous intact one, {ckpt.name}[/]", highlight=False, soft_wrap=True)
            return ckpt, saved
        raise ConfigError(f"no intact checkpoint to resume in {self.checkpoint_dir}: {'; '.join(broken)}")

    def _read_checkpoint(self, ckpt: Path) -> dict:
        """Every part of a checkpoint, read (tensors by safetensors, the rest with weights_only=True) before
        any of it is applied, so that a damaged one changes nothing."""
        state = json.loads((ckpt / "state.json").read_text())
        if not isinstance(state, dict) or not {"step", "config", "world_size"} <= state.keys():
            raise ValueError("state.json lacks step, config or world_size")
        rng = torch.load(ckpt / f"rng-{self.accelerator.process_index}.pt", weights_only=True)
        if not isinstance(rng, dict) or not {"python", "numpy", "torch"} <= rng.keys():
            raise ValueError(f"rng-{self.accelerator.process_index}.pt holds no RNG state")
        return {"state": state, "rng": rng,
                "weights": load_file(ckpt / "trainable.safetensors", device=str(self.accelerator.device)),
                "optimizer": torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True),
                "scheduler": torch.load(ckpt / "scheduler.pt", weights_only=True)}

    # ---- logging -----------------------------------------------------------------------------------

    def _open_logs(self, step: int):
        if not self.accelerator.is_main_process:
            return None, None, None
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only where it is used

        # purge_step drops events an interrupted run wrote after the checkpoint we resume from
        writer = SummaryWriter(str(self.config.out_dir / "tb"), purge_step=step or None)
        if not self.config.progress:
            return writer, None, None
        progress = Bar(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      TextColumn("{task.fields[info]}"), console=self.console)
        task = progress.add_task("train", total=self.config.max_steps, completed=step, info="")
        progress.start()
        return writer, progress, task

    def _log(self, writer, progress, prefix: str, metrics: dict[str, float], step: int) -> None:
        if writer is None:
            return
        for name, value in metrics.items():
            writer.add_scalar(f"{prefix}/{name}", value, step)
        shown = {k: v for k, v in metrics.items() if k not in ("lr", "grad_norm", "sec_per_step")}
        line = f"{prefix} " + " ".join(f"{k} {v:.4g}" for k, v in shown.items())
        if progress is not None and prefix == "train":
            progress.update(progress.task_ids[0], info=line)
        else:
            (progress.console if progress is not None else self.console).print(f"step {step}: {line}")

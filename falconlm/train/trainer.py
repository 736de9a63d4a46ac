"""The training loop: deterministic data, AdamW with warmup + cosine, checkpoints, resume, DDP or FSDP.

A run is a pure function of its arguments: the data of step ``s`` comes from a generator seeded by
``(seed, s, micro-batch)`` and dropout is reseeded from ``(seed, s, rank)`` at every step, so resuming at step
``s`` from a checkpoint continues exactly as the uninterrupted run would. Under ``torchrun`` rank ``r``
takes the global micro-batches ``r, r + W, ...``: 2 ranks with accumulation K see the same data as one
process with 2K. With ``fsdp`` the ranks see the same data, but hold only their shard of the weights, gradients
and optimizer state (``fsdp.py``); checkpoints are gathered into the same full files either way.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ..tokenizer import Tokenizer
from . import distributed, fsdp
from .args import TrainArgs, TrainResult
from .data import EVAL_STREAM, TRAIN_STREAM, TokenWindows, cached_token_file, split_tail
from .distributed import DistInfo
from .metrics import MetricsLog, plot_losses
from .model_setup import build_model
from .optim import CosineSchedule, make_optimizer, set_lr
from .state import STATE_FILE, load_state, rng_state, save_checkpoint, set_rng_state

StepCallback = Callable[[int, float], None]
STATE_VERSION = 1


def train(args: TrainArgs, on_step: StepCallback | None = None) -> TrainResult:
    """Run (or resume) training as ``args`` says; ``on_step(step, loss)`` is called after every step.

    Raising KeyboardInterrupt from ``on_step`` (or one Ctrl-C / SIGTERM) stops after the step with a
    checkpoint; the result then has ``interrupted=True``.
    """
    args.validate()
    info = distributed.setup(args.device)
    try:
        return _Run(args, info, on_step).run()
    finally:
        distributed.teardown(info)


class _Run:
    """One training run in one process."""

    def __init__(self, args: TrainArgs, info: DistInfo, on_step: StepCallback | None) -> None:
        self.info = info
        self.on_step = on_step
        self.out = Path(args.out)
        self.fsdp = args.fsdp
        if self.fsdp and not info.distributed:
            raise ValueError("--fsdp shards over several processes: launch with torchrun --nproc-per-node N (N >= 2)")
        state = self._read_state(args)
        if info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        if state is not None:
            args = args.merged_with_saved(state["args"])
            args = replace(args, grad_accum=self._resumed_accum(args, state))
            args.validate()
        self.args = args
        self.state = state
        if args.threads:
            torch.set_num_threads(args.threads)
        if not args.data:
            raise ValueError("no --data files given")
        self.tokenizer_dir = (
            self.out if state is not None and (self.out / "tokenizer.json").is_file() else args.tokenizer
        )
        if self.tokenizer_dir is None:
            raise ValueError("--tokenizer is required")
        self.tokenizer = Tokenizer.from_pretrained(self.tokenizer_dir)
        if self.tokenizer.eos_token_id is None:
            raise ValueError(f"the tokenizer in {self.tokenizer_dir} has no eos token")
        self.train_windows, self.val_windows = self._load_data()
        self.model = build_model(args, self.tokenizer, self.out if state is not None else None, info.device)
        self.num_parameters = self.model.num_parameters()
        self.model_class = type(self.model)  # sharding swaps in a subclass
        if self.fsdp:
            fsdp.shard_model(self.model, info.device, info.world_size)
        self.optimizer = make_optimizer(self.model, args.lr, args.weight_decay)
        self.schedule = CosineSchedule(args.lr, args.resolved_min_lr, args.resolved_warmup, args.steps)
        self.start_step, self.tokens = 0, 0
        if state is not None:
            layout = state.get("optimizer_layout", fsdp.BY_INDEX)
            if layout == fsdp.BY_INDEX and not self.fsdp:
                self.optimizer.load_state_dict(state["optimizer"])
            else:
                fsdp.load_optimizer_state(self.model, self.optimizer, state["optimizer"], layout)
            set_rng_state(state["rng"])
            self.start_step, self.tokens = int(state["step"]), int(state["tokens"])
        self.ddp = None
        self.forward: Any = self.model
        if info.distributed and not self.fsdp:
            ids = [info.device.index] if info.device.type == "cuda" else None
            self.ddp = self.forward = DistributedDataParallel(self.model, device_ids=ids)
        if args.compile:
            self.forward = torch.compile(self.forward)
        self.tokens_per_step = args.batch_size * args.seq_len * args.grad_accum * info.world_size

    # ---- setup ----------------------------------------------------------------------------------
    def _read_state(self, args: TrainArgs) -> dict[str, Any] | None:
        if args.resume:
            state = load_state(self.out)
            if state.get("version") != STATE_VERSION:
                raise ValueError(f"{self.out / STATE_FILE} has an unknown version {state.get('version')!r}")
            return state
        if (self.out / STATE_FILE).is_file():
            raise ValueError(
                f"{self.out} already holds a training run; pass --resume to continue it or choose another --out"
            )
        return None

    def _resumed_accum(self, args: TrainArgs, state: dict[str, Any]) -> int:
        """Keep the micro-batches per step: a different world size changes the accumulation to match."""
        total, world = int(state["micro_batches"]), self.info.world_size
        if args.grad_accum * world == total:
            return args.grad_accum
        if args.grad_accum == TrainArgs.grad_accum and total % world == 0:
            return total // world
        raise ValueError(
            f"the checkpoint took {total} micro-batches per step; --grad-accum {args.grad_accum} "
            f"x {world} processes does not match"
        )

    def _load_data(self) -> tuple[TokenWindows, TokenWindows | None]:
        args, cache = self.args, self.out / "data-cache"
        show = self._show_progress()

        def tokens(paths: list[Path]) -> list[np.ndarray]:
            return [cached_token_file(p, self.tokenizer, cache, args.doc_split, show) for p in paths]

        if self.info.is_main:  # tokenize once, then the other ranks read the cache
            tokens([*args.data, *args.val_data])
        distributed.barrier(self.info)
        train = tokens(args.data)
        val: list[np.ndarray] = []
        if args.val_data:
            val = tokens(args.val_data)
        elif args.val_fraction > 0:
            train, val = split_tail(train, args.val_fraction)
        length = args.seq_len + 1
        train_windows = TokenWindows(train, length)
        if not train_windows:
            raise ValueError(
                f"no training data file holds {length} tokens (--seq-len + 1); give more text or a smaller --seq-len"
            )
        val_windows = TokenWindows(val, length) if val else None
        if val and not val_windows:
            self._say(f"note: the validation data is shorter than {length} tokens; no validation")
            val_windows = None
        return train_windows, val_windows

    # ---- the loop -------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        args, info = self.args, self.info
        end = min(args.steps, args.stop_after) if args.stop_after else args.steps
        resumed = self.state is not None
        metrics = MetricsLog(self.out / "metrics.jsonl", self.start_step if resumed else None) if info.is_main else None
        self._say(self._summary())
        losses: list[float] = []
        val_loss = None
        step, saved_at = self.start_step, self.start_step if resumed else -1
        meter, interrupted = _Throughput(), False
        bar = tqdm(
            total=args.steps,
            initial=step,
            desc="training",
            unit="step",
            file=sys.stderr,
            disable=not self._show_progress(),
            dynamic_ncols=True,
        )
        with _StopRequest(self._say) as stop:
            while step < end:
                t0 = time.perf_counter()
                loss, lr, grad_norm = self._train_step(step)
                meter.add(self.tokens_per_step, time.perf_counter() - t0)
                step += 1
                self.tokens += self.tokens_per_step
                losses.append(loss)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{meter.last_rate:,.0f}")
                if not math.isfinite(loss):
                    raise ValueError(f"the training loss became {loss} at step {step}; try a lower --lr")
                record: dict[str, Any] = {"step": step, "loss": loss, "lr": lr, "tokens": self.tokens}
                if self.val_windows is not None and (step == end or (args.eval_every and step % args.eval_every == 0)):
                    val_loss = self._evaluate()
                    record.update(val_loss=val_loss, val_ppl=_ppl(val_loss))
                    self._say(
                        f"step {step}: train loss {loss:.4f}, val loss {val_loss:.4f}, val ppl {_ppl(val_loss):.2f}",
                        bar,
                    )
                if metrics is not None and ("val_loss" in record or step == end or step % args.log_every == 0):
                    metrics.write({**record, "tokens_per_s": meter.interval_rate(), "grad_norm": grad_norm})
                if args.save_every and step % args.save_every == 0 and step != end:
                    self._save(step)
                    saved_at = step
                if self.on_step is not None:
                    try:
                        self.on_step(step, loss)
                    except KeyboardInterrupt:
                        stop.requested = True
                if distributed.any_rank(stop.requested, info):
                    interrupted = True
                    break
        bar.close()
        if step != saved_at:
            self._save(step)
        if interrupted:
            self._say(f"interrupted: checkpoint of step {step} saved in {self.out} (continue with --resume)")
        elif info.is_main and step > self.start_step:
            plot_losses(self.out / "metrics.jsonl", self.out / "loss.png")
        tail = losses[-10:]
        return TrainResult(
            out=self.out,
            step=step,
            losses=losses,
            final_loss=sum(tail) / len(tail) if tail else None,
            val_loss=val_loss,
            val_ppl=None if val_loss is None else _ppl(val_loss),
            tokens=self.tokens,
            tokens_per_s=meter.total_rate(),
            elapsed_s=meter.total_time,
            interrupted=interrupted,
            model=self.model,
        )

    def _train_step(self, step: int) -> tuple[float, float, float]:
        """One optimizer step over grad_accum micro-batches; (mean loss over all ranks, lr, grad norm)."""
        args, info = self.args, self.info
        lr = self.schedule(step)
        set_lr(self.optimizer, lr)
        torch.manual_seed(_derived_seed(args.seed, step, info.rank))  # dropout
        loss_sum = torch.zeros((), dtype=torch.float64, device=info.device)
        for micro in range(args.grad_accum):
            index = (step, micro * info.world_size + info.rank)
            x, y = self.train_windows.batch(args.seed, TRAIN_STREAM, index, args.batch_size)
            x, y = x.to(info.device, non_blocking=True), y.to(info.device, non_blocking=True)
            last = micro == args.grad_accum - 1
            if self.fsdp:
                fsdp.set_gradient_sync(self.model, last)
            with nullcontext() if self.ddp is None or last else self.ddp.no_sync():
                with self._autocast():
                    logits = self.forward(x)
                loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
                (loss / args.grad_accum).backward()
            loss_sum += loss.detach().double()
        max_norm = args.grad_clip if args.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        mean_loss = distributed.all_sum([loss_sum.item() / args.grad_accum], info)[0] / info.world_size
        return mean_loss, lr, fsdp.local_float(grad_norm)

    @torch.no_grad()
    def _evaluate(self) -> float:
        """Mean loss over the fixed validation batches, shared out over the ranks.

        Under FSDP every forward is a collective, so all ranks run as many; a rank past the last batch runs
        batch 0 again and ignores it.
        """
        args, info = self.args, self.info
        assert self.val_windows is not None
        self.model.eval()
        total, count = 0.0, 0
        batches = -(-args.eval_batches // info.world_size) * info.world_size if self.fsdp else args.eval_batches
        for i in range(info.rank, batches, info.world_size):
            counted = i < args.eval_batches
            x, y = self.val_windows.batch(args.seed, EVAL_STREAM, (i if counted else 0,), args.batch_size)
            x, y = x.to(info.device), y.to(info.device)
            with self._autocast():
                logits = self.model(x)
            if counted:
                total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
                count += y.numel()
        self.model.train()
        total, count = distributed.all_sum([total, float(count)], info)
        return total / count

    def _save(self, step: int) -> None:
        model: Any = self.model
        optimizer, layout = None, fsdp.BY_INDEX
        if self.fsdp:  # every rank takes part in gathering the full weights and optimizer state to rank 0
            weights = fsdp.full_weights(self.model)
            optimizer, layout = fsdp.full_optimizer_state(self.model, self.optimizer), fsdp.BY_NAME
            if self.info.is_main:
                model = fsdp.plain_model(self.model_class, self.model.config, weights)
        if not self.info.is_main:
            return
        state = {
            "version": STATE_VERSION,
            "step": step,
            "tokens": self.tokens,
            "micro_batches": self.args.grad_accum * self.info.world_size,
            "schedule": {
                "lr": self.schedule.lr,
                "min_lr": self.schedule.min_lr,
                "warmup": self.schedule.warmup,
                "total": self.schedule.total,
                "next_lr": self.schedule(step),
            },
            "optimizer": self.optimizer.state_dict() if optimizer is None else optimizer,
            "optimizer_layout": layout,
            "rng": rng_state(),
            "args": self.args.to_state(),
        }
        save_checkpoint(self.out, model, Path(self.tokenizer_dir), state)

    # ---- helpers --------------------------------------------------------------------------------
    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.info.device.type, dtype=torch.bfloat16, enabled=self.args.bf16)

    def _show_progress(self) -> bool:
        if not self.info.is_main:
            return False
        return sys.stderr.isatty() if self.args.progress is None else self.args.progress

    def _say(self, text: str, bar: tqdm | None = None) -> None:
        if self.info.is_main:
            (bar.write if bar is not None else tqdm.write)(text, file=sys.stderr)

    def _summary(self) -> str:
        args, c = self.args, self.model.config
        val = f"{self.val_windows.tokens:,}" if self.val_windows is not None else "none"
        mode = " (FSDP)" if self.fsdp else ""
        start = f", resuming at step {self.start_step}" if self.state else ""
        return (
            f"training {self.num_parameters:,} parameters ({c.num_hidden_layers} layers x "
            f"{c.hidden_size}, vocab {c.vocab_size}) on {self.info.device} x{self.info.world_size}{mode}: "
            f"{args.steps} steps of {self.tokens_per_step:,} tokens; data {self.train_windows.tokens:,} "
            f"tokens, validation {val}{start}"
        )


class _Throughput:
    """Tokens per second of the training steps alone (evaluation and saving excluded)."""

    def __init__(self) -> None:
        self.total_tokens, self.total_time = 0, 0.0
        self._tokens, self._time, self.last_rate = 0, 0.0, 0.0

    def add(self, tokens: int, seconds: float) -> None:
        self.total_tokens += tokens
        self.total_time += seconds
        self._tokens += tokens
        self._time += seconds
        self.last_rate = tokens / max(seconds, 1e-9)

    def interval_rate(self) -> float:
        """The rate since the previous call."""
        rate = self._tokens / max(self._time, 1e-9)
        self._tokens, self._time = 0, 0.0
        return rate

    def total_rate(self) -> float:
        return self.total_tokens / max(self.total_time, 1e-9)


class _StopRequest:
    """SIGINT / SIGTERM set ``requested`` (the loop stops after the step); a second Ctrl-C quits at once."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.requested = False
        self._say = say
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self._say("stopping after this step to save a checkpoint (Ctrl-C again quits without saving)")


def _derived_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, 2, step, rank]).generate_state(1)[0])


def _ppl(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf

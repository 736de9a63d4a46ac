"""Training arguments and results, and how a resumed run reconciles its arguments with the saved ones."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..model.config import FalconConfig
from ..model.falcon import FalconForCausalLM

# Arguments of one invocation only, never taken from a saved run.
SESSION_FIELDS = ("out", "resume", "stop_after", "progress", "grad_accum", "fsdp")
# Arguments that define the run: a resumed run keeps the saved values (changing one would not be a resume).
RUN_FIELDS = (
    "config",
    "data",
    "val_data",
    "val_fraction",
    "tokenizer",
    "steps",
    "batch_size",
    "seq_len",
    "lr",
    "min_lr",
    "warmup",
    "weight_decay",
    "grad_clip",
    "dropout",
    "bf16",
    "seed",
    "init_from",
    "doc_split",
)


@dataclass
class TrainArgs:
    """Everything ``falconlm train`` takes; see ``falconlm train --help`` for each option."""

    out: Path
    data: list[Path] = field(default_factory=list)
    tokenizer: Path | None = None
    config: str | Path | FalconConfig | None = None  # a preset name, a config.json (or its folder), a config
    val_data: list[Path] = field(default_factory=list)
    val_fraction: float = 0.01
    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float | None = None  # None means lr / 10
    warmup: int | None = None  # None means min(100, steps // 10)
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    dropout: float | None = None  # None keeps the config's dropout
    bf16: bool = False
    compile: bool = False
    seed: int = 0
    eval_every: int = 100  # 0: only at the end
    eval_batches: int = 20
    save_every: int = 500  # 0: only at the end
    log_every: int = 10
    stop_after: int | None = None  # stop (with a checkpoint) after this step, for runs in slices
    resume: bool = False
    init_from: Path | None = None
    threads: int | None = None
    device: str | None = None
    fsdp: bool = False  # shard weights, gradients and optimizer state over the torchrun ranks (FSDP2)
    doc_split: str = "eot"
    progress: bool | None = None  # None: a progress bar when stderr is a terminal

    @property
    def resolved_min_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr

    @property
    def resolved_warmup(self) -> int:
        return min(100, self.steps // 10) if self.warmup is None else self.warmup

    def validate(self) -> None:
        positive = {
            "steps": self.steps,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "grad_accum": self.grad_accum,
            "eval_batches": self.eval_batches,
            "log_every": self.log_every,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if not 0 <= self.resolved_min_lr <= self.lr:
            raise ValueError(f"--min-lr must be between 0 and --lr ({self.lr}), got {self.min_lr}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
        for name in ("warmup", "eval_every", "save_every", "weight_decay", "grad_clip", "seed"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"--{name.replace('_', '-')} must not be negative, got {value}")
        if self.stop_after is not None and self.stop_after <= 0:
            raise ValueError(f"--stop-after must be positive, got {self.stop_after}")

    def to_state(self) -> dict[str, Any]:
        """Plain values (strings for paths) for the training state file."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    def merged_with_saved(self, saved: dict[str, Any]) -> TrainArgs:
        """For --resume: every argument left at its default takes the saved value.

        Run-defining arguments (RUN_FIELDS) cannot change: an explicitly different one is an error. Others
        (eval/save/log intervals, threads, device, compile) may; ``grad_accum`` is settled by the trainer.
        """
        defaults = TrainArgs(out=self.out)
        merged = TrainArgs(**{f.name: getattr(self, f.name) for f in fields(self)})
        for name in (f.name for f in fields(self)):
            if name in SESSION_FIELDS or name not in saved:
                continue
            mine = _plain(getattr(self, name))
            if mine == _plain(getattr(defaults, name)):
                setattr(merged, name, _from_plain(name, saved[name]))
            elif name in RUN_FIELDS and mine != saved[name]:
                raise ValueError(
                    f"--{name.replace('_', '-')} {mine} differs from the checkpoint's {saved[name]}; "
                    "a resumed run keeps its settings (start a new --out to change them)"
                )
        return merged


@dataclass
class TrainResult:
    """What a call to :func:`~falconlm.train.trainer.train` did."""

    out: Path
    step: int  # the last completed step
    losses: list[float]  # training loss of each step this call ran
    final_loss: float | None  # mean of the last (up to) 10 of them
    val_loss: float | None
    val_ppl: float | None
    tokens: int  # tokens trained on, all steps so far
    tokens_per_s: float
    elapsed_s: float
    interrupted: bool = False
    # the trained model in train mode (sharded under FSDP)
    model: FalconForCausalLM | None = field(default=None, repr=False)


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value.resolve())
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, FalconConfig):
        return value.to_dict()
    return value


def _from_plain(name: str, value: Any) -> Any:
    if name in ("data", "val_data"):
        return [Path(v) for v in value]
    if name in ("tokenizer", "init_from") and value is not None:
        return Path(value)
    if name == "config" and isinstance(value, dict):
        return FalconConfig.from_dict(value)
    return value

"""What every training stage shares, without Ray or DeepSpeed: the learning-rate schedule,
the DeepSpeed config built from the typed settings, and the `TrainState` a checkpoint
carries (step, epoch, and the exact position in the epoch's data).

The data position is the set of sample ids the epoch has trained, kept as a bitmap over
the run's sample-id space (ids are 0..num_samples-1): 1.25 MB for ten million samples at
worst, a few hundred bytes when, as in practice, the trained ids are mostly a prefix of
the stream. A resumed epoch trains exactly the samples it had not, however Ray Data
splits the stream among workers this time.
"""

from __future__ import annotations

import base64
import json
import math
import re
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import OptimizerSettings, TrainerSettings

TRAIN_STATE = "train_state.json"


# ----------------------------------------------------------------- schedule
def total_steps(num_samples: int, global_batch: int, epochs: float, max_steps: int | None, section: str) -> int:
    """Optimizer steps of a run: `epochs` of whole global batches, at most `max_steps`."""
    steps_per_epoch = num_samples // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"{section}: {num_samples} training samples are fewer than one global batch ({global_batch})")
    return min(max_steps or 10**12, math.ceil(epochs * steps_per_epoch))



def lr_factor(schedule: str, total: int, warmup: int) -> Callable[[int], float]:
    """The lr multiplier at each step: linear warm-up over `warmup` steps (at most a tenth
    of the run, and at least one step), then linear or cosine decay to 0 at `total`."""
    warmup = max(1, min(warmup, total // 10 or 1))
    if schedule not in ("linear", "cosine"):
        raise ValueError(f"unknown schedule {schedule!r}; choose linear or cosine")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def deepspeed_config(trainer: TrainerSettings, optimizer: OptimizerSettings, precision: str, micro_batch: int,
                     accum_steps: int = 1) -> dict[str, Any]:
    """DeepSpeed's config for one engine per worker. The optimizer and scheduler are ours
    (torch AdamW + LambdaLR, passed to `deepspeed.initialize`); fp16 uses dynamic loss scaling."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accum_steps,
        "gradient_clipping": optimizer.grad_clip,
        "zero_optimization": {"stage": trainer.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                 "hysteresis": 2, "min_loss_scale": 1},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


# ----------------------------------------------------------------- data position
class SampleSet:
    """A set of sample ids in [0, size), stored as a bitmap."""

    def __init__(self, size: int, bits: np.ndarray | None = None):
        self.size = int(size)
        self.bits = np.zeros(self.size, dtype=bool) if bits is None else bits.astype(bool, copy=False)
        if len(self.bits) != self.size:
            raise ValueError(f"bitmap of {len(self.bits)} for {self.size} ids")

    @classmethod
    def of(cls, ids: Iterable[int], size: int | None = None) -> SampleSet:
        ids = np.fromiter(ids, dtype=np.int64)
        out = cls(size if size is not None else (int(ids.max()) + 1 if len(ids) else 0))
        out.add(ids)
        return out

    def add(self, ids: Iterable[int] | np.ndarray) -> None:
        ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.size):
            raise IndexError(f"sample ids must lie in [0, {self.size}), got {ids.min()}..{ids.max()}")
        self.bits[ids] = True

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """Vectorised membership: a bool per id (ids outside [0, size) are not members)."""
        ids = np.asarray(ids, dtype=np.int64)
        inside = (ids >= 0) & (ids < self.size)
        out = np.zeros(len(ids), dtype=bool)
        out[inside] = self.bits[ids[inside]]
        return out

    def union(self, other: SampleSet) -> SampleSet:
        if other.size != self.size:
            raise ValueError(f"sample sets over {self.size} and {other.size} ids")
        return SampleSet(self.size, self.bits | other.bits)

    def __len__(self) -> int:
        return int(self.bits.sum())

    def __contains__(self, sample_id: int) -> bool:
        return 0 <= sample_id < self.size and bool(self.bits[sample_id])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SampleSet) and other.size == self.size and bool((other.bits == self.bits).all())

    def to_json(self) -> dict[str, Any]:
        packed = zlib.compress(np.packbits(self.bits).tobytes(), 9)
        return {"size": self.size, "count": len(self), "bitmap": base64.b64encode(packed).decode()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SampleSet:
        packed = np.frombuffer(zlib.decompress(base64.b64decode(d["bitmap"])), dtype=np.uint8)
        return cls(d["size"], np.unpackbits(packed, count=d["size"]).astype(bool))


@dataclass
class TrainState:
    """Where a run is: saved with every checkpoint as one JSON object, loaded as one."""

    num_samples: int  # size of the sample-id space of the run's data
    step: int = 0  # optimizer steps taken
    epoch: int = 0
    epoch_start_step: int = 0
    trained: SampleSet = field(default=None)  # sample ids the current epoch has trained
    world_size: int = 1  # what wrote the checkpoint: DeepSpeed's ZeRO state only loads back into the same layout
    zero_stage: int = 0
    reason: str = ""  # why the checkpoint was written: periodic, epoch (sweep trials) or final
    last_loss: float | None = None
    evaluation: dict[str, float] = field(default_factory=dict)  # held-out metrics of the last evaluation

    @property
    def finished(self) -> bool:
        return self.reason == "final"

    def __post_init__(self) -> None:
        if self.trained is None:
            self.trained = SampleSet(self.num_samples)

    def next_epoch(self) -> None:
        self.epoch, self.epoch_start_step, self.trained = self.epoch + 1, self.step, SampleSet(self.num_samples)

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "trained": self.trained.to_json()})

    @classmethod
    def from_json(cls, text: str) -> TrainState:
        d = json.loads(text)
        return cls(**{**d, "trained": SampleSet.from_json(d["trained"])})

    def save(self, directory: str | Path) -> None:
        (Path(directory) / TRAIN_STATE).write_text(self.to_json())

    @classmethod
    def load(cls, directory: str | Path) -> TrainState:
        return cls.from_json((Path(directory) / TRAIN_STATE).read_text())


def unseen_batches(frames: Iterable, batch_size: int, seen: SampleSet | set[int], id_column: str = "pair_id") -> Iterator[dict[str, Any]]:
    """Batches of exactly `batch_size` rows from a stream of batches (pandas frames or dicts
    of numpy arrays), leaving out rows whose id is in `seen`. String columns come back as
    lists of str (what tokenizers take), every other column as a numpy array."""
    seen = seen if isinstance(seen, SampleSet) else SampleSet.of(seen)
    pending: dict[str, np.ndarray] | None = None
    for frame in frames:
        columns = {k: np.asarray(frame[k].to_numpy() if hasattr(frame[k], "to_numpy") else frame[k]) for k in _keys(frame)}
        keep = ~seen.contains(columns[id_column])
        columns = {k: v[keep] for k, v in columns.items()}
        pending = columns if pending is None else {k: np.concatenate([pending[k], columns[k]]) for k in columns}
        while len(pending[id_column]) >= batch_size:
            batch = {k: v[:batch_size] for k, v in pending.items()}
            pending = {k: v[batch_size:] for k, v in pending.items()}
            yield {k: v.tolist() if _is_text(v) else v for k, v in batch.items()}


def _keys(frame: Any) -> list[str]:
    return list(frame.columns) if hasattr(frame, "columns") else list(frame.keys())


def _is_text(values: np.ndarray) -> bool:
    return values.ndim == 1 and values.dtype.kind in "OU" and len(values) > 0 and isinstance(values[0], str)


# ----------------------------------------------------------------- resume verification
def state_digest(module: Any, optimizer_state: Any, lr: list[float]) -> str:
    """sha256 of what a resume must restore exactly: the trainable parameters (by name), every
    tensor and number of the optimizer's state (nested dicts and lists, keys sorted; objects
    such as a loss scaler are left out) and the learning rates. Per rank: a ZeRO optimizer
    holds its own partition."""
    import hashlib

    import torch

    h = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            h.update(str(value.dtype).encode() + str(tuple(value.shape)).encode())
            h.update(value.detach().float().cpu().contiguous().numpy().tobytes())
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                h.update(str(key).encode())
                feed(value[key])
        elif isinstance(value, (list, tuple)):
            for item in value:
                feed(item)
        elif isinstance(value, (bool, int, float, str)) or value is None:
            h.update(repr(value).encode())

    for name, param in sorted(module.named_parameters()):
        if param.requires_grad:
            h.update(name.encode())
            feed(param)
    feed(optimizer_state)
    feed([float(x) for x in lr])
    return h.hexdigest()[:32]


# ----------------------------------------------------------------- step times and data wait
@dataclass
class StepTimes:
    """Wall time of this attempt's steps, waiting for data included, and of that wait. Its
    first step pays for start-up and is left out."""

    steps: int = 0
    seconds: float = 0.0
    wait_seconds: float = 0.0
    epoch_start_wait_seconds: float = 0.0  # of the wait, for an epoch's first batch (Ray Data starts the pass)
    first_step_seconds: float | None = None  # the step left out: start-up, and compiling under `compile`

    def add(self, seconds: float, wait: float, epoch_start: bool) -> None:
        self.steps, self.seconds, self.wait_seconds = self.steps + 1, self.seconds + seconds, self.wait_seconds + wait
        self.epoch_start_wait_seconds += wait if epoch_start else 0.0

    @property
    def data_wait_fraction(self) -> float | None:
        return self.wait_seconds / self.seconds if self.seconds else None

    @property
    def within_epoch_wait_fraction(self) -> float | None:
        """The wait once an epoch's stream runs: what long epochs approach."""
        return (self.wait_seconds - self.epoch_start_wait_seconds) / self.seconds if self.seconds else None


_BLOCKED = re.compile(r"user thread is blocked by Ray Data iter_batches: ([\d.]+)(us|ms|s)\b")


def ray_data_blocked_seconds(stats: str) -> float | None:
    """'Total time user thread is blocked by Ray Data iter_batches: 1.2s' from `DataIterator.stats()`."""
    match = _BLOCKED.search(stats or "")
    if not match:
        return None
    return float(match.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[match.group(2)]

"""The one trainer behind every training stage: Ray Train's `TorchTrainer` around one
DeepSpeed engine per worker, checkpoints with an exact data position, resume, and rank-0
MLflow logging. A stage supplies a `TrainTask` (its model, its batches, its step); the
loop, the checkpoints and the bookkeeping are here, once.

What crosses the Ray boundary is typed: the task (a dataclass the stage builds on the
driver) and a `TrainPlan`; what comes back is the final checkpoint and rank 0's
`WorkerOutcome`.

Checkpoints: every `checkpoint_every` steps each rank writes its DeepSpeed state (frozen
weights are not written) into one folder, rank 0 adds the `TrainState` (step, epoch, the
ids the epoch has trained, gathered from every rank) and, in the final one, the task's
exported weights; Ray Train persists the folder under `{storage_path}/{run_name}`. A
replaced worker group (`max_failures`) and a job started again with the same run name
resume from the latest checkpoint.
"""

from __future__ import annotations

import logging
import re
import tempfile
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from pipeline.config import OptimizerSettings, TrainerSettings
from pipeline.faults import crash_point
from pipeline.training import TRAIN_STATE, TrainState, deepspeed_config, lr_factor, state_digest

log = logging.getLogger(__name__)

EXPORT = "export.safetensors"  # the task's exported weights, in the final checkpoint


@dataclass(frozen=True)
class TrainPlan:
    """Everything the worker loop needs besides the task; built by the stage on the driver."""

    run_name: str
    total_steps: int
    num_samples: int  # size of the sample-id space (ids 0..num_samples-1)
    micro_batch: int  # samples per worker per micro-step
    precision: str  # bf16 | fp16 | fp32
    seed: int
    trainer: TrainerSettings
    optimizer: OptimizerSettings
    accum_steps: int = 1
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    checkpoint_epochs: bool = False  # also checkpoint at each epoch's end, after its evaluation (a sweep's trials: the
    # scheduler compares trials on what every report carries, the last evaluation)


@dataclass
class WorkerContext:
    rank: int
    world: int
    device: Any  # torch.device
    plan: TrainPlan


@dataclass
class StepOutput:
    loss: float
    sample_ids: Any  # the ids this rank trained in the step (numpy array)
    metrics: dict[str, float] = field(default_factory=dict)  # extra per-step metrics for MLflow
    flops: float = 0.0  # model FLOPs of this rank's step (0: unknown)


@dataclass
class WorkerOutcome:
    """Rank 0's account of the attempt that finished, returned through `Result.return_value`
    (the rest is in the final checkpoint's TrainState)."""

    resumed_from_step: int | None  # None: this attempt started from scratch
    task_outcome: Any = None  # what the task's `outcome` gathered (e.g. unreadable images)
    timed_steps: int = 0  # steps of this attempt after its first (which pays for start-up)
    step_seconds: float = 0.0  # their wall time, waiting for data included
    wait_seconds: float = 0.0  # of which the loop waited for its next batch
    epoch_start_wait_seconds: float = 0.0  # of which for the first batch of an epoch (Ray Data starts the pass)
    resume_verified: bool | None = None  # True: after loading, every rank's parameters, optimizer state and lr
    # hashed as they did when the checkpoint was saved (None: not resumed, or on other ranks/ZeRO)

    @property
    def data_wait_fraction(self) -> float | None:
        return self.wait_seconds / self.step_seconds if self.step_seconds else None

    @property
    def within_epoch_wait_fraction(self) -> float | None:
        """The wait once an epoch's stream runs: what long epochs approach."""
        return (self.wait_seconds - self.epoch_start_wait_seconds) / self.step_seconds if self.step_seconds else None


class TrainTask(ABC):
    """What a training stage supplies. Built on the driver, pickled to every worker."""

    @abstractmethod
    def build(self, ctx: WorkerContext):
        """The model (an nn.Module) on ctx.device, in float32; DeepSpeed casts it."""

    def param_groups(self, model, optimizer: OptimizerSettings) -> list[dict[str, Any]]:
        """Optimizer parameter groups; by default every trainable parameter, one group."""
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": optimizer.weight_decay}]

    @abstractmethod
    def batches(self, shard, state: TrainState, ctx: WorkerContext) -> Iterator[Any]:
        """This epoch's batches from the worker's dataset shard, leaving out the samples
        `state.trained` holds (a resumed epoch trains exactly the others)."""

    @abstractmethod
    def train_step(self, engine, batch: Any, state: TrainState, ctx: WorkerContext) -> StepOutput:
        """Forward, backward and `engine.step()` for one batch."""

    def after_step(self, engine, ctx: WorkerContext) -> None:
        """Called on every rank after each optimizer step (e.g. clamp a logit scale)."""

    def evaluate(self, engine, state: TrainState, ctx: WorkerContext) -> dict[str, float]:
        """Held-out metrics at the end of every epoch and of the run (all ranks call it;
        rank 0's result is logged)."""
        return {}

    def export(self, engine, ctx: WorkerContext) -> dict[str, Any]:
        """Weights the driver needs afterwards (all ranks call it; rank 0's are saved in the final checkpoint)."""
        return {}

    def outcome(self, ctx: WorkerContext) -> Any:
        """What the task hands back to the driver when the run ends (all ranks call it; rank 0's
        value arrives as `WorkerOutcome.task_outcome`)."""
        return None


def full_state(engine, trainable_only: bool) -> dict[str, Any]:
    """The module's parameters as float32 CPU tensors on rank 0 (empty on the others): the
    optimizer's fp32 master copy of trained weights (bf16/fp16 runs keep one), the module's
    value of frozen ones, gathered under ZeRO-3. Every rank must call it."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, param in engine.module.named_parameters():
        if trainable_only and not param.requires_grad:
            continue
        value = safe_get_full_fp32_param(param) if param.requires_grad else None  # a collective under ZeRO
        if value is None:
            with deepspeed.zero.GatheredParameters([param], enabled=hasattr(param, "ds_id")):
                value = param.detach().clone()
        if dist.get_rank() == 0:
            out[name] = value.float().cpu().clone()
    return out


# ----------------------------------------------------------------- worker
def _everyone(flag: bool, device) -> bool:
    """True when the flag holds on every rank: all ranks take a step or none does (their
    shards may hold different numbers of untrained samples after a resume)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _started(batches: Iterator) -> Iterator:
    """`batches` with its first item already being fetched in a thread: the next epoch's
    stream fills (Ray Data starts its pass, decodes, fills the shuffle buffer) while this
    thread evaluates the model."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(1, thread_name_prefix="next-epoch")
    first = pool.submit(next, batches, None)
    pool.shutdown(wait=False)  # the thread ends with that one call

    def chain():
        item = first.result()
        if item is not None:
            yield item
            yield from batches

    return chain()


def _merged_position(state: TrainState) -> TrainState:
    """The state with the trained ids of every rank."""
    import torch.distributed as dist

    from pipeline.training import SampleSet

    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, state.trained.to_json())
    merged = state.trained
    for part in parts:
        merged = merged.union(SampleSet.from_json(part))
    return TrainState(**{**state.__dict__, "trained": merged})


class _Loop:
    """One worker's run: engine, state, tracker; `run()` is the loop."""

    def __init__(self, task: TrainTask, plan: TrainPlan):
        import deepspeed
        import torch

        from pipeline.stages.tracking import Tracker

        # DeepSpeed's ZeRO-2 calls a collective that torch 2.13 deprecates: one warning a step
        warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
        train_ctx = ray.train.get_context()
        rank, world = train_ctx.get_world_rank(), train_ctx.get_world_size()
        device = torch.device("cuda", train_ctx.get_local_rank()) if plan.trainer.use_gpu else torch.device("cpu")
        self.task, self.plan = task, plan
        self.ctx = WorkerContext(rank=rank, world=world, device=device, plan=plan)
        torch.manual_seed(plan.seed + rank)
        model = task.build(self.ctx)
        opt = plan.optimizer
        optimizer = torch.optim.AdamW(task.param_groups(model, opt), lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(opt.schedule, plan.total_steps, opt.warmup_steps))
        config = deepspeed_config(plan.trainer, opt, plan.precision, plan.micro_batch, plan.accum_steps)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
        self.scheduler = scheduler
        self.state = TrainState(plan.num_samples, world_size=world, zero_stage=plan.trainer.zero_stage)
        self.tracker = Tracker.for_run(plan.tracking_uri, plan.mlflow_run_id) if rank == 0 else Tracker(None, None)
        self._blocked_total = 0.0  # Ray Data's blocked time on this shard so far (its stats are cumulative)
        self.outcome = WorkerOutcome(resumed_from_step=None)

    def restore(self) -> None:
        checkpoint = ray.train.get_checkpoint()
        if not checkpoint:
            return
        with checkpoint.as_directory() as d:
            saved = TrainState.load(d)
            if (saved.world_size, saved.zero_stage) != (self.ctx.world, self.plan.trainer.zero_stage):
                log.warning("checkpoint of %s was written by %d workers with ZeRO-%d; loading it into %d workers with ZeRO-%d",
                            self.plan.run_name, saved.world_size, saved.zero_stage, self.ctx.world, self.plan.trainer.zero_stage)
            try:
                self.engine.load_checkpoint(d, tag="state", load_module_strict=False)
            except Exception as e:  # noqa: BLE001 - name the cause and the way out
                raise RuntimeError(
                    f"cannot resume {self.plan.run_name} from its step-{saved.step} checkpoint (written by {saved.world_size} "
                    f"workers with ZeRO-{saved.zero_stage}; this run has {self.ctx.world} with ZeRO-{self.plan.trainer.zero_stage}): "
                    f"{type(e).__name__}: {e}. Resume with the settings it was written with, or set a new run_name to start over"
                ) from e
            if (saved.world_size, saved.zero_stage) == (self.ctx.world, self.plan.trainer.zero_stage):
                self._verify_resume(Path(d), saved.step)
        self.state = TrainState(**{**saved.__dict__, "world_size": self.ctx.world, "zero_stage": self.plan.trainer.zero_stage})
        self.outcome.resumed_from_step = saved.step
        if self.ctx.rank == 0:
            print(f"resumed {self.plan.run_name} from step {saved.step} (epoch {saved.epoch}, {len(saved.trained)} of its samples trained)", flush=True)

    def _digest(self) -> str:
        return state_digest(self.engine.module, self.engine.optimizer.state_dict(), self.scheduler.get_last_lr())

    def _verify_resume(self, folder: Path, step: int) -> None:
        """The tensors a resume must restore, compared with their digest at save time (not the
        step counter): a partial load (`load_module_strict=False`) cannot pass unnoticed."""
        saved = folder / f"state-digest-rank{self.ctx.rank}.txt"
        if not saved.is_file():  # a checkpoint written before digests existed
            return
        now = self._digest()
        if now != saved.read_text().strip():
            raise RuntimeError(f"rank {self.ctx.rank}: resuming {self.plan.run_name} from step {step} did not restore its parameters, "
                               f"optimizer state and lr as saved (digest {now} != {saved.read_text().strip()})")
        self.outcome.resume_verified = True

    def save(self, reason: str) -> None:
        """Every rank writes its DeepSpeed state into one folder; Ray Train persists it."""
        import torch.distributed as dist
        from safetensors.torch import save_file

        state = _merged_position(self.state)
        state.reason = reason
        exported = self.task.export(self.engine, self.ctx) if reason == "final" else {}
        with tempfile.TemporaryDirectory() as tmp:
            self.engine.save_checkpoint(tmp, tag="state", exclude_frozen_parameters=True)
            (Path(tmp) / f"state-digest-rank{self.ctx.rank}.txt").write_text(self._digest())
            if self.ctx.rank == 0:
                state.save(tmp)
                if exported:
                    save_file({k: v.contiguous() for k, v in exported.items()}, str(Path(tmp) / EXPORT))
            dist.barrier()
            crash_point("train.checkpoint_saving", step=state.step)  # the state is written, Ray Train has not registered it
            metrics = {"step": state.step, "epoch": state.epoch, "loss": state.last_loss if state.last_loss is not None else float("nan"),
                       **state.evaluation}
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    def run(self) -> WorkerOutcome:
        plan, state, ctx = self.plan, self.state, self.ctx
        if state.finished:  # a finished run does no work
            self.outcome.task_outcome = self.task.outcome(ctx)
            return self.outcome
        shard = ray.train.get_dataset_shard("train")
        evaluated_at, upcoming = -1, None
        while state.step < plan.total_steps:
            batches, upcoming = upcoming or self.task.batches(shard, state, ctx), None
            waited, started = 0.0, time.perf_counter()
            while True:
                t0 = time.perf_counter()
                batch = next(batches, None)
                wait = time.perf_counter() - t0
                if not _everyone(batch is not None, ctx.device):
                    break
                out = self.task.train_step(self.engine, batch, state, ctx)
                self.task.after_step(self.engine, ctx)
                state.step += 1
                state.trained.add(out.sample_ids)
                state.last_loss = out.loss
                crash_point("train.step", step=state.step)
                step_s = time.perf_counter() - t0
                waited += wait
                self._log_step(out, step_s, wait)
                if state.step > (self.outcome.resumed_from_step or 0) + 1:
                    self.outcome.timed_steps += 1
                    self.outcome.step_seconds += step_s
                    self.outcome.wait_seconds += wait
                    if state.step == state.epoch_start_step + 1:
                        self.outcome.epoch_start_wait_seconds += wait
                if state.step >= plan.total_steps:
                    break
                if state.step % plan.trainer.checkpoint_every == 0:
                    self.save("periodic")
            if state.step >= plan.total_steps:
                break
            for _ in batches:
                pass  # drain: every worker reads its whole shard before the next epoch starts the stream again
            if state.step == state.epoch_start_step:
                raise RuntimeError(f"rank {ctx.rank}: the data gave no full batch of {plan.micro_batch * plan.accum_steps} "
                                   f"on every worker in epoch {state.epoch}")
            self._log_epoch(shard, waited, time.perf_counter() - started)
            state.next_epoch()
            upcoming = _started(self.task.batches(shard, state, ctx))  # overlaps the evaluation
            self._evaluate()
            evaluated_at = state.step
            if plan.checkpoint_epochs:
                self.save("epoch")
        if evaluated_at != state.step:
            self._evaluate()
        self.save("final")
        self.outcome.task_outcome = self.task.outcome(ctx)
        return self.outcome

    def _evaluate(self) -> None:
        self.state.evaluation = self.task.evaluate(self.engine, self.state, self.ctx)
        self.tracker.log_metrics({f"val/{k}": v for k, v in self.state.evaluation.items()}, step=self.state.step)

    def _log_step(self, out: StepOutput, step_s: float, wait_s: float) -> None:
        if self.ctx.rank != 0:
            return
        samples = self.plan.micro_batch * self.plan.accum_steps * self.ctx.world
        metrics = {"train/loss": out.loss, "train/lr": self.scheduler.get_last_lr()[0], "train/samples_per_s": samples / step_s,
                   "train/data_wait_fraction": wait_s / step_s, **{f"train/{k}": v for k, v in out.metrics.items()}}
        if out.flops and self.plan.trainer.use_gpu:
            metrics["train/model_tflops_per_gpu"] = out.flops / step_s / 1e12
        self.tracker.log_metrics(metrics, step=self.state.step)

    def _log_epoch(self, shard, waited: float, seconds: float) -> None:
        """Data-wait over the epoch, as this loop timed it and as Ray Data's iterator counts it."""
        if self.ctx.rank != 0:
            return
        total = ray_data_blocked_seconds(shard.stats())
        metrics = {"data/wait_fraction": waited / seconds if seconds else 0.0}
        if total is not None:
            # the iterator's stats add up over every epoch of this shard: this epoch's share is the difference
            blocked, self._blocked_total = total - self._blocked_total, total
            metrics["data/iterator_blocked_fraction"] = blocked / seconds if seconds else 0.0
        self.tracker.log_metrics(metrics, step=self.state.step)


_BLOCKED = re.compile(r"user thread is blocked by Ray Data iter_batches: ([\d.]+)(us|ms|s)\b")


def ray_data_blocked_seconds(stats: str) -> float | None:
    """'Total time user thread is blocked by Ray Data iter_batches: 1.2s' from `DataIterator.stats()`."""
    match = _BLOCKED.search(stats or "")
    if not match:
        return None
    return float(match.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[match.group(2)]


def _train_worker(task: TrainTask, plan: TrainPlan) -> WorkerOutcome:
    loop = _Loop(task, plan)
    loop.restore()
    return loop.run()


# ----------------------------------------------------------------- driver
@dataclass
class FitResult:
    checkpoint: Any  # ray.train.Checkpoint of the final step (on storage_path; any node can read it)
    state: TrainState
    outcome: WorkerOutcome


def storage_path(trainer: TrainerSettings, run_dir: str) -> str:
    return trainer.storage_path or str(Path(run_dir) / "ray_results")


def fit(task: TrainTask, plan: TrainPlan, datasets: dict[str, Any], storage: str, splits: list[str] | None = None,
        callbacks: list | None = None) -> FitResult:
    """Run (or resume) `plan.run_name` to its last step; `datasets['train']` is split among
    workers (and any other dataset named in `splits`); the rest reach every worker whole.
    `callbacks`: Ray Train callbacks (a sweep's trial passes Tune's `TuneReportCallback`)."""
    import functools

    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    done = finished_run(plan, storage)
    if done is not None:
        return done  # a finished run starts no workers
    t = plan.trainer
    trainer = TorchTrainer(
        functools.partial(_train_worker, task, plan),
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker={"CPU": t.cpus_per_worker}),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=splits or ["train"]),
        run_config=RunConfig(
            name=plan.run_name, storage_path=storage,
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            callbacks=callbacks,
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None or result.return_value is None:
        raise RuntimeError(f"training run {plan.run_name} did not finish: {result.error}")
    return FitResult(checkpoint=result.checkpoint, state=read_state(result.checkpoint), outcome=result.return_value)


def finished_run(plan: TrainPlan, storage: str) -> FitResult | None:
    """The run's result when its final checkpoint is already on storage, else None."""
    from ray.train import Result

    try:
        result = Result.from_path(f"{storage.rstrip('/')}/{plan.run_name}")
    except RuntimeError:  # no such run yet
        return None
    if result.checkpoint is None:
        return None
    state = read_state(result.checkpoint)
    if not state.finished or state.step < plan.total_steps:
        return None
    return FitResult(checkpoint=result.checkpoint, state=state, outcome=WorkerOutcome(resumed_from_step=state.step))


def read_state(checkpoint) -> TrainState:
    """A checkpoint's TrainState, read straight from storage (not the whole checkpoint)."""
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{TRAIN_STATE}") as f:
        return TrainState.from_json(f.read().decode())

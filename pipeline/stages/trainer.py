"""The one trainer behind every training stage: Ray Train's `TorchTrainer` around one
DeepSpeed engine per worker, checkpoints with an exact data position, resume, rank-0 MLflow
logging, and the finish step. A stage supplies a `TrainTask` (its model, its batches, its
step, how its model is saved); the loop, the checkpoints and the bookkeeping are here, once.

What crosses the Ray boundary is typed: the task (a dataclass the stage builds on the
driver) and a `TrainPlan`; what comes back is the final checkpoint and rank 0's
`WorkerOutcome`. Every `checkpoint_every` steps the workers save a `Checkpoint`
(`pipeline.stages.checkpoint`); a replaced worker group (`max_failures`) and a job started
again with the same run name resume from the latest one.

`train` is the one training driver: it fits the run (or finds it finished) and publishes its
model. A Ray task on any node reads the final checkpoint's weights from storage, has the task
build and save the model (`TrainTask.save_model`), writes its lineage beside it, logs it to the
MLflow run and copies it to `{storage_path}/{run_name}/outputs/{artifact}-step{N}`. The stage
then registers it (`tracking.register`) and records its result beside the outputs, its last act.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import ray

from pipeline.config import OptimizerSettings, TrainerSettings
from pipeline.faults import crash_point
from pipeline.lineage import ModelLineage
from pipeline.model_refs import is_remote_uri
from pipeline.uri import join, upload_dir
from pipeline.stages.checkpoint import Checkpoint
from pipeline.training import SampleSet, StepTimes, TrainState, deepspeed_config, lr_factor, ray_data_blocked_seconds

log = logging.getLogger(__name__)


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
    resume_verified: bool | None = None  # True: every rank's parameters, optimizer state and lr hashed as saved
    task_outcome: Any = None  # what the task's `outcome` gathered (e.g. unreadable images)
    times: StepTimes = field(default_factory=StepTimes)


class TrainTask(ABC):
    """What a training stage supplies. Built on the driver, pickled to every worker."""

    exports_trainable_only = False  # the final checkpoint's weights: the trained ones (LoRA adapters), or all

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

    def outcome(self, ctx: WorkerContext) -> Any:
        """What the task hands back to the driver when the run ends (all ranks call it; rank 0's
        value arrives as `WorkerOutcome.task_outcome`)."""
        return None

    def save_model(self, weights: dict[str, Any], folder: Path) -> str | None:
        """Save the model the exported `weights` make into `folder` (the finish step, off the
        workers); return its own version when it has one (a text encoder's encoder_version)."""
        raise NotImplementedError(f"{type(self).__name__} saves no model")


# ----------------------------------------------------------------- worker
def _everyone(flag: bool, device) -> bool:
    """True when the flag holds on every rank: all ranks take a step or none does (their
    shards may hold different numbers of untrained samples after a resume)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


class _Stream:
    """This rank's batches, epoch after epoch, read ahead by a thread into a short queue. The
    next epoch's pass (Ray Data starts it: reads, decodes, fills the shuffle buffer) begins as
    soon as this epoch's last batch is read, while the loop still trains on the batches ahead
    and evaluates, so a short epoch does not wait for its stream to start. Each epoch reads
    `task.batches` with its own snapshot of the state: its number (the shuffle seed) and, for the
    epoch a run resumes in, the samples already trained."""

    END = object()  # an epoch's last item

    def __init__(self, task: TrainTask, shard, state: TrainState, ctx: WorkerContext, ahead: int):
        import queue
        import threading

        self.items: queue.Queue = queue.Queue(maxsize=ahead)
        self.stopped = threading.Event()
        first = replace(state, trained=SampleSet(state.num_samples, state.trained.bits.copy()))
        threading.Thread(target=self._read, args=(task, shard, first, ctx), name="batches", daemon=True).start()

    def _read(self, task: TrainTask, shard, state: TrainState, ctx: WorkerContext) -> None:
        try:
            while not self.stopped.is_set():
                for batch in task.batches(shard, state, ctx):
                    self._put(batch)
                self._put(self.END)
                state = replace(state, epoch=state.epoch + 1, trained=SampleSet(state.num_samples))
        except BaseException as e:  # raised in the loop's thread, by `next`
            self._put(_Failed(e))

    def _put(self, item) -> None:
        import queue

        while not self.stopped.is_set():
            try:
                return self.items.put(item, timeout=0.5)
            except queue.Full:
                continue

    def epoch(self) -> Iterator:
        """The current epoch's batches."""
        while (item := self.items.get()) is not self.END:
            if isinstance(item, _Failed):
                raise item.error
            yield item

    def close(self) -> None:
        """The run is over: the thread stops at its next batch (one blocked in Ray Data ends with the process)."""
        self.stopped.set()


@dataclass
class _Failed:
    error: BaseException


class _Epoch:
    """One epoch's batch stream on this rank: a batch is taken only when every rank has one,
    and the wait for it is timed."""

    def __init__(self, batches: Iterator, device):
        self.batches, self.device = batches, device
        self.began: float | None = None  # when its first batch was asked for (after the evaluation before it)
        self.step_began = 0.0
        self.wait = self.waited = 0.0  # the last batch's wait; the epoch's so far

    def next_batch(self) -> Any | None:
        self.step_began = time.perf_counter()
        self.began = self.began or self.step_began
        batch = next(self.batches, None)
        self.wait = time.perf_counter() - self.step_began
        if not _everyone(batch is not None, self.device):
            return None
        self.waited += self.wait
        return batch

    def drain(self) -> None:
        """This rank's rest of the epoch is read (and left untrained: another rank's epoch ended first)."""
        for _ in self.batches:
            pass


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
        if plan.trainer.compile:
            model.compile()  # in place: the parameter names (checkpoints, DeepSpeed) stay as they are
        opt = plan.optimizer
        optimizer = torch.optim.AdamW(task.param_groups(model, opt), lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(opt.schedule, plan.total_steps, opt.warmup_steps))
        config = deepspeed_config(plan.trainer, opt, plan.precision, plan.micro_batch, plan.accum_steps)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=self.scheduler, config=config)
        self.state = TrainState(plan.num_samples, world_size=world, zero_stage=plan.trainer.zero_stage)
        self.tracker = Tracker.for_run(plan.tracking_uri, plan.mlflow_run_id) if rank == 0 else Tracker(None, None)
        self.shard = ray.train.get_dataset_shard("train")
        self.outcome = WorkerOutcome(resumed_from_step=None)
        self.evaluated_at = -1
        self._blocked_total = 0.0  # Ray Data's blocked time on this shard so far (its stats are cumulative)

    def restore(self) -> None:
        stored = ray.train.get_checkpoint()
        if not stored:
            return
        with stored.as_directory() as folder:
            self.state, self.outcome.resume_verified = Checkpoint.load(
                folder, self.engine, self.scheduler, self.ctx.rank, self.ctx.world, self.plan.trainer.zero_stage, self.plan.run_name)
        self.outcome.resumed_from_step = self.state.step
        if self.ctx.rank == 0:
            print(f"resumed {self.plan.run_name} from step {self.state.step} (epoch {self.state.epoch}, "
                  f"{len(self.state.trained)} of its samples trained)", flush=True)

    def run(self) -> WorkerOutcome:
        state, plan = self.state, self.plan
        if not state.finished:  # a finished run does no work
            self.stream = _Stream(self.task, self.shard, state, self.ctx, plan.trainer.read_ahead_batches)
            epoch = _Epoch(self.stream.epoch(), self.ctx.device)
            while state.step < plan.total_steps:
                batch = epoch.next_batch()
                if batch is None:  # some rank's epoch is over
                    epoch = self.next_epoch(epoch)
                    continue
                out = self.task.train_step(self.engine, batch, state, self.ctx)
                self.task.after_step(self.engine, self.ctx)
                self.advance(out, epoch)
                if state.step < plan.total_steps and state.step % plan.trainer.checkpoint_every == 0:
                    self.save("periodic")
            self.stream.close()
            if self.evaluated_at != state.step:
                self.evaluate()
            self.save("final")
        self.outcome.task_outcome = self.task.outcome(self.ctx)
        return self.outcome

    def advance(self, out: StepOutput, epoch: _Epoch) -> None:
        """The step is taken: count it, record what it trained, time and log it."""
        state = self.state
        state.step += 1
        state.trained.add(out.sample_ids)
        state.last_loss = out.loss
        crash_point("train.step", step=state.step)
        seconds = time.perf_counter() - epoch.step_began
        if state.step > (self.outcome.resumed_from_step or 0) + 1:
            self.outcome.times.add(seconds, epoch.wait, epoch_start=state.step == state.epoch_start_step + 1)
        else:
            self.outcome.times.first_step_seconds = seconds
            self.tracker.log_metrics({"train/first_step_s": seconds}, step=state.step)
        self._log_step(out, seconds, epoch.wait)

    def next_epoch(self, ended: _Epoch) -> _Epoch:
        """Close the epoch (drain, log), evaluate while the stream reads the next one."""
        ended.drain()
        if self.state.step == self.state.epoch_start_step:
            raise RuntimeError(f"rank {self.ctx.rank}: the data gave no full batch of {self.plan.micro_batch * self.plan.accum_steps} "
                               f"on every worker in epoch {self.state.epoch}")
        self._log_epoch(ended.waited, time.perf_counter() - ended.began)
        self.state.next_epoch()
        upcoming = _Epoch(self.stream.epoch(), self.ctx.device)
        self.evaluate()
        if self.plan.checkpoint_epochs:
            self.save("epoch")
        return upcoming

    def save(self, reason: str) -> None:
        """Every rank writes its part of one checkpoint folder; Ray Train persists it."""
        import torch.distributed as dist

        checkpoint = Checkpoint.gather(self.state, reason, self.engine, self.task.exports_trainable_only)
        state = checkpoint.state
        with tempfile.TemporaryDirectory() as folder:
            checkpoint.save(folder, self.engine, self.scheduler, self.ctx.rank)
            dist.barrier()
            crash_point("train.checkpoint_saving", step=state.step)  # the state is written, Ray Train has not registered it
            loss = state.last_loss if state.last_loss is not None else float("nan")
            metrics = {"step": state.step, "epoch": state.epoch, "loss": loss, **state.evaluation}
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))

    def evaluate(self) -> None:
        self.state.evaluation = self.task.evaluate(self.engine, self.state, self.ctx)
        self.evaluated_at = self.state.step
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

    def _log_epoch(self, waited: float, seconds: float) -> None:
        """Data-wait over the epoch, as this loop timed it and as Ray Data's iterator counts it."""
        if self.ctx.rank != 0:
            return
        total = ray_data_blocked_seconds(self.shard.stats())
        metrics = {"data/wait_fraction": waited / seconds if seconds else 0.0}
        if total is not None:
            # the iterator's stats add up over every epoch of this shard: this epoch's share is the difference
            blocked, self._blocked_total = total - self._blocked_total, total
            metrics["data/iterator_blocked_fraction"] = blocked / seconds if seconds else 0.0
        self.tracker.log_metrics(metrics, step=self.state.step)


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


def storage_path(trainer: TrainerSettings, storage: str) -> str:
    """Where the run's checkpoints and outputs go: its own setting, else {storage}/ray_results
    (`PipelineConfig.storage`: shared storage every node reaches)."""
    return trainer.storage_path or join(storage, "ray_results")


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
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker={"CPU": t.cpus_per_worker, **t.resources_per_worker}),
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
    return FitResult(checkpoint=result.checkpoint, state=Checkpoint.read_state(result.checkpoint), outcome=result.return_value)


def finished_run(plan: TrainPlan, storage: str) -> FitResult | None:
    """The run's result when its final checkpoint is already on storage, else None."""
    from ray.train import Result

    try:
        result = Result.from_path(f"{storage.rstrip('/')}/{plan.run_name}")
    except RuntimeError:  # no such run yet
        return None
    if result.checkpoint is None:
        return None
    state = Checkpoint.read_state(result.checkpoint)
    if not state.finished or state.step < plan.total_steps:
        return None
    return FitResult(checkpoint=result.checkpoint, state=state, outcome=WorkerOutcome(resumed_from_step=state.step))


# ----------------------------------------------------------------- the finish step
LINEAGE_FILE = "llm2clip_lineage.json"  # beside a saved model's weights


@dataclass
class Trained:
    """A finished run and its published model."""

    fit: FitResult
    model_path: str  # the saved model on storage
    model_version: str | None  # its own version, when it has one (a text encoder's encoder_version)
    model_uri: str | None  # runs:/RUN/ARTIFACT while MLflow tracks the run


def train(task: TrainTask, plan: TrainPlan, datasets: dict[str, Any], storage: str, artifact: str, lineage: ModelLineage) -> Trained:
    """Fit `plan.run_name` (or find it finished) and publish its model as `artifact` ("model",
    "encoder"): on storage, and in the MLflow run of the plan."""
    fitted = fit(task, plan, datasets, storage)
    dest = f"{storage.rstrip('/')}/{plan.run_name}/outputs/{artifact}-step{fitted.state.step}"
    lineage_json = json.dumps(replace(lineage, steps=fitted.state.step).to_json(), indent=2)
    resources = {"num_cpus": plan.trainer.cpus_per_worker, "num_gpus": 1 if plan.trainer.use_gpu else 0,
                 "resources": plan.trainer.resources_per_worker}
    path, version = ray.get(_save_model.options(**resources).remote(task, fitted.checkpoint, dest, artifact, lineage_json, plan.tracking_uri,
                                                                   plan.mlflow_run_id))
    return Trained(fitted, path, version, f"runs:/{plan.mlflow_run_id}/{artifact}" if plan.tracking_uri else None)


@ray.remote
def _save_model(task: TrainTask, stored, dest: str, artifact: str, lineage_json: str, tracking_uri: str | None,
                run_id: str | None) -> tuple[str, str | None]:
    from pipeline.stages.tracking import Tracker

    weights = Checkpoint.read_weights(stored)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / artifact
        version = task.save_model(weights, local)
        (local / LINEAGE_FILE).write_text(lineage_json)
        Tracker.for_run(tracking_uri, run_id).log_artifact(local, artifact)
        return publish_dir(local, dest), version


def publish_dir(local: str | Path, dest: str) -> str:
    """Copy a finished local folder to `dest` (a local path or a filesystem URI) and return
    `dest`. Locally the folder appears at once, by rename, or not at all."""
    if is_remote_uri(dest):
        upload_dir(local, dest)
        return dest
    target = Path(dest.removeprefix("file://"))
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(local, staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return str(target)

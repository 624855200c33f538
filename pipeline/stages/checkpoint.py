"""One training checkpoint: every piece of it written together and read together.

A checkpoint is one folder, which Ray Train persists under `{storage_path}/{run_name}`:
- every rank's DeepSpeed state (`state/`; frozen weights are not written);
- every rank's digest of what a resume must restore: its trainable parameters, its optimizer
  state and the learning rates (`state-digest-rank{N}.txt`), checked after loading, so a
  partial load fails instead of training on;
- the `TrainState` (rank 0): step, epoch, and the ids the epoch has trained;
- in the final checkpoint only, the weights the task exports (rank 0), which `trainer.train`
  builds the saved model from, on any node.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pipeline.training import TRAIN_STATE, SampleSet, TrainState, state_digest

log = logging.getLogger(__name__)

TAG = "state"  # DeepSpeed's folder for the engine state
WEIGHTS = "export.safetensors"


def _digest_file(folder: str | Path, rank: int) -> Path:
    return Path(folder) / f"state-digest-rank{rank}.txt"


def _digest(engine, scheduler) -> str:
    return state_digest(engine.module, engine.optimizer.state_dict(), scheduler.get_last_lr())


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


@dataclass
class Checkpoint:
    state: TrainState
    weights: dict[str, Any] | None = None  # the exported weights (final checkpoint, rank 0)

    @classmethod
    def gather(cls, state: TrainState, reason: str, engine, trainable_only: bool) -> Checkpoint:
        """This rank's checkpoint of `state`, with the ids every rank has trained this epoch and,
        in the final one, the exported weights (every rank calls it: both are collectives)."""
        import torch.distributed as dist

        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, state.trained.to_json())
        trained = state.trained
        for part in parts:
            trained = trained.union(SampleSet.from_json(part))
        weights = full_state(engine, trainable_only) if reason == "final" else None
        return cls(replace(state, trained=trained, reason=reason), weights)

    def save(self, folder: str, engine, scheduler, rank: int) -> None:
        """This rank's part of the checkpoint into `folder` (every rank calls it)."""
        from safetensors.torch import save_file

        engine.save_checkpoint(folder, tag=TAG, exclude_frozen_parameters=True)
        _digest_file(folder, rank).write_text(_digest(engine, scheduler))
        if rank == 0:
            self.state.save(folder)
            if self.weights:
                save_file({k: v.contiguous() for k, v in self.weights.items()}, str(Path(folder) / WEIGHTS))

    @classmethod
    def load(cls, folder: str, engine, scheduler, rank: int, world: int, zero_stage: int, run_name: str) -> tuple[TrainState, bool | None]:
        """Every piece back into this rank: the engine state, then the check that its tensors hash
        as they did when saved. Returns the state (in this run's layout) and whether that check
        ran and passed (None: a checkpoint of another layout, or one written before digests)."""
        saved = TrainState.load(folder)
        same_layout = (saved.world_size, saved.zero_stage) == (world, zero_stage)
        if not same_layout:
            log.warning("checkpoint of %s was written by %d workers with ZeRO-%d; loading it into %d workers with ZeRO-%d",
                        run_name, saved.world_size, saved.zero_stage, world, zero_stage)
        try:
            engine.load_checkpoint(folder, tag=TAG, load_module_strict=False)
        except Exception as e:  # noqa: BLE001 - name the cause and the way out
            raise RuntimeError(
                f"cannot resume {run_name} from its step-{saved.step} checkpoint (written by {saved.world_size} workers with "
                f"ZeRO-{saved.zero_stage}; this run has {world} with ZeRO-{zero_stage}): {type(e).__name__}: {e}. Resume with "
                "the settings it was written with, or set a new run_name to start over") from e
        verified = None
        digest = _digest_file(folder, rank)
        if same_layout and digest.is_file():
            now = _digest(engine, scheduler)
            if now != digest.read_text().strip():
                raise RuntimeError(f"rank {rank}: resuming {run_name} from step {saved.step} did not restore its parameters, "
                                   f"optimizer state and lr as saved (digest {now} != {digest.read_text().strip()})")
            verified = True
        return replace(saved, world_size=world, zero_stage=zero_stage), verified

    # ------------------------------------------------------------ on storage (the driver, any node)
    @staticmethod
    def read_state(stored) -> TrainState:
        """The TrainState of a checkpoint on storage (`ray.train.Checkpoint`), read alone."""
        with stored.filesystem.open_input_stream(f"{stored.path}/{TRAIN_STATE}") as f:
            return TrainState.from_json(f.read().decode())

    @staticmethod
    def read_weights(stored) -> dict[str, Any]:
        """The exported weights of a final checkpoint on storage."""
        from safetensors.torch import load

        with stored.filesystem.open_input_stream(f"{stored.path}/{WEIGHTS}") as f:
            return load(f.read())

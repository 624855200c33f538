"""How train-clip trains: `ClipTask` on the shared trainer, and `FeatureClipTask`, the same task
on a cheap sweep's cached image features.

On every worker: the LLM2CLIP model its config makes (vision tower, text adapter or CLIP text
tower, logit scale), one DeepSpeed engine (ZeRO-1 by default), InfoNCE or sigmoid loss over
features gathered from every worker, gradient accumulation whose contrastive batch spans every
micro-batch, the logit scale clamped after each step, held-out retrieval after every epoch.
After the run, the trainer saves the model from the final checkpoint's weights (`save_model`).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import ray

from pipeline.clip_data import PAYLOAD, TextStandardisation, draw_caption, normalise_pixels
from pipeline.clip_model import LLM2CLIPConfig
from pipeline.config import PipelineConfig, TrainClipConfig
from pipeline.image_transforms import ImageSpec
from pipeline.metrics import retrieval_recall
from pipeline.stages.clip_samples import ClipInputs, SampleData, TextSource
from pipeline.stages.trainer import StepOutput, TrainPlan, TrainTask, WorkerContext
from pipeline.training import TrainState, total_steps, unseen_batches

MEAN_R1 = "mean_R1"  # validation: mean of image->text and text->image recall@1 over the validation sets


def model_config_for(tc: TrainClipConfig, source: TextSource, vision: str) -> LLM2CLIPConfig:
    """The model a train-clip config builds (the text dim and encoder come from the embeddings)."""
    return LLM2CLIPConfig(
        embed_dim=tc.embed_dim, text_tower=tc.text_tower, text_dim=source.dim, adapter_blocks=tc.adapter_blocks,
        adapter_expansion=tc.adapter_expansion, adapter_dropout=tc.adapter_dropout, init_logit_scale=math.log(1 / tc.init_temperature),
        init_logit_bias=-10.0 if tc.loss == "siglip" else None, image_size=tc.image_size,
        encoder_version=source.encoder_version, text_encoder=source.encoder_ref, vision_source=vision)


def shuffle_buffer_rows(global_batch: int, workers: int) -> int:
    """Rows each worker mixes locally. The stored order is already a seeded hash order and
    the block order changes every epoch; a larger buffer only delays each epoch's first
    batch, which waits for the buffer to fill."""
    return min(10_000, max(2 * global_batch // workers, 64))


def clip_steps(tc: TrainClipConfig, num_train: int) -> int:
    """Optimizer steps of a run on `num_train` images."""
    per_step = tc.num_workers * tc.accum_steps
    if tc.global_batch_size % per_step:
        raise ValueError(f"train_clip.global_batch_size {tc.global_batch_size} must divide into num_workers x accum_steps = "
                         f"{per_step} micro-batches")
    return total_steps(num_train, tc.global_batch_size, tc.epochs, tc.max_steps, "train_clip")


def clip_training(cfg: PipelineConfig, inputs: ClipInputs, data: SampleData, run_name: str, tracker) -> tuple[ClipTask, TrainPlan]:
    """The task and the plan of a train-clip run on the shared trainer (`tracker`: its MLflow run)."""
    plan = train_plan(cfg.train_clip, run_name, data.meta.num_train, tracker.tracking_uri if tracker.enabled else None, tracker.run_id)
    return ClipTask.of(cfg, inputs, data.text_standardisation), plan


def train_plan(tc: TrainClipConfig, run_name: str, num_train: int, tracking_uri: str | None, run_id: str | None,
               checkpoint_epochs: bool = False) -> TrainPlan:
    return TrainPlan(run_name=run_name, total_steps=clip_steps(tc, num_train), num_samples=num_train,
                     micro_batch=tc.global_batch_size // (tc.num_workers * tc.accum_steps), precision=tc.precision, seed=tc.seed,
                     trainer=tc.settings(), optimizer=tc.optimizer(), accum_steps=tc.accum_steps, tracking_uri=tracking_uri,
                     mlflow_run_id=run_id, checkpoint_epochs=checkpoint_epochs)


@dataclass
class ClipTask(TrainTask):
    """Stage 2 on the shared trainer."""

    tc: TrainClipConfig
    source: TextSource
    vision_path: str
    clip_text_path: str | None
    eval_versions: dict[str, str]  # validation set name -> caption version
    shuffle_buffer: int
    text_standardisation: TextStandardisation | None = None  # the adapter's input, from the training split

    @classmethod
    def of(cls, cfg: PipelineConfig, inputs: ClipInputs, text_standardisation: TextStandardisation | None = None) -> ClipTask:
        tc = cfg.train_clip
        return cls(tc=tc, source=inputs.source, vision_path=inputs.vision, clip_text_path=inputs.clip_text,
                   eval_versions={name: inputs.captions.named[v] for name, v in tc.eval_captions.items()},
                   shuffle_buffer=shuffle_buffer_rows(tc.global_batch_size, tc.num_workers), text_standardisation=text_standardisation)

    @property
    def model_config(self) -> LLM2CLIPConfig:
        return model_config_for(self.tc, self.source, self.vision_path)

    def _standardised(self, model):
        """`model` with the training split's input standardisation on its adapter, if any. A
        buffer: set on every model this task builds, since exported weights hold parameters only."""
        if self.text_standardisation is not None and model.config.text_tower == "llm":
            model.text.standardise(self.text_standardisation)
        return model

    def _setup(self, ctx: WorkerContext) -> None:
        """The worker-side state every variant of the task has: its loss, the unreadable images seen."""
        from pipeline.contrastive import ClipLoss, SigLipLoss

        self.loss_fn = ClipLoss(local_loss=True, gather_with_grad=True) if self.tc.loss == "clip" else SigLipLoss(gather_with_grad=True)
        self.rejects: dict[str, tuple[str, str]] = {}
        self._val: list[dict[str, Any]] | None = None  # the held-out batches, read on the first evaluation

    def build(self, ctx: WorkerContext):
        from pipeline.clip_model import LLM2CLIP

        model = self._standardised(LLM2CLIP.build(self.model_config, self.vision_path, self.clip_text_path))
        if self.tc.vision_unlocked_groups is not None:
            model.vision.lock(self.tc.vision_unlocked_groups)
        if self.tc.gradient_checkpointing:
            model.vision.set_grad_checkpointing(True)
        self._setup(ctx)
        self.spec = model.image_spec
        self.flops_per_sample = _forward_flops(model, self.spec.size) * 3 if ctx.plan.trainer.use_gpu else 0.0
        return model.to(ctx.device)

    def param_groups(self, model, optimizer) -> list[dict[str, Any]]:
        return model.param_groups(optimizer.lr, self.tc.text_lr or optimizer.lr, optimizer.weight_decay, self.tc.layer_decay)

    def batches(self, shard, state: TrainState, ctx: WorkerContext):
        size = ctx.plan.micro_batch * ctx.plan.accum_steps
        frames = shard.iter_batches(batch_size=size, batch_format="numpy", prefetch_batches=2,
                                    local_shuffle_buffer_size=self.shuffle_buffer, local_shuffle_seed=self.tc.seed + state.epoch)
        return unseen_batches(self._readable(frames), size, state.trained, id_column="sample_id")

    def _readable(self, frames):
        """Drop (and remember) samples whose image could not be read."""
        readable, unreadable = 0, Counter()
        for frame in frames:
            bad = frame["reason"] != ""
            for i in np.flatnonzero(bad):
                self.rejects[str(frame["image_id"][i])] = (str(frame["reason"][i]), str(frame["detail"][i]))
                unreadable[str(frame["reason"][i])] += 1
            readable += int((~bad).sum())
            yield {k: v[~bad] for k, v in frame.items() if k not in ("reason", "detail")}
        if unreadable and not readable:
            raise RuntimeError(f"none of the {sum(unreadable.values())} images this worker read could be read: {dict(unreadable)} "
                               "(were the image files moved or deleted after ingest?)")

    def _text(self, model, batch: dict[str, Any], device):
        import torch

        if "embedding" in batch:
            return torch.from_numpy(np.asarray(batch["embedding"], dtype=np.float32)).to(device)
        return {k: v.to(device) for k, v in model.text.tokenize(list(batch["text"])).items()}

    def _image_input(self, batch: dict[str, Any], ctx: WorkerContext):
        """What the model's vision side takes: normalised pixels."""
        import torch

        return normalise_pixels(torch.from_numpy(np.ascontiguousarray(batch["pixels"])).to(ctx.device), self.spec.mean, self.spec.std)

    val_batch_size: ClassVar[int] = 64

    def _val_batches(self):
        """The held-out samples whose image could be read (cached features have no `reason`:
        all could), every caption of each. Read once and kept: the split is already
        materialized whole, and a Ray Data pass per epoch cost seconds each on the demo's
        2-step epochs."""
        if self._val is None:
            batches = ray.train.get_dataset_shard("val").iter_batches(batch_size=self.val_batch_size, batch_format="numpy")
            readable = ({k: v[b["reason"] == ""] for k, v in b.items()} if "reason" in b else b for b in batches)
            self._val = [b for b in readable if len(b["sample_id"])]
        return iter(self._val)

    def train_step(self, engine, batch, state: TrainState, ctx: WorkerContext) -> StepOutput:
        import torch

        from pipeline.contrastive import contrastive_step

        engine.train()
        model = engine.module
        pixels = self._image_input(batch, ctx)
        text = self._text(model, batch, ctx.device)
        k, m = ctx.plan.accum_steps, ctx.plan.micro_batch
        micro = [(pixels[i * m:(i + 1) * m], text[i * m:(i + 1) * m] if isinstance(text, torch.Tensor)
                  else {n: t[i * m:(i + 1) * m] for n, t in text.items()}) for i in range(k)]

        def backward(surrogate):
            engine.backward(surrogate, scale_wrt_gas=False)  # contrastive_step's parts already add up to the whole gradient
            engine.step()

        loss = contrastive_step(lambda mb: engine(*mb), micro, self.loss_fn, backward)
        if ctx.world > 1:  # each rank holds its rows' share of the loss: the mean over ranks is the global batch's
            import torch.distributed as dist

            dist.all_reduce(loss)
            loss = loss / ctx.world
        metrics = {"logit_scale": float(model.logit_scale.detach().float().exp().item())}
        return StepOutput(loss=float(loss), sample_ids=batch["sample_id"], metrics=metrics, flops=self.flops_per_sample * len(pixels))

    def after_step(self, engine, ctx: WorkerContext) -> None:
        """Clamp the logit scale to [0, ln 100], in the module and in DeepSpeed's fp32 master copy."""
        import torch
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        from pipeline.clip_model import MAX_LOGIT_SCALE

        param = engine.module.logit_scale
        master = safe_get_full_fp32_param(param)  # a collective under ZeRO: every rank calls it
        if master is not None:
            safe_set_full_fp32_param(param, master.clamp(0.0, MAX_LOGIT_SCALE))
        with torch.no_grad():
            param.clamp_(0.0, MAX_LOGIT_SCALE)

    def evaluate(self, engine, state: TrainState, ctx: WorkerContext) -> dict[str, float]:
        """Image<->text recall@1/5/10 on the held-out split, one set per `eval_captions` entry."""
        if ctx.plan.trainer.zero_stage < 3 and ctx.rank != 0:
            return {}  # rank 0 has every weight; under ZeRO-3 all ranks take part in each forward
        model = engine.module
        model.eval()
        payload = PAYLOAD[self.tc.text_tower]
        images, texts = [], {name: ([], []) for name in self.eval_versions}
        for batch in self._val_batches():
            first = sum(len(x) for x in images)
            images.append(model.encode_image(self._image_input(batch, ctx)).numpy())
            for name, version in self.eval_versions.items():
                owners, items = texts[name]
                for row, (versions, values) in enumerate(zip(batch["caption_version"], batch[payload])):
                    for v, value in zip(versions, values):
                        if v == version:
                            owners.append(first + row)
                            items.append(value)
        model.train()
        if not images:
            return {}
        image_emb = np.concatenate(images)
        out = {}
        for name, (owners, items) in texts.items():
            if not items:
                continue
            text_input = np.stack([np.asarray(x, dtype=np.float32) for x in items]) if payload == "embedding" else list(items)
            text_emb = model.encode_text(text_input).numpy()
            keep = sorted(set(owners))  # images with a caption of this version
            index = {img: i for i, img in enumerate(keep)}
            recall = retrieval_recall(image_emb[keep], text_emb, [index[o] for o in owners])
            # MLflow metric names take no '@': i2t_r@1 -> i2t_R1
            out |= {f"{name}.{k.replace('r@', 'R')}": v for k, v in recall.items()} | {f"{name}.images": float(len(keep))}
        r1 = [v for k, v in out.items() if k.endswith("_R1")]
        if r1:  # one number to compare runs and rank sweep trials by
            out[MEAN_R1] = float(np.mean(r1))
        return out

    def outcome(self, ctx: WorkerContext) -> dict[str, tuple[str, str]]:
        """Unreadable images seen by any rank (image_id -> (reason, detail))."""
        import torch.distributed as dist

        parts: list = [None] * ctx.world
        dist.all_gather_object(parts, dict(self.rejects))  # a copy: the batch thread may still be reading ahead
        return {k: v for part in parts for k, v in part.items()}

    def save_model(self, weights: dict[str, Any], folder: Path) -> None:
        from pipeline.clip_model import LLM2CLIP

        model = self._standardised(LLM2CLIP.build(self.model_config, self.vision_path, self.clip_text_path))
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if unexpected or any(k in dict(model.named_parameters()) for k in missing):
            raise RuntimeError(f"exported weights do not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        model.save_pretrained(folder)


def _forward_flops(model, size: int) -> float:
    """FLOPs of one sample's forward pass, counted by torch (for model FLOP/s on GPUs)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    pixels = torch.zeros(1, 3, size, size)
    text = torch.zeros(1, model.config.text_dim) if model.config.text_tower == "llm" else model.text.tokenize(["a photo"])
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(pixels, text)
    return float(counter.get_total_flops())


# ----------------------------------------------------------------- a cheap sweep's trials
@dataclass
class FeatureClipTask(ClipTask):
    """train-clip's task on cached features: the same step, loss, clamp and validation; the
    vision side is `CachedVision`. A worker holds its shard in memory (features and
    embeddings are small) and draws each epoch's order and captions from (seed, epoch)."""

    image_spec: ImageSpec | None = None  # what the cached features were computed with
    feature_dim: int = 0
    weights: dict[str, float] = field(default_factory=dict)  # caption version -> weight
    val_batch_size: ClassVar[int] = 256

    @property
    def model_config(self) -> LLM2CLIPConfig:
        spec = self.image_spec
        return replace(super().model_config, image_size=spec.size, image_mean=spec.mean, image_std=spec.std)

    def build(self, ctx: WorkerContext):
        from pipeline.clip_model import LLM2CLIP

        model = self._standardised(LLM2CLIP.on_features(self.model_config, self.feature_dim))
        self._setup(ctx)
        ray.data.DataContext.get_current().enable_progress_bars = False  # a trial reads small cached rows, every epoch
        self.flops_per_sample = 0.0
        self._train: dict[str, np.ndarray] | None = None
        return model.to(ctx.device)

    def batches(self, shard, state: TrainState, ctx: WorkerContext):
        if self._train is None:
            frames = list(shard.iter_batches(batch_size=4096, batch_format="numpy"))
            self._train = {k: np.concatenate([f[k] for f in frames]) for k in ("sample_id", "feature", "caption_version", "embedding")}
        rows = self._train
        rng = np.random.default_rng([self.tc.seed, state.epoch, ctx.rank])
        order = rng.permutation(len(rows["sample_id"]))
        picks = [draw_caption(list(rows["caption_version"][i]), self.weights, rng) for i in order]
        keep = [i for i, k in zip(order, picks) if k is not None]
        frame = {"sample_id": rows["sample_id"][keep],
                 "feature": np.stack([np.asarray(rows["feature"][i], dtype=np.float32) for i in keep]),
                 "embedding": np.stack([np.asarray(rows["embedding"][i][k], dtype=np.float32) for i, k in zip(order, picks) if k is not None])}
        return unseen_batches([frame], ctx.plan.micro_batch * ctx.plan.accum_steps, state.trained, id_column="sample_id")

    def _image_input(self, batch: dict[str, Any], ctx: WorkerContext):
        import torch

        features = batch["feature"]
        if features.dtype == object:
            features = np.stack([np.asarray(f, dtype=np.float32) for f in features])
        return torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)).to(ctx.device)

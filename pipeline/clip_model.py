"""The LLM2CLIP model: a Hugging Face vision tower plus a text side, as one nn.Module (no Ray).

* Text side "llm" (LLM2CLIP): the LLM stays out of the process; its caption embeddings
  (pre-computed by `pipeline.text_encoder.TextEncoder`) go through `TextAdapter`, the
  authors' adapter. Text side "clip": a `CLIPTextModel` trained with the vision tower, the
  vanilla-CLIP baseline.
* `forward(pixel_values, text) -> ContrastiveOutput` is the training interface (plain
  positional arguments, so a DeepSpeed engine can call it); `encode_image`, `encode_text`
  and `score` are the inference interface:

      model = LLM2CLIP.from_pretrained("runs/clip/final")
      sims = model.score([Image.open("cat.jpg")], ["a photo of a cat", "a dog"])

* `save_pretrained` writes everything `from_pretrained` needs (weights, our config, the
  backbones' configs, tokenizer, image processor): no training code or original model
  directories are needed to load a trained model.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Iterator, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from pipeline.clip_data import TextStandardisation
from pipeline.contrastive import ContrastiveOutput
from pipeline.image_transforms import ImageSpec, to_pixel_values
from pipeline.model_refs import local_path
from pipeline.text_encoder import TextEncoder

MODEL_CONFIG = "llm2clip_model.json"
WEIGHTS = "model.safetensors"
MAX_LOGIT_SCALE = math.log(100.0)

TextTower = Literal["llm", "clip"]


@dataclass(frozen=True)
class LLM2CLIPConfig:
    """Everything that shapes the model besides the backbones' own configs; saved as JSON."""

    embed_dim: int
    text_tower: TextTower = "llm"
    text_dim: int | None = None  # dim of the cached LLM embeddings (llm tower)
    adapter_blocks: int = 4
    adapter_expansion: int = 2
    adapter_dropout: float = 0.0
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: float | None = None  # set for a sigmoid loss, e.g. -10
    image_size: int | None = None  # None: from the vision directory's image processor
    image_mean: tuple[float, float, float] | None = None
    image_std: tuple[float, float, float] | None = None
    encoder_version: str | None = None  # text encoder the adapter was trained on
    text_encoder: str | None = None  # path or URI of that encoder, for `score`
    text_max_length: int = 77  # clip tower
    vision_source: str = ""  # provenance of the vision tower

    def validate(self) -> LLM2CLIPConfig:
        if self.text_tower not in ("llm", "clip"):
            raise ValueError(f"text_tower must be 'llm' or 'clip', got {self.text_tower!r}")
        if self.embed_dim < 1:
            raise ValueError(f"embed_dim must be >= 1, got {self.embed_dim}")
        if self.text_tower == "llm" and not self.text_dim:
            raise ValueError("text_tower 'llm' needs text_dim (the dim of the cached LLM embeddings)")
        if self.adapter_blocks < 0 or self.adapter_expansion < 1:
            raise ValueError(f"bad adapter shape: blocks={self.adapter_blocks}, expansion={self.adapter_expansion}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LLM2CLIPConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown LLM2CLIPConfig fields {unknown}")
        data = dict(data)
        for key in ("image_mean", "image_std"):
            if data.get(key) is not None:
                data[key] = tuple(float(v) for v in data[key])  # JSON gives lists
        return cls(**data).validate()

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> LLM2CLIPConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def of_model(cls, ref: str | Path) -> LLM2CLIPConfig | None:
        """The config of a saved LLM2CLIP model (a path, storage or MLflow URI); None when `ref`
        names another kind of model (a text encoder, a hub id)."""
        try:
            directory = _local_dir(ref)
        except Exception:  # noqa: BLE001 - a hub id or an encoder URI its own loader resolves
            return None
        path = directory / MODEL_CONFIG
        return cls.load(path) if path.is_file() else None


def _local_dir(ref: str | Path) -> Path:
    """A local folder for a path, storage URI or MLflow model URI (`pipeline.model_refs`); a
    hub id stays as it is."""
    return Path(local_path(str(ref)))


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode and no grad for the block; the previous train/eval mode comes back after."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)


# ---------------------------------------------------------------------------- text side
class AdapterBlock(nn.Module):
    """Pre-norm residual MLP block: x + fc2(dropout(GELU(fc1(LayerNorm(x)))))."""

    def __init__(self, dim: int, expansion: int, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, expansion * dim)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(expansion * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.dropout(F.gelu(self.fc1(self.norm(x)))))


class TextAdapter(nn.Module):
    """The authors' adapter on frozen LLM embeddings: L2-normalise, standardise (identity until
    `standardise` is called), `blocks` residual MLP blocks, LayerNorm, Linear to the joint
    space."""

    def __init__(self, dim: int, blocks: int = 4, expansion: int = 2, embed_dim: int = 1280, dropout: float = 0.0):
        super().__init__()
        self.dim = dim
        self.register_buffer("input_shift", torch.zeros(dim))  # saved with the weights: part of the model
        self.register_buffer("input_scale", torch.ones(dim))
        self.blocks = nn.ModuleList([AdapterBlock(dim, expansion, dropout) for _ in range(blocks)])
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, embed_dim)

    def standardise(self, stats: TextStandardisation) -> None:
        if len(stats.shift) != self.dim or len(stats.scale) != self.dim:
            raise ValueError(f"standardisation of dim {len(stats.shift)} for an adapter of input dim {self.dim}")
        with torch.no_grad():
            self.input_shift.copy_(torch.tensor(stats.shift))
            self.input_scale.copy_(torch.tensor(stats.scale))

    @classmethod
    def of(cls, config: LLM2CLIPConfig) -> TextAdapter:
        return cls(config.text_dim, config.adapter_blocks, config.adapter_expansion, config.embed_dim, config.adapter_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(x.float(), dim=-1)  # the LLM's embedding norm carries no meaning here
        # in float32: the differences between captions are small next to the shared mean
        x = ((x - self.input_shift.float()) * self.input_scale.float()).to(self.proj.weight.dtype)
        for block in self.blocks:
            x = block(x)
        return self.proj(self.norm(x))


class ClipTextTower(nn.Module):
    """The vanilla-CLIP baseline text side: a `CLIPTextModel` and a bias-free projection of
    its output at the EOS token appended to every text."""

    def __init__(self, model: nn.Module, tokenizer, embed_dim: int, max_length: int = 77):
        super().__init__()
        if max_length > model.config.max_position_embeddings:
            raise ValueError(f"max_length {max_length} > the text model's max_position_embeddings {model.config.max_position_embeddings}")
        if tokenizer.eos_token_id is None:
            raise ValueError("the CLIP text tower needs a tokenizer with an EOS token (it pools there)")
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        hidden = model.config.hidden_size
        self.proj = nn.Linear(hidden, embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=hidden**-0.5)

    @classmethod
    def from_pretrained(cls, path: str | Path, embed_dim: int, max_length: int = 77) -> ClipTextTower:
        """A CLIPTextModel directory, or the text half of a CLIPModel directory."""
        from transformers import AutoConfig, AutoTokenizer, CLIPTextModel

        config = AutoConfig.from_pretrained(path)
        config = getattr(config, "text_config", None) or config
        model = CLIPTextModel.from_pretrained(path, config=config, dtype=torch.float32)
        return cls(model, AutoTokenizer.from_pretrained(path), embed_dim, max_length)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Right-padded ids ending in EOS; texts are truncated so the EOS always fits."""
        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        ids = [t[: self.max_length - 1] + [eos] for t in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
        width = max((len(t) for t in ids), default=1)
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, t in enumerate(ids):
            input_ids[i, : len(t)] = torch.tensor(t)
            attention_mask[i, : len(t)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        # Pool at the last real token, the EOS `tokenize` appended. Not `pooler_output`:
        # CLIPTextModel finds EOS by argmax(ids) when eos_token_id == 2 (SmolLM2's) or by
        # the first EOS id, either of which can miss it.
        last = attention_mask.sum(dim=1) - 1
        return self.proj(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])


# ---------------------------------------------------------------------------- vision side
class VisionTower(nn.Module):
    """Any Hugging Face vision backbone plus a bias-free projection of its `pooler_output`.

    Layer ids (for layer-wise lr decay and `lock`) follow parameter registration order:
    parameters before the encoder layers (embeddings, pre-norm) are 0, encoder layer i is
    i + 1, everything after (post-norm, pooling head, our projection) is num_layers + 1."""

    def __init__(self, backbone: nn.Module, embed_dim: int):
        super().__init__()
        self.backbone = backbone
        hidden = backbone.config.hidden_size
        self.proj = nn.Linear(hidden, embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=hidden**-0.5)
        self._layer_ids = self._assign_layer_ids()

    @classmethod
    def from_pretrained(cls, path: str | Path, embed_dim: int) -> VisionTower:
        """A vision model directory, or the vision half of a dual (CLIP/SigLIP) one."""
        from transformers import AutoConfig, AutoModel

        config = AutoConfig.from_pretrained(path)
        config = getattr(config, "vision_config", None) or config
        return cls(AutoModel.from_pretrained(path, config=config, dtype=torch.float32), embed_dim)

    @classmethod
    def from_config(cls, config, embed_dim: int) -> VisionTower:
        """Random-initialised backbone of the given config (weights are loaded afterwards)."""
        from transformers import AutoModel

        return cls(AutoModel.from_config(config), embed_dim)

    @property
    def num_layers(self) -> int:
        return len(self._encoder_layers()[1])

    def _encoder_layers(self) -> tuple[str, nn.ModuleList]:
        """(name, module) of the ModuleList holding the transformer layers."""
        n = self.backbone.config.num_hidden_layers
        for name, module in self.backbone.named_modules():
            if isinstance(module, nn.ModuleList) and len(module) == n:
                return f"backbone.{name}", module
        raise ValueError(f"no ModuleList of num_hidden_layers={n} layers in {type(self.backbone).__name__}")

    def _assign_layer_ids(self) -> dict[str, int]:
        prefix = self._encoder_layers()[0] + "."
        last = self.num_layers + 1
        ids: dict[str, int] = {}
        past_layers = False
        for name, _ in self.named_parameters():
            if name.startswith(prefix):
                ids[name] = int(name[len(prefix) :].split(".")[0]) + 1
                past_layers = True
            else:
                ids[name] = last if past_layers else 0
        return ids

    def layer_id(self, param_name: str) -> int:
        """0 = embeddings, i + 1 = encoder layer i, num_layers + 1 = post-norm/head/projection
        (`param_name` as in this module's named_parameters)."""
        return self._layer_ids[param_name]

    def layer_groups(self) -> list[dict[str, nn.Parameter]]:
        """Parameters by layer id, input to output (num_layers + 2 groups)."""
        groups: list[dict[str, nn.Parameter]] = [{} for _ in range(self.num_layers + 2)]
        for name, param in self.named_parameters():
            groups[self.layer_id(name)][name] = param
        return groups

    def lock(self, unlocked_groups: int = 0) -> None:
        """Freeze the tower except its last `unlocked_groups` layer groups; the projection
        (the joint space is new) always trains."""
        groups = self.layer_groups()
        first_trainable = len(groups) - unlocked_groups
        for i, group in enumerate(groups):
            for param in group.values():
                param.requires_grad_(i >= first_trainable)
        self.proj.weight.requires_grad_(True)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            self.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.backbone.gradient_checkpointing_disable()

    def pooled(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The backbone's pooled features (what the projection maps; a cheap sweep caches them)."""
        out = self.backbone(pixel_values=pixel_values)
        pooled = out.pooler_output
        if pooled is None:  # backbones without a pooling head (e.g. SigLIP with vision_use_head=False)
            pooled = out.last_hidden_state.mean(dim=1)
        return pooled

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.proj(self.pooled(pixel_values))


class CachedVision(nn.Module):
    """The vision side of a cheap sweep trial: `VisionTower`'s projection (same name, same
    init) applied to the frozen tower's pooled features, cached once for all trials. It is
    one layer group, the top one, so `LLM2CLIP.param_groups` gives it the full lr."""

    num_layers = 0

    def __init__(self, feature_dim: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Linear(feature_dim, embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=feature_dim**-0.5)

    def layer_id(self, param_name: str) -> int:
        return 1

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features)


# ---------------------------------------------------------------------------- the model
class LLM2CLIP(nn.Module):
    """Vision tower + text side (`TextAdapter` or `ClipTextTower`) + logit scale (and bias)."""

    def __init__(self, config: LLM2CLIPConfig, vision: VisionTower | CachedVision, text: TextAdapter | ClipTextTower):
        super().__init__()
        config.validate()
        if None in (config.image_size, config.image_mean, config.image_std):
            raise ValueError("config needs image_size, image_mean and image_std (LLM2CLIP.build reads them from the vision directory)")
        expected = TextAdapter if config.text_tower == "llm" else ClipTextTower
        if not isinstance(text, expected):
            raise TypeError(f"text_tower {config.text_tower!r} needs a {expected.__name__}, got {type(text).__name__}")
        if isinstance(text, TextAdapter) and text.dim != config.text_dim:
            raise ValueError(f"adapter input dim {text.dim} != config.text_dim {config.text_dim}")
        self.config = config
        self.vision = vision
        self.text = text
        # shape (1,), not a 0-d scalar: DeepSpeed's bf16/fp16 broadcast views every parameter
        # as bytes, which fails on 0-d tensors; forward returns them as scalars
        self.logit_scale = nn.Parameter(torch.full((1,), float(config.init_logit_scale)))
        bias = None if config.init_logit_bias is None else nn.Parameter(torch.full((1,), float(config.init_logit_bias)))
        self.register_parameter("logit_bias", bias)
        self._text_encoders: dict[str, TextEncoder] = {}  # for `score`, loaded lazily

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, config: LLM2CLIPConfig, vision_path: str | Path, clip_text_path: str | Path | None = None) -> LLM2CLIP:
        """A new model for training: pretrained vision backbone, fresh adapter (or pretrained
        CLIP text model), fresh projections. Image size/mean/std not set in `config` come
        from the vision directory's image processor."""
        config.validate()
        vision_dir = _local_dir(vision_path)
        if None in (config.image_size, config.image_mean, config.image_std):
            spec = ImageSpec.from_processor(vision_dir)
            config = replace(
                config,
                image_size=config.image_size or spec.size,
                image_mean=config.image_mean or spec.mean,
                image_std=config.image_std or spec.std,
            )
        if not config.vision_source:
            config = replace(config, vision_source=str(vision_path))
        vision = VisionTower.from_pretrained(vision_dir, config.embed_dim)
        if config.text_tower == "clip":
            if clip_text_path is None:
                raise ValueError("text_tower 'clip' needs clip_text_path (a CLIPTextModel directory)")
            text = ClipTextTower.from_pretrained(_local_dir(clip_text_path), config.embed_dim, config.text_max_length)
        else:
            text = TextAdapter.of(config)
        return cls(config, vision, text)

    @classmethod
    def on_features(cls, config: LLM2CLIPConfig, feature_dim: int) -> LLM2CLIP:
        """What a cheap sweep trial trains: `CachedVision` (the projection of a frozen tower's
        cached features) instead of the tower, a fresh adapter and logit scale. `config` must
        carry the tower's image size, mean and std (what the features were computed with)."""
        text = TextAdapter.of(config)
        return cls(config, CachedVision(feature_dim, config.embed_dim), text)

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    @property
    def dtype(self) -> torch.dtype:
        return self.vision.proj.weight.dtype

    @property
    def image_spec(self) -> ImageSpec:
        return ImageSpec(self.config.image_size, tuple(self.config.image_mean), tuple(self.config.image_std))

    # ------------------------------------------------------------------ training
    def _text_features(self, text: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
        if self.config.text_tower == "llm":
            return self.text(text.to(device=self.device))  # the adapter standardises in float32, then casts
        return self.text(input_ids=text["input_ids"].to(self.device), attention_mask=text["attention_mask"].to(self.device))

    def forward(self, pixel_values: torch.Tensor, text: torch.Tensor | dict[str, torch.Tensor]) -> ContrastiveOutput:
        """`text`: (b, text_dim) LLM embeddings (llm tower) or input_ids/attention_mask (clip).
        Inputs are cast to the model's dtype (DeepSpeed casts the model, not the batch);
        features are normalised in float32."""
        image = self.vision(pixel_values.to(device=self.device, dtype=self.dtype))
        text_features = self._text_features(text)
        return ContrastiveOutput(
            F.normalize(image.float(), dim=-1),
            F.normalize(text_features.float(), dim=-1),
            self.logit_scale.float().exp().squeeze(0),
            None if self.logit_bias is None else self.logit_bias.float().squeeze(0),
        )

    def clamp_logit_scale_(self) -> None:
        """After every optimizer step: keep exp(logit_scale) in [1, 100] (as CLIP)."""
        with torch.no_grad():
            self.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)

    def param_groups(self, lr: float, text_lr: float, weight_decay: float, layer_decay: float) -> list[dict]:
        """Optimizer groups of the trainable parameters. Vision layer l gets
        lr * layer_decay ** (num_layers + 1 - l); the text side and logit scale/bias text_lr.
        No weight decay on biases, norms, any 1-d parameter, or the logit scale/bias."""
        top = self.vision.num_layers + 1
        groups: dict[str, dict] = {}

        def add(name: str, param: nn.Parameter, group_lr: float, decay: bool) -> None:
            key = f"{name}.{'decay' if decay else 'no_decay'}"
            group = groups.setdefault(key, {"name": key, "params": [], "lr": group_lr, "weight_decay": weight_decay if decay else 0.0})
            group["params"].append(param)

        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            decay = param.ndim >= 2 and not name.endswith(".bias")
            if name.startswith("vision."):
                layer = self.vision.layer_id(name.removeprefix("vision."))
                add(f"vision.layer{layer:02d}", param, lr * layer_decay ** (top - layer), decay)
            elif name.startswith("text."):
                add("text", param, text_lr, decay)
            else:  # logit_scale, logit_bias
                add("logit", param, text_lr, False)
        return list(groups.values())

    # ------------------------------------------------------------------ inference
    def encode_image(self, images: Sequence[Image.Image | str | Path] | torch.Tensor, normalize: bool = True,
                     batch_size: int = 64) -> torch.Tensor:
        """float32 (n, embed_dim) on the CPU. PIL images (any mode) or image files get the eval
        transform; a (b, 3, H, W) tensor is used as given."""
        outs = []
        with _eval_mode(self):
            for start in range(0, len(images), batch_size):
                chunk = images[start : start + batch_size]
                if not isinstance(chunk, torch.Tensor):
                    chunk = [Image.open(img) if isinstance(img, (str, Path)) else img for img in chunk]
                    chunk = torch.from_numpy(np.stack([to_pixel_values(img, self.image_spec) for img in chunk]))
                outs.append(self.vision(chunk.to(device=self.device, dtype=self.dtype)).float().cpu())
        feats = torch.cat(outs) if outs else torch.zeros(0, self.config.embed_dim)
        return F.normalize(feats, dim=-1) if normalize else feats

    def encode_text(self, x: torch.Tensor | np.ndarray | Sequence[str], normalize: bool = True, batch_size: int = 64) -> torch.Tensor:
        """float32 (n, embed_dim) on the CPU. llm tower: (n, text_dim) LLM embeddings from the
        encoder recorded in config.encoder_version; clip tower: a list of strings."""
        if self.config.text_tower == "llm":
            # a copy: arrays from Arrow are read-only, and torch warns on each one it wraps
            x = torch.as_tensor(np.array(x, dtype=np.float32) if isinstance(x, np.ndarray) else x)
            if x.ndim != 2 or x.shape[1] != self.config.text_dim:
                raise ValueError(
                    f"text embeddings have shape {tuple(x.shape)} (dim {x.shape[-1] if x.ndim else None}), but this model's "
                    f"adapter expects dim {self.config.text_dim}: embeddings from text encoder {self.config.encoder_version}"
                )
        elif isinstance(x, str):
            raise TypeError("encode_text takes a list of strings, not one string")
        outs = []
        with _eval_mode(self):
            for start in range(0, len(x), batch_size):
                chunk = x[start : start + batch_size]
                batch = chunk if self.config.text_tower == "llm" else self.text.tokenize(chunk)
                outs.append(self._text_features(batch).float().cpu())
        feats = torch.cat(outs) if outs else torch.zeros(0, self.config.embed_dim)
        return F.normalize(feats, dim=-1) if normalize else feats

    def _scoring_encoder(self, text_encoder: TextEncoder | str | Path | None) -> TextEncoder:
        """The LLM encoder for raw strings; refuses one the adapter was not trained on.
        (A config without encoder_version cannot be checked; only the dim is then.)"""
        if isinstance(text_encoder, TextEncoder):
            encoder = text_encoder
        else:
            ref = text_encoder if text_encoder is not None else self.config.text_encoder
            if ref is None:
                raise ValueError("this model records no text encoder (config.text_encoder): pass text_encoder=")
            if str(ref) not in self._text_encoders:
                self._text_encoders[str(ref)] = TextEncoder.from_pretrained(ref, device=self.device)  # resolves URIs itself
            encoder = self._text_encoders[str(ref)]
        expected = self.config.encoder_version
        if expected is not None and encoder.encoder_version != expected:
            raise ValueError(
                f"text encoder {encoder.source or type(encoder).__name__} has encoder_version {encoder.encoder_version}, "
                f"but this model's adapter was trained on embeddings of {expected}"
            )
        return encoder

    def score(
        self, images: Sequence[Image.Image | str | Path] | torch.Tensor, texts: Sequence[str],
        text_encoder: TextEncoder | str | Path | None = None,
    ) -> torch.Tensor:
        """(n_images, n_texts) cosine similarities of raw images (or image files) and raw strings."""
        return self.encode_image(images) @ self.embed_texts(texts, text_encoder).T

    def embed_texts(self, texts: Sequence[str], text_encoder: TextEncoder | str | Path | None = None) -> torch.Tensor:
        """float32 (n, embed_dim) unit rows of raw strings: the LLM encoder (recorded, or the one
        given, checked by encoder_version) then the adapter; or the CLIP text tower."""
        if self.config.text_tower == "llm":
            return self.encode_text(self._scoring_encoder(text_encoder).encode(list(texts)))
        return self.encode_text(list(texts))

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | Path) -> Path:
        """Weights, config, backbone configs (vision/, text/), tokenizer and an image
        processor describing the eval transform: all `from_pretrained` reads."""
        from safetensors.torch import save_file
        from transformers import CLIPImageProcessorPil

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS), metadata={"format": "pt"})
        self.config.save(directory / MODEL_CONFIG)
        self.vision.backbone.config.save_pretrained(directory / "vision")
        if isinstance(self.text, ClipTextTower):
            self.text.model.config.save_pretrained(directory / "text")
            self.text.tokenizer.save_pretrained(directory / "text")
        spec = self.image_spec
        CLIPImageProcessorPil(  # what encode_image does: shortest side, bicubic, centre crop
            size={"shortest_edge": spec.size},
            crop_size={"height": spec.size, "width": spec.size},
            image_mean=list(spec.mean),
            image_std=list(spec.std),
            resample=Image.Resampling.BICUBIC,
        ).save_pretrained(directory)
        return directory

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> LLM2CLIP:
        """Rebuild from a `save_pretrained` directory (or a reference `pipeline.model_refs`
        resolves); float32 unless `dtype` is given, in eval mode."""
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoTokenizer, CLIPTextConfig, CLIPTextModel

        directory = _local_dir(path)
        config = LLM2CLIPConfig.load(directory / MODEL_CONFIG)
        vision = VisionTower.from_config(AutoConfig.from_pretrained(directory / "vision"), config.embed_dim)
        if config.text_tower == "clip":
            text_model = CLIPTextModel(CLIPTextConfig.from_pretrained(directory / "text"))
            text = ClipTextTower(text_model, AutoTokenizer.from_pretrained(directory / "text"), config.embed_dim, config.text_max_length)
        else:
            text = TextAdapter.of(config)
        model = cls(config, vision, text)
        state = load_file(str(directory / WEIGHTS))
        if isinstance(text, TextAdapter):  # saved before adapters standardised their input: identity
            state = {f"text.{k}": v for k, v in text.state_dict().items() if k.startswith("input_")} | state
        model.load_state_dict(state, strict=True)
        model.to(device=device, dtype=dtype)
        return model.eval()

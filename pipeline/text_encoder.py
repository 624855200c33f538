"""LLM2Vec-style text encoder over any Hugging Face decoder LLM (no Ray).

* Bidirectional attention without copying model code: the model gets a 4D mask
  (batch, 1, n, n) that is True wherever the key is a real token, which transformers uses
  as given in every layer, so each token attends to every real token. Causal mode passes
  the ordinary 2D padding mask.
* Left padding; position ids are counted over real tokens, so padding never shifts them
  (that is what makes `encode` independent of the batch it runs in).
* Pooling: mean (default), weighted mean (later tokens weigh more, as in LLM2Vec), or the
  last token. An optional instruction prefix is encoded but excluded from pooling.
* Optional LoRA adapters (peft) are loaded and merged into the weights.

`TextEncoder.from_pretrained(path_or_id, **options)` / `.encode(texts)` /
`.save_pretrained(dir)` / `.encoder_version` is the API the stages and users share.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from pipeline.versioning import stable_hash

Pooling = Literal["mean", "weighted_mean", "last"]
ENCODER_CONFIG = "llm2clip_encoder.json"
ENCODER_VERSION_PREFIX = "enc-"  # encoder_version = this + a hash; also the embedding store's version name


@dataclass(frozen=True)
class EncoderOptions:
    """What turns an LLM into an encoder; saved beside the weights by save_pretrained."""

    pooling: Pooling = "mean"
    bidirectional: bool = True
    max_length: int = 512
    instruction: str = ""  # prefixed to every text, excluded from pooling

    def validate(self) -> EncoderOptions:
        if self.pooling not in ("mean", "weighted_mean", "last"):
            raise ValueError(f"pooling must be mean, weighted_mean or last, got {self.pooling!r}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        return self


def attention_mask_for(attention_mask: torch.Tensor, bidirectional: bool, dtype: torch.dtype, impl: str) -> torch.Tensor:
    """The mask handed to the model: 2D padding mask (causal) or 4D padding-only mask."""
    if not bidirectional:
        return attention_mask
    keys = attention_mask.bool()[:, None, None, :]  # (b, 1, 1, n): attend to every real key
    mask = keys.expand(-1, 1, attention_mask.shape[1], -1)
    if impl in ("sdpa", "flex_attention", "flash_attention_2", "flash_attention_3"):
        return mask
    # eager attention adds the mask to the scores
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def pool(hidden: torch.Tensor, pool_mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """Pool (b, n, d) hidden states over positions where pool_mask is 1 (left padding)."""
    mask = pool_mask.to(hidden.dtype)
    if pooling == "mean":
        weights = mask
    elif pooling == "weighted_mean":
        weights = torch.cumsum(mask, dim=1) * mask  # 1, 2, 3... over pooled tokens
    elif pooling == "last":
        weights = torch.zeros_like(mask)
        weights[:, -1] = 1.0  # left padding: the last position is the last real token
    else:
        raise ValueError(f"unknown pooling {pooling!r}")
    weights = weights / weights.sum(dim=1, keepdim=True).clamp(min=1e-9)
    return torch.einsum("bnd,bn->bd", hidden.float(), weights.float())


class TextEncoder(nn.Module):
    """A decoder LLM as a sentence encoder. `forward` is differentiable (training);
    `encode` is the batched, length-sorted inference path returning numpy float32."""

    def __init__(self, model: nn.Module, tokenizer, options: EncoderOptions, source: str = ""):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.options = options.validate()
        self.source = source
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self._weights_digest: str | None = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path,
        *,
        pooling: Pooling | None = None,
        bidirectional: bool | None = None,
        max_length: int | None = None,
        instruction: str | None = None,
        lora: str | Path | None = None,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        trust_remote_code: bool = False,
        attn_implementation: str = "sdpa",
    ) -> TextEncoder:
        """Load any decoder LLM (Llama, Qwen2, Mistral, ...) as an encoder: a path, hub id,
        storage URI or MLflow model URI (`pipeline.model_refs`). Options not given come from
        the directory's llm2clip_encoder.json (a saved encoder), else defaults."""
        from transformers import AutoModel, AutoTokenizer

        from pipeline.model_refs import local_path

        source, path_or_id = str(path_or_id), local_path(path_or_id)
        saved = _read_options(path_or_id)
        overrides = {
            k: v
            for k, v in dict(pooling=pooling, bidirectional=bidirectional, max_length=max_length, instruction=instruction).items()
            if v is not None
        }
        options = replace(saved, **overrides).validate()
        if isinstance(dtype, str):
            dtype = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16}[dtype]
        tokenizer = AutoTokenizer.from_pretrained(path_or_id, trust_remote_code=trust_remote_code)
        # Loaded in the checkpoint's own dtype, hashed, then cast: the encoder_version names the
        # weights as saved, so an fp32 checkpoint computed in bf16 keeps its identity.
        model = AutoModel.from_pretrained(path_or_id, dtype="auto", trust_remote_code=trust_remote_code,
                                          attn_implementation=attn_implementation)
        if lora is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(lora)).merge_and_unload()
        model.eval()
        encoder = cls(model, tokenizer, options, source=source)
        encoder.weights_digest()
        model.to(dtype=dtype or torch.float32)
        if device is not None:
            model.to(device)
        return encoder

    def save_pretrained(self, directory: str | Path) -> Path:
        """Save weights, tokenizer and encoder options; reloads with from_pretrained(directory)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        (directory / ENCODER_CONFIG).write_text(
            json.dumps({**asdict(self.options), "encoder_version": self.encoder_version, "source": self.source}, indent=2)
        )
        return directory

    # ------------------------------------------------------------------ identity
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def weights_digest(self) -> str:
        """sha256 over every parameter and buffer as float32 (cached; `refresh_version` after training)."""
        if self._weights_digest is None:
            h = hashlib.sha256()
            for name, tensor in sorted(self.model.state_dict().items()):
                h.update(name.encode())
                # float32 view of the weights as loaded from the checkpoint (from_pretrained hashes before casting)
                h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
            self._weights_digest = h.hexdigest()
        return self._weights_digest

    def refresh_version(self) -> None:
        self._weights_digest = None

    @property
    def encoder_version(self) -> str:
        """Changes whenever weights, pooling, attention mode, max length or instruction change."""
        return ENCODER_VERSION_PREFIX + stable_hash({"weights": self.weights_digest(), **asdict(self.options)}, 16)

    # ------------------------------------------------------------------ compute
    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Left-padded ids, attention mask, and the pool mask that leaves out the instruction."""
        instruction = self.options.instruction
        batch = self.tokenizer(
            [instruction + t for t in texts],
            padding=True,
            truncation=True,
            max_length=self.options.max_length,
            return_tensors="pt",
        )
        pool_mask = batch["attention_mask"].clone()
        if instruction:
            n_instr = len(self.tokenizer(instruction)["input_ids"])
            real_before = torch.cumsum(batch["attention_mask"], dim=1)
            pool_mask = pool_mask * (real_before > n_instr).long()
            # a text truncated to nothing but its instruction still pools something
            empty = pool_mask.sum(dim=1) == 0
            pool_mask[empty] = batch["attention_mask"][empty]
        batch["pool_mask"] = pool_mask
        return batch

    def token_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last-layer hidden states (b, n, d) under this encoder's attention mode."""
        position_ids = (torch.cumsum(attention_mask, dim=1) - 1).clamp(min=0)
        mask = attention_mask_for(attention_mask, self.options.bidirectional, self.model.dtype, self.model.config._attn_implementation)
        return self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False).last_hidden_state

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pool_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled float32 embeddings (b, d) with gradients."""
        hidden = self.token_states(input_ids, attention_mask)
        return pool(hidden, attention_mask if pool_mask is None else pool_mask, self.options.pooling)

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 32, normalize: bool = False, sort_by_length: bool = True) -> np.ndarray:
        """(n, dim) float32 embeddings. Texts are sorted by length so each batch pads little;
        results come back in input order."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        order = np.argsort([-len(t) for t in texts], kind="stable") if sort_by_length else np.arange(len(texts))
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        device = self.device
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            batch = {k: v.to(device) for k, v in self.tokenize([texts[i] for i in idx]).items()}
            emb = self.forward(**batch)
            if normalize:
                emb = torch.nn.functional.normalize(emb, dim=-1)
            out[idx] = emb.float().cpu().numpy()
        return out

    def token_lengths(self, texts: list[str]) -> list[int]:
        """Untruncated token counts (instruction included), for length rules and batching."""
        return [len(ids) for ids in self.tokenizer([self.options.instruction + t for t in texts])["input_ids"]]


def _read_options(path_or_id: str | Path) -> EncoderOptions:
    path = Path(path_or_id) / ENCODER_CONFIG
    if not path.is_file():
        return EncoderOptions()
    saved = json.loads(path.read_text())
    fields = EncoderOptions.__dataclass_fields__
    return EncoderOptions(**{k: v for k, v in saved.items() if k in fields})

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

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from pipeline import versioning
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


def positions(segments: torch.Tensor) -> torch.Tensor:
    """Each token's position within its own sequence: (b, n) segment ids, 0 for padding and
    k > 0 for the k-th sequence of a row (a padded batch: the 0/1 attention mask). A packed row
    restarts at 0 for each sequence, so padding and packing never shift a text's positions."""
    index = torch.arange(segments.shape[1], device=segments.device).expand_as(segments)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return index - torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values


def model_inputs(segments: torch.Tensor, bidirectional: bool, config, dtype: torch.dtype) -> dict:
    """The mask (and the matching keyword arguments) a Hugging Face decoder gets, from segment
    ids (see `positions`); the one place that decides how a batch attends:
    * one sequence per row, no padding, SDPA: no mask at all (SDPA's mask-free kernels), with
      `is_causal` saying whether the attention is causal;
    * causal, one sequence per row: the 2D padding mask (transformers adds causality);
    * otherwise a 4D mask (b, 1, n, n): a token attends to the tokens of its own sequence (and,
      causal, to the earlier ones only). transformers uses a 4D mask as given in every layer.
    Padding attends to padding, never to a text, so no row of the mask is empty."""
    impl = config._attn_implementation
    single = bool((segments <= 1).all())
    window = getattr(config, "sliding_window", None)  # a mask-free causal window would be built anyway
    n = segments.shape[1]
    if single and impl == "sdpa" and bool((segments > 0).all()) and (window is None or n < window):
        return {"attention_mask": None, "is_causal": not bidirectional}
    if single and not bidirectional:
        return {"attention_mask": (segments > 0).long()}
    mask = segments[:, None, :, None] == segments[:, None, None, :]
    if not bidirectional:
        mask = mask & torch.ones(n, n, dtype=torch.bool, device=segments.device).tril()
    if impl not in ("sdpa", "flex_attention"):  # eager attention adds the mask to the scores
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return {"attention_mask": mask}


def pool(hidden: torch.Tensor, pool_mask: torch.Tensor, pooling: Pooling, segments: torch.Tensor | None = None) -> torch.Tensor:
    """Pool (b, n, d) hidden states into one vector per sequence, over the positions where
    pool_mask is 1. `segments` (see `positions`) marks the sequences; None: one per row, left
    padded. Sequences come out in row order, and in order within a row; a padded row is one
    sequence even when it holds no token (its vector is zero)."""
    if segments is None:
        segments = torch.ones_like(pool_mask)
    mask = pool_mask.to(torch.float32)
    if pooling == "mean":
        weights = mask
    elif pooling == "weighted_mean":  # 1, 2, 3... over each sequence's pooled tokens
        counted = torch.cumsum(mask, dim=1)
        start = torch.arange(segments.shape[1], device=segments.device) - positions(segments)
        weights = (counted - torch.gather(counted - mask, 1, start)) * mask
    elif pooling == "last":  # the last token of each sequence (left padding: the row's end)
        following = torch.full_like(segments, -1)
        following[:, :-1] = segments[:, 1:]
        weights = ((segments > 0) & (segments != following)).to(torch.float32)
    else:
        raise ValueError(f"unknown pooling {pooling!r}")
    per_row = segments.max(dim=1).values.clamp(min=1)
    first = torch.cumsum(per_row, dim=0) - per_row
    real = segments > 0
    sequence = (first[:, None] + segments - 1)[real]
    total = int(per_row.sum())
    sums = torch.zeros(total, hidden.shape[-1], dtype=torch.float32, device=hidden.device)
    sums = sums.index_add(0, sequence, hidden.float()[real] * weights[real][:, None])
    norms = torch.zeros(total, dtype=torch.float32, device=hidden.device).index_add(0, sequence, weights[real])
    return sums / norms.clamp(min=1e-9)[:, None]


def pack_rows(lengths: list[int], row_tokens: int) -> list[list[int]]:
    """Sequences (by index) into rows of at most `row_tokens` tokens, longest first, each into
    the first row it fits (first-fit decreasing). A sequence longer than a row gets its own."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fit = next((r for r, free in enumerate(room) if lengths[i] <= free), None)
        if fit is None:
            rows.append([i])
            room.append(row_tokens - lengths[i])
        else:
            rows[fit].append(i)
            room[fit] -= lengths[i]
    return rows


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
            # float32 view of the weights as loaded from the checkpoint (from_pretrained hashes before casting)
            self._weights_digest = versioning.weights_digest(self.model)
        return self._weights_digest

    def refresh_version(self) -> None:
        self._weights_digest = None

    @property
    def encoder_version(self) -> str:
        """Changes whenever weights, pooling, attention mode, max length or instruction change."""
        return ENCODER_VERSION_PREFIX + stable_hash({"weights": self.weights_digest(), **asdict(self.options)}, 16)

    # ------------------------------------------------------------------ compute
    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Each text's token ids, instruction first, truncated to max_length; no padding."""
        instruction = self.options.instruction
        return self.tokenizer([instruction + t for t in texts], truncation=True, max_length=self.options.max_length)["input_ids"]

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """A padded batch, one text per row: left-padded ids, the attention mask (the segment ids
        of `positions`: 1 on the text, 0 on padding), and the pool mask that leaves out the
        instruction."""
        return self.collate([[ids] for ids in self.token_ids(texts)])

    def pack(self, texts: list[str], row_tokens: int | None = None) -> dict[str, torch.Tensor]:
        """A packed batch: the texts in rows of at most `row_tokens` tokens (default: the longest
        text's), several to a row, each attending only to itself. `order[j]` is the text whose
        embedding `forward` returns j-th unless it is handed `order` too."""
        ids = self.token_ids(texts)
        lengths = [len(x) for x in ids]
        rows = pack_rows(lengths, max(row_tokens or 0, max(lengths, default=1)))
        batch = self.collate([[ids[i] for i in row] for row in rows])
        batch["order"] = torch.tensor([i for row in rows for i in row], dtype=torch.long)
        return batch

    def collate(self, rows: list[list[list[int]]]) -> dict[str, torch.Tensor]:
        """Rows of token-id sequences into left-padded tensors: input_ids, attention_mask (segment
        ids: k on the row's k-th sequence, 0 on padding) and pool_mask (a sequence's tokens after
        its instruction; all of them when it is nothing but its instruction)."""
        n_instr = len(self.tokenizer(self.options.instruction)["input_ids"]) if self.options.instruction else 0
        width = max((sum(len(s) for s in row) for row in rows), default=0)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        segments = torch.zeros((len(rows), width), dtype=torch.long)
        pool_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            at = width - sum(len(s) for s in row)
            for k, seq in enumerate(row, start=1):
                input_ids[r, at : at + len(seq)] = torch.tensor(seq, dtype=torch.long)
                segments[r, at : at + len(seq)] = k
                skip = n_instr if len(seq) > n_instr else 0
                pool_mask[r, at + skip : at + len(seq)] = 1
                at += len(seq)
        return {"input_ids": input_ids, "attention_mask": segments, "pool_mask": pool_mask}

    def token_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last-layer hidden states (b, n, d) under this encoder's attention mode; `attention_mask`
        is a padding mask or a packed batch's segment ids."""
        inputs = model_inputs(attention_mask, self.options.bidirectional, self.model.config, self.model.dtype)
        return self.model(input_ids=input_ids, position_ids=positions(attention_mask), use_cache=False, **inputs).last_hidden_state

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pool_mask: torch.Tensor | None = None,
                order: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled float32 embeddings (one per text) with gradients; with a packed batch's `order`,
        in the order of the texts it was packed from."""
        hidden = self.token_states(input_ids, attention_mask)
        pooled = pool(hidden, attention_mask if pool_mask is None else pool_mask, self.options.pooling, attention_mask)
        return pooled if order is None else pooled[torch.argsort(order)]

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 32, normalize: bool = False, sort_by_length: bool = True,
               packed: bool = False) -> np.ndarray:
        """(n, dim) float32 embeddings, in input order. Texts are sorted by token count so each
        batch of `batch_size` pads little (a batch of equal lengths takes the mask-free path).
        `packed`: rows of the longest text's length, several texts to a row, about `batch_size`
        texts' tokens a forward pass; no padding beyond each row's end."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        ids = self.token_ids(texts)
        lengths = np.array([len(x) for x in ids])
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if packed:
            rows = pack_rows(lengths.tolist(), int(lengths.max()))
            per_pass = max(1, round(batch_size * lengths.mean() / lengths.max()))
            batches = [rows[i : i + per_pass] for i in range(0, len(rows), per_pass)]
        else:
            order = np.argsort(-lengths, kind="stable") if sort_by_length else np.arange(len(texts))
            batches = [[[int(i)] for i in order[s : s + batch_size]] for s in range(0, len(texts), batch_size)]
        device = self.device
        for rows in batches:
            batch = {k: v.to(device) for k, v in self.collate([[ids[i] for i in row] for row in rows]).items()}
            emb = self.forward(**batch)
            if normalize:
                emb = torch.nn.functional.normalize(emb, dim=-1)
            out[[i for row in rows for i in row]] = emb.float().cpu().numpy()
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

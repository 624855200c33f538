"""Stage 1 model pieces, without Ray or DeepSpeed: the trainable encoder (a causal LM with
LoRA adapters, used as a `TextEncoder` for the contrastive loss and through its LM head
for MNTP), one step's loss for each phase, and merging the adapters into a saved encoder.

The Ray Train loop (pipeline/stages/finetune_text.py) wraps `TrainableEncoder` in
DeepSpeed; everything here also runs in a plain process, which is what the tests and the
GPU step benchmark use.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.config import FinetuneTextConfig
from pipeline.contrastive import ContrastiveLoss
from pipeline.mntp import mask_token_id, mntp_inputs
from pipeline.text_encoder import EncoderOptions, TextEncoder, model_inputs, positions

def lora_options(cfg: FinetuneTextConfig, layers: int) -> dict[str, Any]:
    """peft's LoraConfig keywords for the recipe; `top_layers` adapts only the top N of `layers`."""
    lora = cfg.lora
    options = dict(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules, bias="none")
    if lora.top_layers is not None:
        if lora.top_layers > layers:
            raise ValueError(f"finetune_text.lora.top_layers: {lora.top_layers} is more than the model's {layers} layers")
        options["layers_to_transform"] = list(range(layers - lora.top_layers, layers))
    return options


class TrainableEncoder(nn.Module):
    """A causal LM with LoRA on its projections. `forward(kind="embed", ...)` returns pooled
    embeddings (bidirectional attention, mean pooling by default); `forward(kind="mntp", ...)`
    returns the MNTP loss. One module, so DeepSpeed wraps one thing."""

    def __init__(self, base_path: str, cfg: FinetuneTextConfig, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
        super().__init__()
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from pipeline.model_refs import local_path

        local = local_path(base_path)  # a storage or MLflow URI: into this node's model cache
        tokenizer = AutoTokenizer.from_pretrained(local, trust_remote_code=trust_remote_code)
        lm = AutoModelForCausalLM.from_pretrained(local, dtype=dtype, trust_remote_code=trust_remote_code, attn_implementation="sdpa")
        self.peft = get_peft_model(lm, LoraConfig(**lora_options(cfg, lm.config.num_hidden_layers)))
        options = EncoderOptions(pooling=cfg.pooling, bidirectional=cfg.bidirectional, max_length=cfg.max_length)
        # The encoder view shares the (LoRA-injected) decoder stack with the LM. It is kept
        # out of the module tree so every parameter has one name (DeepSpeed, state dicts).
        self.__dict__["encoder"] = TextEncoder(self.peft.get_base_model().model, tokenizer, options, source=base_path)
        self.mask_id = mask_token_id(tokenizer)
        self.mask_ratio = cfg.mntp_mask_ratio

    @property
    def tokenizer(self):
        return self.encoder.tokenizer

    def forward(self, kind: str, input_ids: torch.Tensor, attention_mask: torch.Tensor, pool_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, order: torch.Tensor | None = None) -> torch.Tensor:
        if kind == "embed":
            return self.encoder(input_ids, attention_mask, pool_mask, order)
        if kind == "mntp":
            lm = self.peft.get_base_model()
            inputs = model_inputs(attention_mask, True, lm.config, lm.dtype)
            return lm(input_ids=input_ids, position_ids=positions(attention_mask), labels=labels, use_cache=False, **inputs).loss
        raise ValueError(f"unknown forward kind {kind!r}")

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self.named_parameters() if p.requires_grad}


def contrastive_loss(model: nn.Module, batch: dict[str, list[str]], loss_fn: ContrastiveLoss, device: torch.device,
                     packed: bool = False) -> torch.Tensor:
    """InfoNCE of one batch of (first, second[, negative]) captions; `model` may be the
    DeepSpeed engine wrapping a TrainableEncoder. `packed`: every caption of the batch in one
    forward pass, several to a row (short captions fill the room beside long ones); else one
    padded pass per column."""
    encoder_view: TextEncoder = _unwrap(model).encoder
    columns = [list(batch["first"]), list(batch["second"])]
    if batch.get("negative") is not None and len(batch["negative"]):
        columns.append(list(batch["negative"]))
    if packed:
        tokens = {k: v.to(device) for k, v in encoder_view.pack([t for c in columns for t in c]).items()}
        embedded = model("embed", **tokens).split([len(c) for c in columns])
    else:
        embedded = [model("embed", **{k: v.to(device) for k, v in encoder_view.tokenize(c).items()}) for c in columns]
    return loss_fn(embedded[0], embedded[1], embedded[2] if len(embedded) > 2 else None)


def mntp_loss(model: nn.Module, texts: list[str], device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    inner = _unwrap(model)
    tokens = inner.encoder.tokenize(texts)
    vocab = inner.peft.get_base_model().config.vocab_size
    corrupted, labels = mntp_inputs(tokens["input_ids"], tokens["attention_mask"], inner.mask_id, vocab, inner.mask_ratio, generator)
    return model("mntp", corrupted.to(device), tokens["attention_mask"].to(device), labels=labels.to(device))


def merged_encoder(base_path: str, cfg: FinetuneTextConfig, lora_state: dict[str, torch.Tensor], trust_remote_code: bool = False) -> TextEncoder:
    """A plain TextEncoder whose weights are the base model with the trained adapters merged
    in (fp32 merge), loadable later by `TextEncoder.from_pretrained(dir)`."""
    model = TrainableEncoder(base_path, cfg, dtype=torch.float32, trust_remote_code=trust_remote_code)
    missing = set(lora_state) - {n for n, _ in model.named_parameters()}
    if missing:
        raise KeyError(f"adapter weights do not match the model: {sorted(missing)[:3]}...")
    model.load_state_dict(lora_state, strict=False)
    merged = model.peft.merge_and_unload()
    # Training may truncate shorter than the encoder reads: mean pooling works at any length.
    options = dataclasses.replace(model.encoder.options, max_length=cfg.encoder_max_length)
    encoder = TextEncoder(merged.model, model.tokenizer, options, source=base_path)
    encoder.eval()
    return encoder


def save_merged(base_path: str, cfg: FinetuneTextConfig, lora_state: dict[str, torch.Tensor], out: str | Path,
                trust_remote_code: bool = False) -> tuple[Path, str]:
    encoder = merged_encoder(base_path, cfg, lora_state, trust_remote_code)
    path = encoder.save_pretrained(out)
    return path, encoder.encoder_version


def _unwrap(model: Any) -> TrainableEncoder:
    return model.module if hasattr(model, "module") else model

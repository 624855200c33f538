"""Masked next-token prediction (MNTP), LLM2Vec's optional first stage.

A share of the real tokens is chosen (20% by default) and, BERT-style, 80% of those are
replaced by a mask token, 10% by a random token and 10% kept. With bidirectional attention
the model must restore them, but the prediction for position i is read from the output at
position i-1: the causal-LM shift is kept, so the LM head is used as trained. Hugging Face
causal-LM losses shift labels by one themselves, so labels sit at the masked positions.
"""

from __future__ import annotations

import torch


def mask_token_id(tokenizer) -> int:
    """The tokenizer's mask token, else '_' (what LLM2Vec uses for Llama), else unk/eos."""
    if tokenizer.mask_token_id is not None:
        return int(tokenizer.mask_token_id)
    underscore = tokenizer.convert_tokens_to_ids("_")
    if underscore is not None and underscore != tokenizer.unk_token_id:
        return int(underscore)
    return int(tokenizer.unk_token_id if tokenizer.unk_token_id is not None else tokenizer.eos_token_id)


def mntp_inputs(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    mask_id: int,
    vocab_size: int,
    ratio: float = 0.2,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(corrupted input ids, labels with -100 where nothing is predicted)."""
    real = attention_mask.bool()
    # A token can only be predicted from a real token before it (left padding).
    has_prev = torch.zeros_like(real)
    has_prev[:, 1:] = real[:, :-1]
    candidates = real & has_prev
    chosen = (torch.rand(input_ids.shape, generator=generator) < ratio).to(input_ids.device) & candidates
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    roll = torch.rand(input_ids.shape, generator=generator).to(input_ids.device)
    corrupted = input_ids.clone()
    corrupted[chosen & (roll < 0.8)] = mask_id
    random_slots = chosen & (roll >= 0.8) & (roll < 0.9)
    corrupted[random_slots] = torch.randint(vocab_size, input_ids.shape, generator=generator).to(input_ids.device)[random_slots]
    return corrupted, labels

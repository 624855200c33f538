"""Captioning rules, engine-free: prompts, clean-up, caption versions. The vLLM engine
that applies them is `pipeline.stages.captioner.Captioner`.

- Prompts are rendered by the model's own chat template (the processor's for a VLM, which
  places the image tokens), never by a hand-written string per model family.
- `clean_caption` applies the post-processing rules; what they drop gets a reason.
- `caption_version` hashes everything that decides the text (model, prompt, sampling,
  rules, mode): same inputs, same version; change any of them and a new version appears.
"""

from __future__ import annotations

import hashlib
import json
import re
import zlib
from pathlib import Path
from typing import Any


from pipeline.config import PipelineConfig, PostprocessConfig, RecaptionConfig
from pipeline.model_refs import is_remote_uri
from pipeline.uri import is_uri, list_files
from pipeline.versioning import stable_hash



class Rejected:
    """Reasons a generated caption (or its request) is rejected."""

    NO_SOURCE_CAPTION = "no_source_caption"
    PROMPT_TOO_LONG = "prompt_too_long"
    GENERATION_ERROR = "generation_error"
    EMPTY = "empty_caption"
    TOO_SHORT = "too_short"
    UNFINISHED = "unfinished"
    DEGENERATE = "degenerate_repetition"


# ----------------------------------------------------------------- versions
_MODEL_FILES = (
    "config.json", "generation_config.json", "tokenizer_config.json", "chat_template.jinja",
    "chat_template.json", "processor_config.json", "preprocessor_config.json", "special_tokens_map.json",
)


def model_fingerprint(ref: str) -> str:
    """Identity of a model without reading its weights: for a local folder, its config and
    template files plus the names and sizes of its weight files; on storage (a URI), the names and
    sizes of its files; for a hub id or an MLflow URI, the reference."""
    if is_uri(ref):
        if not is_remote_uri(ref):
            return ref
        files = [f"{f.base_name}:{f.size}" for f in list_files(ref)]
        return f"{ref.rstrip('/').rsplit('/', 1)[-1]}@{stable_hash(files, 16)}"
    path = Path(ref)
    if not path.is_dir():
        return ref
    digest = hashlib.sha256()
    for name in _MODEL_FILES:
        if (path / name).is_file():
            digest.update(name.encode() + b"\0" + (path / name).read_bytes())
    for weights in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")) + sorted(path.glob("*.gguf")):
        digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
    return f"{path.name}@{digest.hexdigest()[:16]}"


def caption_version(cfg: RecaptionConfig, model: str) -> str:
    """A stable name for what this config would write: `{mode}-{hash}`."""
    identity = {
        "mode": cfg.mode,
        "model": model_fingerprint(model),
        "prompt": cfg.prompt,
        "system_prompt": cfg.system_prompt,
        "text_source": cfg.text_source if cfg.mode == "text" else None,
        "sampling": cfg.sampling.model_dump(mode="json"),
        "postprocess": cfg.postprocess.model_dump(mode="json"),
    }
    return f"{cfg.mode}-{stable_hash(identity, 12)}"


DEFAULT_MAX_MODEL_LEN = 4096
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def model_context_length(ref: str) -> int | None:
    """A local model's own context length, from its config.json (or its text model's); None
    when it cannot be read without loading the model (a hub id, an odd config)."""
    if is_uri(ref):
        return None  # read by the engine's actor, which resolves the model where it loads it
    path = Path(ref) / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    for section in (config, config.get("text_config") or {}):
        for key in _CONTEXT_KEYS:
            if isinstance(section.get(key), int):
                return section[key]
    return None


def fit_context(cfg: RecaptionConfig, model: str) -> RecaptionConfig:
    """`max_model_len` that the model can hold: the default capped at the model's context; a
    value set longer than it fails here, on the driver, in one line (vLLM would fail inside
    every actor it starts)."""
    context = model_context_length(model)
    if cfg.max_model_len is None:
        return cfg.model_copy(update={"max_model_len": min(DEFAULT_MAX_MODEL_LEN, context or DEFAULT_MAX_MODEL_LEN)})
    if context and cfg.max_model_len > context:
        raise ValueError(f"recaption.max_model_len {cfg.max_model_len} is longer than the context of {model} ({context} tokens): "
                         f"set it to {context} or less, or leave it unset")
    return cfg


def recaption_model(cfg: PipelineConfig) -> str:
    """The model the recaption section runs: recaption.model, else the VLM (image mode) or LLM (text mode)."""
    rc = cfg.recaption
    model = rc.model or (cfg.models.vlm if rc.mode == "image" else cfg.models.llm)
    if not model:
        raise ValueError("recaption.mode is image but neither recaption.model nor models.vlm names a vision-language model")
    return model


def configured_caption_version(cfg: PipelineConfig) -> str:
    """The caption version the config's recaption section writes."""
    return caption_version(cfg.recaption, recaption_model(cfg))


def prompt_id(cfg: RecaptionConfig) -> str:
    return stable_hash({"prompt": cfg.prompt, "system_prompt": cfg.system_prompt}, 12)


# ----------------------------------------------------------------- prompts
def fill_instruction(template: str, captions: list[str]) -> str:
    """The user message: {caption} is the first original caption, {captions} all of them."""
    first = captions[0] if captions else ""
    return template.format(caption=first, captions="; ".join(captions))


def chat_prompt(templater: Any, instruction: str, system_prompt: str | None, with_image: bool) -> str:
    """Render one prompt with the model's chat template (a tokenizer, or a VLM processor
    that also places the image tokens)."""
    content: Any = [{"type": "image"}, {"type": "text", "text": instruction}] if with_image else instruction
    messages = [{"role": "user", "content": content}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt if not with_image else [{"type": "text", "text": system_prompt}]})
    if not getattr(templater, "chat_template", None):
        raise ValueError(
            "the model has no chat template: recaptioning needs an instruction-tuned (chat) model, "
            "e.g. SmolLM2-Instruct for text mode or SmolVLM-Instruct for image mode"
        )
    return templater.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


# ----------------------------------------------------------------- clean-up
_SPECIAL_TOKENS = re.compile(r"<\|[^|>]{1,40}\|>|<end_of_utterance>|<fake_token_around_image>|<image>|</?s>")
_ROLE_LABEL = re.compile(r"^\s*(?:assistant|caption|description|answer)\s*:\s*", re.IGNORECASE)
_PREAMBLE = re.compile(
    r"^\s*(?:(?:sure|certainly|of course|absolutely|okay|ok)\b[,!.]?\s*)?"
    r"(?:(?:here(?:'s| is| are)|below is)\b[^:\n]{0,80}:\s*)",
    re.IGNORECASE,
)
_BARE_OPENER = re.compile(r"^\s*(?:sure|certainly|of course|absolutely)\s*[!.,]\s*", re.IGNORECASE)
_MARKDOWN = re.compile(r"(\*\*|__|`|^#+\s*|^\s*(?:[-*•]|\d+[.)])\s+)", re.MULTILINE)
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s|$)")


def compression_ratio(text: str) -> float:
    """Bytes per zlib-compressed byte: ~1-2 for prose, high for text that loops."""
    data = text.encode()
    return len(data) / len(zlib.compress(data)) if data else 0.0


def clean_caption(text: str, finish_reason: str | None, rules: PostprocessConfig) -> tuple[str, str, str]:
    """(clean text, reject reason or '', detail) by the rules, in order: strip chat
    artefacts and markdown, handle a cut-off ending, drop degenerate or too-short text."""
    text = _SPECIAL_TOKENS.sub(" ", text)
    if rules.strip_preamble:
        text = _ROLE_LABEL.sub("", text)
        text = _PREAMBLE.sub("", text, count=1)
        text = _BARE_OPENER.sub("", text, count=1)
    text = _MARKDOWN.sub("", text)
    text = " ".join(text.split()).strip().strip("\"'“”").strip()
    if not text:
        return "", Rejected.EMPTY, "nothing left after removing chat artefacts"
    if finish_reason == "length":
        if rules.unfinished == "reject":
            return text, Rejected.UNFINISHED, "generation hit max_tokens"
        if rules.unfinished == "trim":
            ends = list(_SENTENCE_END.finditer(text))
            if not ends:
                return text, Rejected.UNFINISHED, "hit max_tokens before finishing one sentence"
            text = text[: ends[-1].end()]
    ratio = compression_ratio(text)
    if ratio > rules.max_compression_ratio:
        return text, Rejected.DEGENERATE, f"compression ratio {ratio:.2f} > {rules.max_compression_ratio}"
    words = len(text.split())
    if words < rules.min_words:
        return text, Rejected.TOO_SHORT, f"{words} words < min_words {rules.min_words}"
    return text, "", ""

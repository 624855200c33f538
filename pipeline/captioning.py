"""Captioning with vLLM, without Ray: prompts, generation, clean-up, caption versions.

- Prompts are rendered by the model's own chat template (the processor's for a VLM, which
  places the image tokens), never by a hand-written string per model family.
- `Captioner` holds one `vllm.LLM`; it is what a Ray Data actor wraps, and what a
  benchmark or a notebook can use directly. One bad request never fails a batch.
- `clean_caption` applies the post-processing rules; what they drop gets a reason.
- `caption_version` hashes everything that decides the text (model, prompt, sampling,
  rules, mode): same inputs, same version; change any of them and a new version appears.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from pipeline.config import PostprocessConfig, RecaptionConfig
from pipeline.versioning import stable_hash

log = logging.getLogger(__name__)


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
    template files plus the names and sizes of its weight files; for a hub id, the id."""
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


# ----------------------------------------------------------------- generation
@dataclass(frozen=True)
class CaptionRequest:
    instruction: str
    image: Image.Image | None = None


@dataclass(frozen=True)
class Generation:
    texts: list[str]
    finish_reasons: list[str | None]
    num_tokens: int
    reason: str = ""  # set when the request produced nothing (a Rejected reason)
    detail: str = ""


class Captioner:
    """One vLLM engine plus the model's chat template; `generate` never raises for one
    bad request: the batch is retried request by request and the failures are reported."""

    def __init__(self, model: str, cfg: RecaptionConfig, precision: str, use_gpu: bool, trust_remote_code: bool = False):
        # One engine per process (a Ray actor), so its environment is ours to set; vLLM
        # reads these when the engine starts.
        os.environ.update(cfg.engine_env)
        from vllm import LLM, SamplingParams  # noqa: I001 - imported here: only engine processes need vLLM

        self.cfg = cfg
        self.with_image = cfg.mode == "image"
        engine: dict[str, Any] = dict(
            model=model,
            dtype={"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(precision, "auto"),
            max_model_len=cfg.max_model_len,
            seed=cfg.sampling.seed,
            tensor_parallel_size=cfg.tensor_parallel_size,
            trust_remote_code=trust_remote_code,
            # CUDA graphs need a GPU; on CPU the KV cache is sized in bytes because
            # gpu_memory_utilization would be a share of a NUMA node's RAM.
            enforce_eager=not use_gpu,
        )
        if cfg.kv_cache_bytes or not use_gpu:
            engine["kv_cache_memory_bytes"] = cfg.kv_cache_bytes or 512 * 2**20
        else:
            engine["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        if self.with_image:
            engine["limit_mm_per_prompt"] = {"image": 1}
        self.llm = LLM(**engine)
        self.tokenizer = self.llm.get_tokenizer()
        if self.with_image:
            from transformers import AutoProcessor

            self.templater = AutoProcessor.from_pretrained(model, trust_remote_code=trust_remote_code)
        else:
            self.templater = self.tokenizer
        s = cfg.sampling
        self.sampling = SamplingParams(
            n=s.captions_per_image, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k if s.top_k > 0 else -1,
            repetition_penalty=s.repetition_penalty, max_tokens=s.max_tokens,
            # Per-request seeds make sampling independent of batching, but vLLM's CPU sampler
            # fails on them ("CPU Generator does not use offset"); on CPU the engine seed rules.
            seed=s.seed if use_gpu else None,
        )

    def prompt(self, instruction: str) -> str:
        return chat_prompt(self.templater, instruction, self.cfg.system_prompt, self.with_image)

    def prompt_tokens(self, prompt: str) -> int:
        return len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])

    def generate(self, requests: list[CaptionRequest]) -> list[Generation]:
        results: list[Generation | None] = [None] * len(requests)
        inputs: dict[int, Any] = {}
        budget = self.cfg.max_model_len - self.cfg.sampling.max_tokens
        for i, r in enumerate(requests):
            prompt = self.prompt(r.instruction)
            n = self.prompt_tokens(prompt)  # text tokens only; image tokens are checked by vLLM
            if n > budget:
                detail = f"{n} prompt tokens + max_tokens {self.cfg.sampling.max_tokens} > max_model_len {self.cfg.max_model_len}"
                results[i] = Generation([], [], 0, Rejected.PROMPT_TOO_LONG, detail)
            else:
                inputs[i] = {"prompt": prompt, "multi_modal_data": {"image": r.image}} if self.with_image else prompt
        try:
            outputs = self.llm.generate(list(inputs.values()), self.sampling, use_tqdm=False) if inputs else []
            for i, out in zip(inputs, outputs):
                results[i] = _generation(out)
        except Exception as e:  # noqa: BLE001 - find the bad request(s), keep the rest
            log.warning("batch of %d failed (%s: %s); retrying one by one", len(inputs), type(e).__name__, e)
            for i, one in inputs.items():
                try:
                    results[i] = _generation(self.llm.generate([one], self.sampling, use_tqdm=False)[0])
                except Exception as e1:  # noqa: BLE001
                    if type(e1).__name__ == "EngineDeadError":
                        raise  # the engine, not the input, failed: fail the task, reject nothing
                    results[i] = Generation([], [], 0, Rejected.GENERATION_ERROR, f"{type(e1).__name__}: {e1}"[:500])
        return results  # type: ignore[return-value]


def _generation(output: Any) -> Generation:
    return Generation(
        texts=[c.text for c in output.outputs],
        finish_reasons=[c.finish_reason for c in output.outputs],
        num_tokens=sum(len(c.token_ids) for c in output.outputs),
    )

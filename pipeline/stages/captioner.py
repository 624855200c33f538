"""The vLLM engine of the recaption job: one `vllm.LLM` plus the model's chat template.

`Captioner` is what each Ray Data actor of `jobs.recaption` holds, and what a benchmark can
drive directly. It lives with the stages because it owns an engine; the prompt, clean-up
and version rules it applies are engine-free (`pipeline.captioning`).
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from typing import Any

from PIL import Image

from pipeline.captioning import Rejected, chat_prompt, fit_context
from pipeline.config import RecaptionConfig
from pipeline.model_refs import local_path

log = logging.getLogger(__name__)


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
        # reads these when the engine starts. Its INFO log (a full engine-config dump per
        # actor) drowns the job's own; engine_env {VLLM_LOGGING_LEVEL: INFO} brings it back.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        os.environ.update(cfg.engine_env)
        from vllm import LLM, SamplingParams  # noqa: I001 - imported here: only engine processes need vLLM

        model = local_path(model)  # a storage or MLflow URI: into this node's model cache
        cfg = fit_context(cfg, model)  # as the driver did (a direct user, e.g. a benchmark, may not have)
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
        self._set_engine_threads = None
        if not use_gpu and cfg.engine_threads:
            import torch

            # The engine computes in this process, on torch's (OpenMP's) threads. OpenMP counts
            # them per calling thread, and Ray Data may call `generate` from another thread than
            # this one: its attention metadata was then planned for Ray's 1 thread and failed the
            # 2-thread kernel's check. So every call sets them, with torch's own setter (vLLM's CPU
            # worker replaces `torch.set_num_threads` with a no-op once it has started).
            self._set_engine_threads = functools.partial(torch.set_num_threads, cfg.engine_threads)
            self._set_engine_threads()
            os.environ["OMP_NUM_THREADS"] = str(cfg.engine_threads)  # what vLLM reads for its own thread choices
        if not use_gpu and cfg.tensor_parallel_size == 1:
            # On CPU the engine core and its worker run in this process: two fewer Python processes
            # to start (engine ready in ~4 s instead of ~20 s here, same output). On GPUs vLLM's
            # engine process overlaps scheduling with the forward pass, so it stays.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            engine["distributed_executor_backend"] = "uni"
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
        if self._set_engine_threads:
            self._set_engine_threads()
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

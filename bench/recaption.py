"""Benchmark: generated tokens/s of the recaption job against plain transformers batched
`generate`, in the same run, text mode, same model, prompts and sampling.

Baseline: SmolLM2-135M-Instruct in bf16 (fp32 where the CPU lacks bf16), greedy,
`generate` on batches of 32 left-padded chat prompts, timed around `generate` only (model
load excluded); generated tokens are counted up to each sequence's EOS. It runs on the
first `--baseline-prompts` prompts, since a rate needs no more. Job: `run_recaption`
(Ray Data actor pool of vLLM engines) over all prompts; reported both as wall time
(including engine start) and as engine time (the `generate` calls inside the actors).
For reference it also times the same engine driven directly (no Ray: what the job could
at best reach) and the baseline in fp32. Then image mode with the tiny random Idefics3:
captions/s of the job.

    python -m bench.recaption [--scenes 300] [--max-tokens 128] [--config configs/local.yaml]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.captioning import chat_prompt, fill_instruction
from pipeline.stages.captioner import CaptionRequest, Captioner
from pipeline.config import load_config
from pipeline.hardware import resolve_precision
from pipeline.stages import runtime
from pipeline.stages.ingest import run_ingest
from pipeline.stages.caption_pass import select_images
from pipeline.stages.recaption import run_recaption
from pipeline.stages.tracking import Tracker

TEXT_PROMPT = "Rewrite this short photo caption as a detailed description of the scene: {caption}"


def baseline_tokens_per_s(
    model_path: str, prompts: list[str], max_tokens: int, repetition_penalty: float, batch_size: int = 32, fp32: bool = False
) -> tuple[float, int]:
    precision = "fp32" if fp32 else resolve_precision("auto", use_gpu=False)
    tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16 if precision == "bf16" else torch.float32).eval()
    generated, seconds = 0, 0.0
    for i in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**batch, max_new_tokens=max_tokens, do_sample=False, repetition_penalty=repetition_penalty,
                                 pad_token_id=tokenizer.pad_token_id)
        seconds += time.perf_counter() - start
        new = out[:, batch["input_ids"].shape[1] :]
        for row in new.tolist():
            n = len(row)
            if tokenizer.eos_token_id in row:
                n = row.index(tokenizer.eos_token_id) + 1
            generated += n
    return generated / seconds, generated


def bare_vllm_tokens_per_s(cfg, captions: list[list[str]]) -> float:
    """The same engine the job's actors hold, driven directly: no Ray, no store."""
    captioner = Captioner(cfg.models.llm, cfg.recaption, resolve_precision(cfg.recaption.dtype, False), use_gpu=False)
    requests = [CaptionRequest(fill_instruction(TEXT_PROMPT, c)) for c in captions]
    start = time.perf_counter()
    tokens = sum(g.num_tokens for i in range(0, len(requests), cfg.recaption.batch_size)
                 for g in captioner.generate(requests[i : i + cfg.recaption.batch_size]))
    seconds = time.perf_counter() - start
    del captioner
    return tokens / seconds


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/local.yaml")
    parser.add_argument("--scenes", type=int, default=300)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--baseline-prompts", type=int, default=64)
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--cpus-per-actor", type=float, default=None, help="default: the config's")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the config's")
    parser.add_argument("--image-images", type=int, default=64, help="images for the image-mode figure (0: skip)")
    parser.add_argument("--no-bare-vllm", dest="bare_vllm", action="store_false", help="skip the bare vLLM reference")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-recaption-") as tmp:
        overrides = [
            f"store.uri={tmp}/store", f"embedded.num_scenes={args.scenes}", "mlflow.enabled=false",
            "recaption.mode=text", f"recaption.prompt={TEXT_PROMPT}", f"recaption.sampling.max_tokens={args.max_tokens}",
            f"recaption.actors={args.actors}",
            "recaption.limit_images=null",  # every scene: the demo's config captions only a few
        ]
        overrides += [f"recaption.cpus_per_actor={args.cpus_per_actor}"] if args.cpus_per_actor else []
        overrides += [f"recaption.batch_size={args.batch_size}"] if args.batch_size else []
        cfg = load_config(args.config, overrides)
        runtime.connect(cfg.ray, cfg.run_dir)
        run_ingest(cfg, Tracker(None, None))

        # The job's own prompts, rendered the way its actors render them.
        todo, *_ = select_images(cfg, "bench")
        tokenizer = AutoTokenizer.from_pretrained(cfg.models.llm)
        prompts = [chat_prompt(tokenizer, fill_instruction(TEXT_PROMPT, c), None, False) for c in todo.column("source_captions").to_pylist()]
        base_tps, base_tokens = baseline_tokens_per_s(
            cfg.models.llm, prompts[: args.baseline_prompts], args.max_tokens, cfg.recaption.sampling.repetition_penalty
        )
        fp32_tps, _ = baseline_tokens_per_s(
            cfg.models.llm, prompts[: args.baseline_prompts // 2], args.max_tokens, cfg.recaption.sampling.repetition_penalty, fp32=True
        )

        bare_tps = bare_vllm_tokens_per_s(cfg, todo.column("source_captions").to_pylist()) if args.bare_vllm else None

        start = time.perf_counter()
        text = run_recaption(cfg, Tracker(None, None))
        wall = time.perf_counter() - start
        engine_tps = text.generated_tokens / (text.engine_seconds / args.actors)
        report = {
            "benchmark": "recaption",
            "model": Path(cfg.models.llm).name,
            "images": len(prompts),
            "max_tokens": args.max_tokens,
            "baseline": {"prompts": min(len(prompts), args.baseline_prompts), "generated_tokens": base_tokens, "tokens_per_s": round(base_tps, 1)},
            "job": {
                "actors": args.actors, "cpus_per_actor": cfg.recaption.cpus_per_actor, "batch_size": cfg.recaption.batch_size,
                "generated_tokens": text.generated_tokens, "captions": text.captions_written, "rejected": text.rejected,
                "wall_s": round(wall, 1), "tokens_per_s_wall": round(text.generated_tokens / wall, 1),
                "tokens_per_s_engine": round(engine_tps, 1), "phases_s": text.phases,
                "engine_s_summed_over_actors": round(text.engine_seconds, 1),
            },
            "baseline_fp32_tokens_per_s": round(fp32_tps, 1),
            "bare_vllm_tokens_per_s": round(bare_tps, 1) if bare_tps else None,
            "ratio_wall": round(text.generated_tokens / wall / base_tps, 2),
            "ratio_engine": round(engine_tps / base_tps, 2),
            "job_engine_vs_bare_vllm": round(engine_tps / bare_tps, 2) if bare_tps else None,
            "target_ratio_wall": 3.0,
        }
        if args.image_images:
            vlm = load_config(args.config, overrides + [
                "recaption.mode=image", "recaption.prompt=Describe this image in detail.", "recaption.sampling.max_tokens=32",
                "recaption.postprocess.unfinished=keep", "recaption.postprocess.min_words=1", "recaption.postprocess.max_compression_ratio=20",
                f"recaption.limit_images={args.image_images}", "recaption.max_model_len=1024",
            ])
            start = time.perf_counter()
            image = run_recaption(vlm, Tracker(None, None))
            wall = time.perf_counter() - start
            report["image_mode"] = {
                "model": Path(vlm.recaption.model or vlm.models.vlm).name, "images": image.captioned + image.rejected,
                "captions": image.captions_written, "wall_s": round(wall, 1), "captions_per_s_wall": round(image.captions_written / wall, 2),
                "captions_per_s_engine": round(image.captions_written / (image.engine_seconds / args.actors), 2),
            }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()

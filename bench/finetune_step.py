"""Benchmark (CPU): stage 1's train step, each cheaper variant against the recipe's, in one run.

The step is the project's own (`TrainableEncoder`, `contrastive_loss`, AdamW over the LoRA
weights), no Ray and no DeepSpeed, on SmolLM2-135M-Instruct (30 layers) in fp32 unless named, with pairs of
the renderer's scenes: a short alt-text caption and its dense caption (~15 and ~90 tokens).
Every variant trains the same batches from the same seed:

    recipe    LoRA r 16 on every projection of every layer, dropout 0.05, one padded pass per column
    dropout0  LoRA dropout 0 (peft skips the dropout pass)
    packed    a step's captions in one pass, several to a row (attention confined to each)
    top8      LoRA on the top 8 layers only (the backward pass stops there)
    compile   torch.compile (Inductor); its warm-up is reported apart
    combined  dropout 0 + packed
    bf16      the recipe in bf16 (what the stage runs where the CPU has AMX/AVX512-BF16)
    bf16+     dropout 0 + packed, in bf16
    bf16+top8 and LoRA on the top 8 layers only

Reported: seconds per step (median of the measured steps, after warm-up), the ratio to the
recipe, and tokens of padding per step. `--quality N` also trains the recipe and top8 for N
steps each and reports their CRA on held-out scenes, everyday pairs and long captions.

    python -m bench.finetune_step [--steps 6] [--batch 16] [--quality 60] [--out bench/results/finetune_step.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
MODELS = Path(os.environ.get("LLM2CLIP_RUN_DIR", REPO / ".run")).resolve() / "models"  # where `make models` puts them


def pairs(n: int, seed: int) -> list[tuple[str, str]]:
    from pipeline.scenes import caption_set, generate_scenes

    out = []
    for scene in generate_scenes(n, seed=seed):
        shorts, dense = caption_set(scene, 0, seed)
        out.append((shorts[0], dense))
    return out


def config(**lora):
    from pipeline.config import FinetuneTextConfig

    return FinetuneTextConfig.model_validate({"max_length": 128, "lora": {"r": 16, "alpha": 32, **lora}, "precision": "fp32"})


def build(model: Path, cfg, compile_: bool, dtype: torch.dtype = torch.float32, lr: float = 2e-4):
    from pipeline.contrastive import ContrastiveLoss
    from pipeline.finetune import TrainableEncoder

    torch.manual_seed(0)
    encoder = TrainableEncoder(str(model), cfg, dtype=dtype)
    encoder.train()
    if compile_:
        encoder.compile()
    optimizer = torch.optim.AdamW([p for p in encoder.parameters() if p.requires_grad], lr=lr)
    return encoder, optimizer, ContrastiveLoss(cfg.scale)


def step(encoder, optimizer, loss_fn, batch, packed: bool) -> float:
    from pipeline.finetune import contrastive_loss

    loss = contrastive_loss(encoder, batch, loss_fn, torch.device("cpu"), packed=packed)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def padding(encoder, batch, packed: bool) -> int:
    view = encoder.encoder
    if packed:
        tokens = view.pack(batch["first"] + batch["second"])
        return int((tokens["attention_mask"] == 0).sum())
    return sum(int((view.tokenize(c)["attention_mask"] == 0).sum()) for c in (batch["first"], batch["second"]))


VARIANTS = {  # name: (lora options, packed, compile, dtype)
    "recipe": ({"dropout": 0.05}, False, False, torch.float32),
    "dropout0": ({"dropout": 0.0}, False, False, torch.float32),
    "packed": ({"dropout": 0.05}, True, False, torch.float32),
    "top8": ({"dropout": 0.05, "top_layers": 8}, False, False, torch.float32),
    "compile": ({"dropout": 0.0}, False, True, torch.float32),
    "combined": ({"dropout": 0.0}, True, False, torch.float32),
    "bf16": ({"dropout": 0.05}, False, False, torch.bfloat16),
    "bf16+": ({"dropout": 0.0}, True, False, torch.bfloat16),
    "bf16+top8": ({"dropout": 0.0, "top_layers": 8}, True, False, torch.bfloat16),
}


def time_variant(model: Path, name: str, batches: list[dict], warmup: int) -> dict:
    lora, packed, compile_, dtype = VARIANTS[name]
    encoder, optimizer, loss_fn = build(model, config(**lora), compile_, dtype)
    times, losses = [], []
    for i, batch in enumerate(batches):
        began = time.perf_counter()
        losses.append(step(encoder, optimizer, loss_fn, batch, packed))
        times.append(time.perf_counter() - began)
    measured = times[warmup:]
    return {"step_s": round(statistics.median(measured), 3), "warmup_s": round(sum(times[:warmup]), 2),
            "padding_tokens_per_step": padding(encoder, batches[0], packed), "first_loss": round(losses[0], 4),
            "last_loss": round(losses[-1], 4)}


def quality(model: Path, steps: int, batch: int, lr: float) -> dict:
    """CRA after `steps` steps of full-depth LoRA and of top-8 LoRA (both bf16, dropout 0, packed;
    the same seed and batches), and of the untrained model, on held-out sets."""
    from pipeline.cra_sets import builtin_pairs
    from pipeline.metrics import pairs_cra
    from pipeline.text_encoder import TextEncoder

    train = pairs(steps * batch, seed=101)  # not the held-out scenes' seed
    held_out = {"scenes": builtin_pairs("scenes"), "everyday": builtin_pairs("everyday-pairs"),
                "long-captions": builtin_pairs("long-captions")}
    raw = TextEncoder.from_pretrained(model, dtype="bf16")
    out = {"untrained": {k: round(pairs_cra(lambda t: raw.encode(t, batch_size=32), v), 4) for k, v in held_out.items()}}
    for name, lora in (("full-depth", {"dropout": 0.0}), ("top8", {"dropout": 0.0, "top_layers": 8})):
        encoder, optimizer, loss_fn = build(model, config(**lora), False, torch.bfloat16, lr)
        began = time.perf_counter()
        for i in range(steps):
            rows = train[i * batch:(i + 1) * batch]
            step(encoder, optimizer, loss_fn, {"first": [a for a, _ in rows], "second": [b for _, b in rows]}, packed=True)
        seconds = time.perf_counter() - began
        encoder.eval()
        view = encoder.encoder
        out[name] = {k: round(pairs_cra(lambda t: view.encode(t, batch_size=32), v), 4) for k, v in held_out.items()}
        out[name]["train_s"] = round(seconds, 1)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="measured steps per variant (after 2 warm-up steps)")
    parser.add_argument("--batch", type=int, default=16, help="pairs per step")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--lr", type=float, default=2e-3, help="--quality's constant learning rate (the demo's)")
    parser.add_argument("--quality", type=int, default=0, help="also train full-depth and top-8 LoRA this many steps; report CRA")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    model = MODELS / "smollm2-135m-instruct"
    torch.set_num_threads(os.cpu_count() or 1)
    warmup = 2
    rows = pairs((args.steps + warmup) * args.batch, seed=7)
    batches = [{"first": [a for a, _ in rows[i:i + args.batch]], "second": [b for _, b in rows[i:i + args.batch]]}
               for i in range(0, len(rows), args.batch)]
    variants = {}
    for name in args.variants:
        variants[name] = time_variant(model, name, batches, warmup)
        print(name, json.dumps(variants[name]), flush=True)
    base = variants.get("recipe", {}).get("step_s")
    for v in variants.values():
        v["speedup_vs_recipe"] = round(base / v["step_s"], 2) if base else None
    report = {"benchmark": "finetune_step", "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
              "model": model.name, "batch_pairs": args.batch, "measured_steps": args.steps, "variants": variants}
    if args.quality:
        report["quality"] = {"steps": args.quality, "batch_pairs": args.batch, "lr": args.lr,
                             "cra": quality(model, args.quality, args.batch, args.lr)}
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()

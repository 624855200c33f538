"""Benchmark (GPU): the core stage-2 train step, no Ray, no DeepSpeed.

The project's own `LLM2CLIP` (a `VisionTower` with ViT-L/14 shapes at 224 px, random
weights; the authors' `TextAdapter` on 4096-d cached LLM embeddings, random inputs),
`ClipLoss` and `contrastive_step`, AdamW; batch 256. Precision: `amp` (fp32 weights,
bf16 autocast, the usual CLIP recipe) or `bf16` (bf16 weights, as DeepSpeed's bf16 engine
computes). Model FLOPs per step = 3 x the forward FLOPs counted by torch's FlopCounterMode
(recompute under `--checkpointing` not counted); the peak is a bf16 matrix product
(8192^3) measured in the same run. Target: at least 40% of that peak.

    python -m bench.train_clip_gpu [--batch 256] [--steps 20] [--precision amp|bf16] [--compile] [--checkpointing]
    python -m bench.train_clip_gpu --smoke      # tiny shapes on the CPU: checks the script, measures nothing
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def matmul_peak_tflops(device: str, n: int = 8192, repeats: int = 50) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build(smoke: bool, embed_dim: int, text_dim: int):
    from transformers import CLIPVisionConfig

    from pipeline.clip_model import LLM2CLIP, LLM2CLIPConfig, TextAdapter, VisionTower

    if smoke:
        vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
    else:  # ViT-L/14 at 224 px
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                  image_size=224, patch_size=14)
    vision._attn_implementation = "sdpa"
    config = LLM2CLIPConfig(embed_dim=embed_dim, text_tower="llm", text_dim=text_dim, image_size=vision.image_size,
                            image_mean=(0.48145466, 0.4578275, 0.40821073), image_std=(0.26862954, 0.26130258, 0.27577711))
    return LLM2CLIP(config, VisionTower.from_config(vision, embed_dim), TextAdapter(text_dim, 4, 2, embed_dim)), vision


def main(argv: list[str] | None = None) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.contrastive import ClipLoss, contrastive_step

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--precision", choices=["amp", "bf16"], default="amp")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--checkpointing", action="store_true", help="recompute vision activations in the backward pass")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    args = parser.parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    batch = 4 if args.smoke else args.batch
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    model, vision = build(args.smoke, embed_dim=64 if args.smoke else 1280, text_dim=128 if args.smoke else 4096)
    model.to(device)
    if args.precision == "bf16":
        model.to(torch.bfloat16)
    if args.checkpointing:
        model.vision.set_grad_checkpointing(True)
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.param_groups(1e-5, 1e-5, 0.05, 0.85), betas=(0.9, 0.98), eps=1e-6,
                                  fused=device == "cuda")
    loss_fn = ClipLoss()
    forward = torch.compile(model) if args.compile else model
    pixels = torch.randn(batch, 3, vision.image_size, vision.image_size, device=device)
    text = torch.randn(batch, model.config.text_dim, device=device)
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=args.precision == "amp")

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = contrastive_step(lambda mb: forward(*mb), [(pixels, text)], loss_fn, lambda t: t.backward())
        optimizer.step()
        model.clamp_logit_scale_()
        return loss.item()

    with FlopCounterMode(display=False) as counter, torch.no_grad(), autocast:
        model(pixels, text)
    flops_per_step = 3 * counter.get_total_flops()
    for _ in range(1 if args.smoke else 3):
        step()  # warm-up: allocator, kernels, compilation
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    steps = 1 if args.smoke else args.steps
    for _ in range(steps):
        step()
    _sync(device)
    seconds = (time.perf_counter() - start) / steps
    peak = matmul_peak_tflops(device, n=256 if args.smoke else 8192, repeats=2 if args.smoke else 50)
    tflops = flops_per_step / seconds / 1e12
    report = {
        "benchmark": "train_clip_gpu", "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)",
        "vision": f"ViT {vision.num_hidden_layers}L/{vision.hidden_size}d/patch {vision.patch_size} @ {vision.image_size}px",
        "params": params, "batch": batch, "precision": args.precision, "compile": args.compile, "checkpointing": args.checkpointing,
        "step_s": round(seconds, 4), "images_per_s": round(batch / seconds, 1), "model_tflops_per_step": round(flops_per_step / 1e12, 2),
        "model_tflops_per_s": round(tflops, 1), "bf16_matmul_peak_tflops": round(peak, 1), "fraction_of_peak": round(tflops / peak, 3),
        "max_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if device == "cuda" else None, "torch": torch.__version__,
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()

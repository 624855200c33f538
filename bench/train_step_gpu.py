"""Benchmark (GPU): the core contrastive train step of stage 1, no Ray, no DeepSpeed.

A ~1B-parameter Llama-family model built from a config with random weights (Llama-3.2-1B
shapes), LoRA (peft, r 16 on q,k,v,o,gate,up,down) as in the recipe, bf16, SDPA; the step is
the project's own code: `TextEncoder` (bidirectional, mean pooling) over both captions of
each pair, `ContrastiveLoss` (scale 50), backward, AdamW step. Sequence length 512 as in the
paper; batch per GPU 64 pairs (the paper's), halved until it fits.

Variants, each on a fresh model in the same process, so their ratios are same-run:

    mask4d     LoRA dropout 0.05 and the 4D bidirectional mask (how every batch ran before)
    dropout0   LoRA dropout 0 (peft skips the dropout pass), still the 4D mask
    maskfree   dropout 0, and an unpadded batch passes no mask: SDPA's flash path (is_causal=False)
    compiled   maskfree under torch.compile; its compile warm-up is reported apart

`--checkpointing` recomputes activations in the backward pass (about 2N more FLOPs a token,
not counted below) so the paper's 64 pairs fit. Reports tokens/s and model TFLOP/s as a
fraction of the GPU's bf16 peak. With frozen base weights a token costs about 4N FLOPs
(forward 2N, activation gradients 2N; no weight gradients except LoRA's), plus attention
(12 * layers * seq * hidden, forward + backward). `--smoke` runs a tiny model on the CPU, to
check the script before a GPU call.

    python -m bench.train_step_gpu [--peak-tflops 989] [--steps 10] [--variants mask4d maskfree compiled]
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from types import SimpleNamespace

import torch

SHAPES = {"full": dict(layers=16, hidden=2048, intermediate=8192, heads=32, kv_heads=8, vocab=128256),
          "smoke": dict(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=1000)}
VARIANTS = {"mask4d": (0.05, True, False), "dropout0": (0.0, True, False), "maskfree": (0.0, False, False),
            "compiled": (0.0, False, True)}  # name: (LoRA dropout, force the 4D mask, torch.compile)


def build_model(device: str, dtype: torch.dtype, dropout: float, layers: int, hidden: int, intermediate: int, heads: int,
                kv_heads: int, vocab: int):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, vocab_size=vocab, max_position_embeddings=4096, tie_word_embeddings=True)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return get_peft_model(model, lora), config


def measure(name: str, args, device: str, dtype: torch.dtype) -> dict:
    from pipeline.contrastive import ContrastiveLoss
    from pipeline.text_encoder import EncoderOptions, TextEncoder

    dropout, mask4d, compiled = VARIANTS[name]
    peft_model, config = build_model(device, dtype, dropout, **SHAPES["smoke" if args.smoke else "full"])
    if args.checkpointing:
        peft_model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = sum(p.numel() for p in peft_model.parameters())
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    tokenizer = SimpleNamespace(padding_side="left", pad_token="<pad>", eos_token="<eos>")  # ids are made below
    encoder = TextEncoder(peft_model.get_base_model().model, tokenizer, EncoderOptions(pooling="mean", bidirectional=True, max_length=args.seq))
    encoder.train()
    if compiled:
        encoder.compile()
    optimizer = torch.optim.AdamW(trainable, lr=2e-4)
    loss_fn = ContrastiveLoss(50.0, gather=False)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    batch = args.batch
    while batch >= 1:
        try:
            ids = torch.randint(0, config.vocab_size, (2, batch, args.seq), device=device)
            segments = torch.ones(batch, args.seq, dtype=torch.long, device=device)
            if mask4d:  # one padding token in one row: the whole batch then takes the 4D mask, as every batch did before
                segments[0, 0] = 0

            def step() -> float:
                loss = loss_fn(encoder(ids[0], segments), encoder(ids[1], segments))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                return loss.item()

            began = time.perf_counter()
            step(), step()  # warm-up (allocator, kernels; compiling)
            sync()
            warmup = time.perf_counter() - began
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()  # the batches that did not fit are not this one's peak
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            sync()
            seconds = (time.perf_counter() - start) / args.steps
            break
        except torch.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            batch //= 2
    tokens = 2 * batch * args.seq
    non_embedding = params - config.vocab_size * config.hidden_size
    flops_per_token = 4 * non_embedding + 12 * config.num_hidden_layers * args.seq * config.hidden_size
    tflops = tokens / seconds * flops_per_token / 1e12
    report = {"variant": name, "lora_dropout": dropout, "mask": "4d" if mask4d else "none (flash)", "compiled": compiled,
              "pairs_per_step": batch, "seq": args.seq, "step_s": round(seconds, 4), "warmup_s": round(warmup, 1),
              "tokens_per_s": round(tokens / seconds), "model_tflops": round(tflops, 1),
              "fraction_of_peak": round(tflops / args.peak_tflops, 3),
              "max_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if device == "cuda" else None,
              "params": params, "trainable_params": sum(p.numel() for p in trainable)}
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64, help="pairs per step (halved until it fits)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=800.0)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing: recompute to fit bigger batches")
    parser.add_argument("--smoke", action="store_true", help="a tiny model on the CPU, fp32: checks the script")
    args = parser.parse_args(argv)
    device, dtype = ("cpu", torch.float32) if args.smoke else ("cuda", torch.bfloat16)
    variants = []
    for name in args.variants:
        variants.append(measure(name, args, device, dtype))
        print(json.dumps(variants[-1]), flush=True)
        gc.collect()  # the variant's model is garbage now: free its memory before the next one's
        if device == "cuda":
            torch.cuda.empty_cache()
    first = variants[0]["step_s"]
    for v in variants:
        v[f"speedup_vs_{variants[0]['variant']}"] = round(first / v["step_s"], 2)
    report = {"benchmark": "train_step_gpu", "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)",
              "torch": torch.__version__, "peak_tflops": args.peak_tflops, "activation_checkpointing": args.checkpointing,
              "variants": variants}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()

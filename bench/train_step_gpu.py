"""Benchmark (GPU): the core contrastive train step of stage 1, no Ray, no DeepSpeed.

A ~1B-parameter Llama-family model built from a config with random weights (Llama-3.2-1B
shapes), LoRA (peft, r 16 on q,k,v,o,gate,up,down) as in the recipe, bf16, SDPA; the step is
the project's own code: `TextEncoder` (bidirectional mask, mean pooling) over both captions
of each pair, `ContrastiveLoss` (scale 50), backward, AdamW step. Sequence length 512 as in
the paper; batch per GPU 64 pairs (the paper's), halved until it fits.

`--checkpointing` recomputes activations in the backward pass (about 2N more FLOPs a token,
not counted below) so the paper's 64 pairs fit. Reports tokens/s and model TFLOP/s as a fraction of the GPU's bf16 peak. With frozen base
weights a token costs about 4N FLOPs (forward 2N, activation gradients 2N; no weight
gradients except LoRA's), plus attention (12 * layers * seq * hidden, forward + backward).

    python -m bench.train_step_gpu [--peak-tflops 800] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace

import torch


def build_model(layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, vocab_size=vocab, max_position_embeddings=4096, tie_word_embeddings=True)
    config._attn_implementation = "sdpa"
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return get_peft_model(model, lora), config


def main(argv: list[str] | None = None) -> dict:
    from pipeline.contrastive import ContrastiveLoss
    from pipeline.text_encoder import EncoderOptions, TextEncoder

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64, help="pairs per step (halved until it fits)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=800.0)
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing: recompute to fit bigger batches")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    peft_model, config = build_model(layers=16, hidden=2048, intermediate=8192, heads=32, kv_heads=8, vocab=128256)
    if args.checkpointing:
        peft_model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = sum(p.numel() for p in peft_model.parameters())
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    tokenizer = SimpleNamespace(padding_side="left", pad_token="<pad>", eos_token="<eos>")  # ids are made below
    encoder = TextEncoder(peft_model.get_base_model().model, tokenizer, EncoderOptions(pooling="mean", bidirectional=True, max_length=args.seq))
    optimizer = torch.optim.AdamW(trainable, lr=2e-4)
    loss_fn = ContrastiveLoss(50.0, gather=False)

    batch = args.batch
    while batch >= 1:
        try:
            ids = torch.randint(0, config.vocab_size, (2, batch, args.seq), device="cuda")
            mask = torch.ones(batch, args.seq, dtype=torch.long, device="cuda")

            def step() -> float:
                first = encoder(ids[0], mask)
                second = encoder(ids[1], mask)
                loss = loss_fn(first, second)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                return loss.item()

            step(), step()  # warm-up (allocator, kernels)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()  # the batches that did not fit are not this one's peak
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            torch.cuda.synchronize()
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
    report = {
        "benchmark": "train_step_gpu", "device": torch.cuda.get_device_name(), "params": params,
        "trainable_params": sum(p.numel() for p in trainable), "pairs_per_step": batch, "seq": args.seq,
        "step_s": round(seconds, 4), "tokens_per_s": round(tokens / seconds), "model_tflops": round(tflops, 1),
        "fraction_of_peak": round(tflops / args.peak_tflops, 3), "peak_tflops": args.peak_tflops,
        "max_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1), "torch": torch.__version__,
        "activation_checkpointing": args.checkpointing,
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()

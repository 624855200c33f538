"""vLLM on CPU: the engine in the caption actor's process against vLLM's default layout.

    python -m bench.vllm_engine [--rounds 2] [--prompts 256] [--max-tokens 48]

`Captioner` runs vLLM's engine core and its one worker in the calling process on CPU
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`, `distributed_executor_backend="uni"`); vLLM's default
starts an engine-core process and a worker process, each importing torch and vLLM again. Each
layout is measured in a fresh interpreter, alternating, `--rounds` times: engine start (from
`LLM(...)` to ready) and generated tokens/s on the same greedy prompts. Prints one JSON line
with the medians, their ratios, and whether both layouts wrote the same text.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from pipeline.captioning import recaption_model
from pipeline.config import load_config

_CHILD = r"""
import json, os, sys, time
layout, model, prompts, max_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
if layout == "in_process":
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

def main():
    from vllm import LLM, SamplingParams
    engine = dict(model=model, dtype="bfloat16", max_model_len=2048, enforce_eager=True, kv_cache_memory_bytes=512 * 2**20, seed=0)
    if layout == "in_process":
        engine["distributed_executor_backend"] = "uni"
    t0 = time.perf_counter()
    llm = LLM(**engine)
    t1 = time.perf_counter()
    texts = [f"Describe photo number {i} of a city street in detail." for i in range(prompts)]
    out = llm.generate(texts, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True), use_tqdm=False)
    t2 = time.perf_counter()
    tokens = sum(len(o.outputs[0].token_ids) for o in out)
    print("RESULT " + json.dumps({"start_s": t1 - t0, "tokens_per_s": tokens / (t2 - t1), "first": out[0].outputs[0].text}), flush=True)

if __name__ == "__main__":
    main()
"""


def _run(layout: str, model: str, prompts: int, max_tokens: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, layout, model, str(prompts), str(max_tokens)],
                         capture_output=True, text=True, timeout=900)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{layout} run failed (rc {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/local.yaml", help="its recaption model is measured")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=48)
    args = ap.parse_args(argv)
    cfg = load_config(args.config)
    model = recaption_model(cfg)
    runs: dict[str, list[dict]] = {"multi_process": [], "in_process": []}
    for _ in range(args.rounds):
        for layout in runs:
            runs[layout].append(_run(layout, model, args.prompts, args.max_tokens))
    med = {layout: {k: statistics.median(r[k] for r in rs) for k in ("start_s", "tokens_per_s")} for layout, rs in runs.items()}
    print(json.dumps({
        "bench": "vllm_engine", "model": model, "rounds": args.rounds, "prompts": args.prompts, "max_tokens": args.max_tokens,
        "multi_process (vLLM default)": med["multi_process"], "in_process (Captioner on CPU)": med["in_process"],
        "engine start ratio (default / in-process)": round(med["multi_process"]["start_s"] / med["in_process"]["start_s"], 2),
        "tokens/s ratio (in-process / default)": round(med["in_process"]["tokens_per_s"] / med["multi_process"]["tokens_per_s"], 2),
        "same text": len({r["first"] for rs in runs.values() for r in rs}) == 1,
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark: the stage-2 step on cached LLM embeddings against the same step with the LLM
encoding the captions online, in one run.

Both are train-clip runs on the shared trainer with the same data, workers, global batch,
vision tower and adapter. `cached` is the job itself (`run_train_clip`), reading each
caption's embedding from the embedding store. `online` swaps in a task whose workers also
hold the frozen LLM (SmolLM2-135M-Instruct here, bf16 where the CPU has it, as `embed`
runs it) and encode each batch's drawn captions inside the step. Reported: steady-state
samples/s of each (every step but the first, which pays for start-up), their ratio, and
the data-wait fraction of both: the share of step time the loop waited for its batch, over
all steps and without each epoch's first batch (when Ray Data starts the epoch's pass; long
epochs approach the second figure). The target for the cached run is under 10%.

    python -m bench.train_clip [--scenes 300] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import dataclass, replace

from pipeline.clip_data import PAYLOAD
from pipeline.config import load_config
from pipeline.hardware import resolve_precision
from pipeline.stages import runtime
from pipeline.stages.embed import run_embed
from pipeline.stages.ingest import run_ingest
from pipeline.stages.tracking import Tracker
from pipeline.stages.clip_samples import ClipInputs, TextSource, load_samples, sample_rows
from pipeline.stages.clip_task import ClipTask, shuffle_buffer_rows
from pipeline.stages.train_clip import run_train_clip
from pipeline.stages.trainer import TrainPlan, fit


@dataclass
class OnlineClipTask(ClipTask):
    """ClipTask whose text side embeds the batch's captions with the LLM inside the step."""

    encoder_path: str = ""
    precision: str = "fp32"
    text_dim: int = 0  # the LLM's embedding width: the adapter's input

    @property
    def model_config(self):
        return replace(super().model_config, text_tower="llm", text_dim=self.text_dim)

    def build(self, ctx):
        from pipeline.text_encoder import TextEncoder

        model = super().build(ctx)
        self.encoder = TextEncoder.from_pretrained(self.encoder_path, dtype=self.precision, device=ctx.device)
        return model

    def _text(self, model, batch, device):
        import torch

        return torch.from_numpy(self.encoder.encode(list(batch["text"]), batch_size=len(batch["text"]))).to(device)

    def evaluate(self, engine, state, ctx):
        return {}  # the benchmark times training steps only


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/local.yaml")
    parser.add_argument("--scenes", type=int, default=300)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-train-clip-") as tmp:
        cfg = load_config(args.config, [
            f"store.uri={tmp}/store", f"run_dir={tmp}/run", f"embedded.num_scenes={args.scenes}", "mlflow.enabled=false",
            "embed.cra_split=null", f"train_clip.max_steps={args.steps}", f"train_clip.checkpoint_every={10 * args.steps}",
            "train_clip.register_as=null", "train_clip.encoder=null",
        ])
        runtime.connect(cfg.ray, cfg.run_dir)
        run_ingest(cfg, Tracker(None, None))
        run_embed(cfg, Tracker(None, None))
        cached = run_train_clip(cfg, Tracker(None, None))

        tc = cfg.train_clip
        cached_inputs = ClipInputs.resolve(cfg)  # the raw LLM's embeddings: the online run encodes with the same model
        text_inputs = replace(cached_inputs, source=TextSource("clip"))  # the same samples, with caption text
        text_inputs = replace(text_inputs, samples=sample_rows(cfg, text_inputs.source, text_inputs.captions, text_inputs.storage))
        data = load_samples(cfg, text_inputs)
        task = OnlineClipTask(tc=tc, source=text_inputs.source, vision_path=text_inputs.vision, clip_text_path=None, eval_versions={},
                              shuffle_buffer=shuffle_buffer_rows(tc.global_batch_size, tc.num_workers), encoder_path=cfg.models.llm,
                              precision=resolve_precision("auto", tc.use_gpu), text_dim=cached_inputs.source.dim)
        per_step = tc.num_workers * tc.accum_steps
        plan = TrainPlan(run_name="bench-online", total_steps=cached.steps, num_samples=data.meta.num_train,
                         micro_batch=tc.global_batch_size // per_step, precision=tc.precision, seed=tc.seed, trainer=tc.settings(),
                         optimizer=tc.optimizer(), accum_steps=tc.accum_steps)
        online = fit(task, plan, data.datasets, text_inputs.storage).outcome.times
    online_rate = online.steps * tc.global_batch_size / online.seconds
    report = {
        "benchmark": "train_clip", "scenes": args.scenes, "training_images": cached.train_images, "steps": cached.steps,
        "global_batch": tc.global_batch_size, "workers": tc.num_workers, "llm": cfg.models.llm.rsplit("/", 1)[-1],
        "vision": (tc.vision_model or cfg.models.vision).rsplit("/", 1)[-1], "payload_cached": PAYLOAD["llm"],
        "cached_samples_per_s": cached.samples_per_s, "online_samples_per_s": round(online_rate, 2),
        "ratio_cached_over_online": round(cached.samples_per_s / online_rate, 2),
        "cached_data_wait_fraction": cached.data_wait_fraction, "online_data_wait_fraction": round(online.data_wait_fraction, 4),
        "cached_within_epoch_wait_fraction": cached.within_epoch_wait_fraction,
        "online_within_epoch_wait_fraction": round(online.within_epoch_wait_fraction, 4),
        "target_data_wait_fraction": 0.10,
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()

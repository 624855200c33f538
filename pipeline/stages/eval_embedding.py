"""Embeddings for `evaluate`: one Ray Data actor pool per model, each actor holding the model.

Rows by kind: `text` (a string) and `llm` (a cached LLM embedding, for an LLM2CLIP adapter)
become text embeddings, `image` (uri + sha256) an image embedding; an image that cannot be
read gets a reason instead. Results come back in input order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import ray

from pipeline.config import PipelineConfig, pool_bounds
from pipeline.stages.runtime import actor_pool
from pipeline.hardware import resolve_precision


@dataclass(frozen=True)
class ModelSpec:
    """One model as the embedding actors load it."""

    name: str
    kind: Literal["text_encoder", "minilm", "llm2clip"]
    ref: str
    text_encoder: str | None = None  # llm2clip with the llm tower
    text_tower: str | None = None
    encoder_version: str | None = None


class EvalEncoder:
    """Ray Data actor holding one model. Rows by `kind`: `text` (a string) and `llm` (a cached
    LLM embedding, for an LLM2CLIP adapter) become text embeddings, `image` (uri + sha256) an
    image embedding; an unreadable image gets a reason instead. Unit rows, except a text
    encoder's with `raw` (the LLM embeddings an adapter takes)."""

    def __init__(self, spec: ModelSpec, precision: str, use_gpu: bool, max_bytes: int, raw: bool = False):
        import torch

        self.spec, self.max_bytes, self.raw = spec, max_bytes, raw
        device = "cuda" if use_gpu else "cpu"
        if spec.kind == "minilm":
            from pipeline.baselines import MiniLMEncoder

            self.text_model = MiniLMEncoder(device=device)
            self.dim = self.text_model.dim
        elif spec.kind == "text_encoder":
            from pipeline.text_encoder import TextEncoder

            self.text_model = TextEncoder.from_pretrained(spec.ref, dtype=precision, device=device)
            self.dim = self.text_model.dim
            self.version = self.text_model.encoder_version
        else:
            from pipeline.clip_model import LLM2CLIP

            dtype = torch.bfloat16 if use_gpu and precision == "bf16" else torch.float32
            self.model = LLM2CLIP.from_pretrained(spec.ref, device=device, dtype=dtype)
            self.dim = self.model.config.embed_dim

    def _texts(self, texts: list[str]) -> np.ndarray:
        if self.spec.kind == "minilm":
            return self.text_model.encode(texts)
        if self.spec.kind == "text_encoder":
            return self.text_model.encode(texts, normalize=not self.raw)
        return self.model.embed_texts(texts).numpy()  # clip tower

    def _images(self, uris: list[str], shas: list[str]) -> tuple[np.ndarray | None, list[str]]:
        from pipeline.clip_data import load_image

        images, reasons = [], []
        for uri, sha in zip(uris, shas):
            image, reason, detail = load_image(uri, sha, self.max_bytes)
            reasons.append(f"{reason}: {detail}" if image is None else "")
            if image is not None:
                images.append(image)
        emb = self.model.encode_image(images).numpy() if images else None
        return emb, reasons

    def __call__(self, batch: pa.Table) -> pa.Table:
        kinds = batch.column("kind").to_pylist()
        n = len(kinds)
        out = np.zeros((n, self.dim), dtype=np.float32)
        reasons = [""] * n
        rows = {k: [i for i in range(n) if kinds[i] == k] for k in ("text", "llm", "image")}
        if rows["text"]:
            texts = batch.column("text").to_pylist()
            out[rows["text"]] = self._texts([texts[i] for i in rows["text"]])
        if rows["llm"]:
            cached = batch.column("llm").take(pa.array(rows["llm"])).combine_chunks()
            vectors = np.asarray(cached.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(len(rows["llm"]), -1)
            out[rows["llm"]] = self.model.encode_text(vectors).numpy()
        if rows["image"]:
            uris, shas = batch.column("uri").to_pylist(), batch.column("sha256").to_pylist()
            emb, why = self._images([uris[i] for i in rows["image"]], [shas[i] for i in rows["image"]])
            ok = [i for i, reason in zip(rows["image"], why) if not reason]
            if ok:
                out[ok] = emb
            for i, reason in zip(rows["image"], why):
                reasons[i] = reason
        version = getattr(self, "version", "")
        return pa.table({"id": batch.column("id"), "reason": pa.array(reasons, pa.string()),
                         "encoder_version": pa.array([version] * n, pa.string()),
                         "embedding": pa.FixedSizeListArray.from_arrays(pa.array(out.reshape(-1), pa.float32()), self.dim)})


@dataclass
class Embedded:
    """One pass of a model over texts, cached LLM embeddings and images."""

    texts: np.ndarray  # rows of `texts` then of `llm` inputs
    images: np.ndarray
    image_reasons: list[str]
    encoder_version: str


def embed(cfg: PipelineConfig, spec: ModelSpec, texts: list[str], images: list[tuple[str, str]] = (),
          llm: np.ndarray | None = None, raw: bool = False) -> Embedded:
    """Embed with one model in an actor pool (Ray Data); results in input order."""
    ecfg = cfg.evaluate
    use_gpu = ecfg.gpus_per_actor > 0
    n_llm = 0 if llm is None else len(llm)
    kinds = ["text"] * len(texts) + ["llm"] * n_llm + ["image"] * len(images)
    if not kinds:
        return Embedded(np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32), [], "")
    # cached LLM embeddings as one flat float32 buffer (rows of other kinds are empty lists)
    dim = llm.shape[1] if n_llm else 0
    lengths = np.array([0] * len(texts) + [dim] * n_llm + [0] * len(images), dtype=np.int32)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    values = pa.array(np.asarray(llm, dtype=np.float32).reshape(-1) if n_llm else np.zeros(0, np.float32))
    table = pa.table({
        "id": pa.array(range(len(kinds)), pa.int64()),
        "kind": kinds,
        "text": pa.array(list(texts) + [None] * (n_llm + len(images)), pa.string()),
        "llm": pa.ListArray.from_arrays(offsets, values),
        "uri": pa.array([None] * (len(texts) + n_llm) + [u for u, _ in images], pa.string()),
        "sha256": pa.array([None] * (len(texts) + n_llm) + [h for _, h in images], pa.string()),
    })
    per_block = -(-table.num_rows // max(pool_bounds(ecfg.actors)[1], -(-table.num_rows // ecfg.batch_size)))
    ds = ray.data.from_arrow([table.slice(i, per_block) for i in range(0, table.num_rows, per_block)])
    out = ds.map_batches(
        EvalEncoder,
        fn_constructor_kwargs=dict(spec=spec, precision=resolve_precision(ecfg.precision, use_gpu), use_gpu=use_gpu,
                                   max_bytes=cfg.ingest.limits.max_bytes, raw=raw),
        batch_size=ecfg.batch_size, batch_format="pyarrow", compute=actor_pool(ecfg.actors),
        num_cpus=ecfg.cpus_per_actor, num_gpus=ecfg.gpus_per_actor, resources=ecfg.resources_per_actor or None,
    )
    result = pa.concat_tables([t for t in ray.get(out.to_arrow_refs()) if t.num_rows]).sort_by("id")
    if result.num_rows != table.num_rows:
        raise RuntimeError(f"model {spec.name}: {result.num_rows} embeddings for {table.num_rows} inputs")
    column = result.column("embedding").combine_chunks()
    flat = np.asarray(column.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(result.num_rows, column.type.list_size)
    n_text = len(texts) + n_llm
    return Embedded(flat[:n_text], flat[n_text:], result.column("reason").to_pylist()[n_text:], result.column("encoder_version")[0].as_py())

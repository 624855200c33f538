"""`serve`: a trained LLM2CLIP model's embeddings, and search over one dataset's images, on Ray Serve.

Three deployments, each with its own replicas and hardware (`serve.*_deployment`):
- `ClipTowers`: the model's vision tower and projection (images), and its text adapter (LLM
  embeddings -> the joint space), or its CLIP text tower; requests batched (`@serve.batch`).
- `LlmEncoder`: the LLM text encoder the adapter was trained on (llm tower only); batched.
- `SearchApi`: the HTTP front (FastAPI): checks the bearer token and every input
  (`pipeline.serve_requests`), holds the image index (`pipeline.search_index`) and the
  dataset's caption vectors in memory, and answers JSON; it serves the search page too.

The driver (`run_serve`) builds or tops up the image index (`image_index`, Ray Data), pins the
model (an alias is resolved to its version, so every replica loads the same weights), and
deploys the application; deploying again with a moved alias replaces the replicas one by one
(Serve's rolling update) while the others answer. A call to a replica that dies is retried on
another (`CALL_RETRIES`).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from ray import serve
from starlette.exceptions import HTTPException

from pipeline import serve_requests as checks
from pipeline.config import ImageLimits, PipelineConfig, ServeDeployment
from pipeline.records import Tracked, hidden, label
from pipeline.search_index import VectorIndex
from pipeline.stages.image_index import build_index, dataset_images, load_index
from pipeline.stages.runtime import worker_runtime_env
from pipeline.stages.tracking import Tracker
from pipeline.store import Store, embedding_matrix

log = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("search_page.html")
CALL_RETRIES = 3  # a call whose replica died is sent again (Serve routes it to a live one)


@dataclass(frozen=True)
class SearchSetup:
    """Everything a `SearchApi` replica needs, resolved by the driver (typed, no config dicts)."""

    store_uri: str
    dataset: str
    split: str | None
    model: str  # pinned: models:/NAME/VERSION, a path or a storage URI
    text_tower: str  # "llm" or "clip"
    text_encoder: str | None  # the LLM text encoder (llm tower): serve.text_encoder, else the one the model records
    encoder_version: str | None  # the one the adapter was trained on; the embedding-store version of the captions
    caption_versions: tuple[str, ...]
    index_version: str
    top_k: int
    max_top_k: int
    max_text_chars: int
    max_request_bytes: int
    image_limits: ImageLimits
    token_env: str
    token_file: str | None
    approximate_from: int | None
    ef_search: int


@dataclass
class ServeResult(Tracked):
    url: str = label("search page")
    model: str = label("model")
    index_version: str = label("index version")
    action: str = label("done")  # deployed, indexed or stopped
    images: int = label("images indexed", default=0)
    embedded_now: int = label("images embedded now", default=0)
    token_file: str | None = label("bearer token in", default=None)
    app_name: str = hidden(default="")
    index_rejected: dict[str, int] = field(default_factory=dict)

    def notes(self) -> dict[str, str]:
        if self.action != "deployed":
            return {}
        token = f"$(cat {self.token_file})" if self.token_file else "$LLM2CLIP_SERVE_TOKEN"
        return {"try it": f"curl -s -H \"Authorization: Bearer {token}\" -H 'Content-Type: application/json' "
                          f"-d '{{\"text\": \"a red circle above a blue square\"}}' {self.url}search",
                "stop it": "make serve-down (python -m jobs.serve --config ... --set serve.action=stop)"}


def _actor_options(spec: ServeDeployment) -> dict:
    options = {"num_cpus": spec.cpus, "num_gpus": spec.gpus, "resources": dict(spec.resources)}
    env = worker_runtime_env()  # storage settings and the tracking server, as every job hands them on
    return options | ({"runtime_env": env} if env else {})


def _device(spec: ServeDeployment) -> str:
    return "cuda" if spec.gpus > 0 else "cpu"


# ---------------------------------------------------------------- model deployments
@serve.deployment
class ClipTowers:
    """The vision tower + projection, and the text side (adapter, or CLIP text tower)."""

    def __init__(self, model: str, spec: ServeDeployment):
        import torch

        from pipeline.clip_model import LLM2CLIP

        torch.set_num_threads(max(1, int(spec.cpus)))
        self.model = LLM2CLIP.from_pretrained(model, device=_device(spec))
        for method in (self.embed_image, self.adapt, self.embed_text):
            method.set_max_batch_size(spec.max_batch_size)
            method.set_batch_wait_timeout_s(spec.batch_wait_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def embed_image(self, images: list) -> list[np.ndarray]:
        return list(self.model.encode_image(images).numpy())

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def adapt(self, llm_vectors: list[np.ndarray]) -> list[np.ndarray]:
        return list(self.model.encode_text(np.stack(llm_vectors)).numpy())

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def embed_text(self, texts: list[str]) -> list[np.ndarray]:  # a CLIP text tower
        return list(self.model.embed_texts(texts).numpy())

    def adapt_all(self, llm_vectors: np.ndarray) -> np.ndarray:
        """Many LLM embeddings at once (the dataset's captions, at start-up)."""
        return self.model.encode_text(llm_vectors).numpy()


@serve.deployment
class LlmEncoder:
    """The LLM text encoder the model's adapter was trained on: raw (unnormalised) embeddings."""

    def __init__(self, text_encoder: str, expected: str | None, precision: str, spec: ServeDeployment):
        """`expected`: the encoder_version the model's adapter was trained on (checked against the loaded encoder)."""
        import torch

        from pipeline.hardware import resolve_precision
        from pipeline.text_encoder import TextEncoder

        torch.set_num_threads(max(1, int(spec.cpus)))
        # resolved here, on the replica's hardware; in fp32 where embed ran bf16, ranks near a tie moved
        dtype = resolve_precision(precision, spec.gpus > 0)
        self.encoder = TextEncoder.from_pretrained(text_encoder, dtype=dtype, device=_device(spec))
        if expected and self.encoder.encoder_version != expected:
            raise ValueError(f"serve.text_encoder: {text_encoder} is encoder {self.encoder.encoder_version}, but the model's adapter "
                             f"was trained on {expected}")
        self.encode.set_max_batch_size(spec.max_batch_size)
        self.encode.set_batch_wait_timeout_s(spec.batch_wait_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def encode(self, texts: list[str]) -> list[np.ndarray]:
        return list(self.encoder.encode(texts))


# ---------------------------------------------------------------- the HTTP front
api = FastAPI(title="llm2clip search", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(checks.BadRequest)
async def _refused(request: Request, error: checks.BadRequest) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    reason = checks.NOT_FOUND if error.status_code == 404 else "http_error"
    return JSONResponse({"error": reason, "reason": reason, "detail": str(error.detail)}, status_code=error.status_code)


@dataclass(frozen=True)
class CaptionIndex:
    texts: list[str]
    image_ids: list[str]
    index: VectorIndex


def _caption_rows(setup: SearchSetup, image_ids: set[str]) -> tuple[list[str], list[str], np.ndarray] | None:
    """(texts, image_ids, LLM embeddings) of the dataset's captions of `caption_versions`, when
    the embedding store holds them for the model's encoder; None when it does not."""
    import pyarrow as pa
    import pyarrow.compute as pc

    embeddings, captions = Store(setup.store_uri, "embeddings"), Store(setup.store_uri, "captions")
    if not setup.encoder_version or not embeddings.commits(setup.encoder_version):
        return None
    texts = {}
    for version in setup.caption_versions:
        if captions.commits(version):
            rows = captions.read(version, columns=["caption_id", "image_id", "text"])
            rows = rows.filter(pc.is_in(rows.column("image_id"), pa.array(sorted(image_ids), pa.string())))
            texts.update(zip(rows.column("caption_id").to_pylist(), rows.column("text").to_pylist()))
    if not texts:
        return None
    emb = embeddings.read(setup.encoder_version, columns=["caption_id", "image_id", "embedding"])
    emb = emb.filter(pc.is_in(emb.column("caption_id"), pa.array(list(texts), pa.string())))
    ids = emb.column("caption_id").to_pylist()
    # one row per distinct text: the first caption that says it
    first = list({texts[c]: i for i, c in reversed(list(enumerate(ids)))}.values())
    first.sort()
    emb = emb.take(pa.array(first, pa.int64()))
    return [texts[c] for c in emb.column("caption_id").to_pylist()], emb.column("image_id").to_pylist(), embedding_matrix(emb.column("embedding"))


@serve.deployment
@serve.ingress(api)
class SearchApi:
    async def __init__(self, setup: SearchSetup, clip, llm=None):
        self.setup, self.clip, self.llm = setup, clip, llm
        self.page_html = PAGE.read_text()  # once, not per request
        self.auth = checks.BearerAuth(checks.read_token(setup.token_env, setup.token_file))
        ids = dataset_images(setup.store_uri, setup.dataset, setup.split).column("image_id").to_pylist()
        loaded = load_index(setup.store_uri, setup.index_version, ids)
        if not loaded.image_ids:
            raise RuntimeError(f"the image index {setup.index_version} holds none of {setup.dataset}'s images: run jobs.serve "
                               "(it builds the index) before deploying")
        self.image_ids, self.thumbnails = loaded.image_ids, loaded.thumbnails
        self.images = VectorIndex(loaded.vectors, setup.approximate_from, ef_search=setup.ef_search)
        self.captions: CaptionIndex | None = None
        rows = _caption_rows(setup, set(self.image_ids)) if setup.text_tower == "llm" else None
        if rows:
            texts, owners, llm_vectors = rows
            vectors = await self._call(self.clip.adapt_all, llm_vectors)
            self.captions = CaptionIndex(texts, owners, VectorIndex(vectors, setup.approximate_from, ef_search=setup.ef_search))

    async def _call(self, method, *args):
        """A deployment call, sent again when the replica it went to died."""
        from ray.exceptions import RayActorError

        for attempt in range(CALL_RETRIES + 1):
            try:
                return await method.remote(*args)
            except RayActorError:
                if attempt == CALL_RETRIES:
                    raise
                await asyncio.sleep(0.2 * (attempt + 1))

    # ------------------------------------------------------------ reading requests
    async def _body(self, request: Request) -> bytes:
        self.auth.check(request.headers.get("authorization"))
        declared = request.headers.get("content-length")
        checks.check_size(int(declared) if declared and declared.isdigit() else None, self.setup.max_request_bytes)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            checks.check_size(len(body), self.setup.max_request_bytes)
        return bytes(body)

    async def _json(self, request: Request) -> dict:
        import json

        body = await self._body(request)
        try:
            data = json.loads(body or b"null")
        except (ValueError, UnicodeDecodeError) as e:
            raise checks.BadRequest(checks.BAD_JSON, f"the body is not JSON: {e}") from None
        if not isinstance(data, dict):
            raise checks.BadRequest(checks.BAD_JSON, "the body must be a JSON object, e.g. {\"text\": \"...\"}")
        return data

    def _k(self, value: object) -> int:
        return checks.positive_int(value, "k", self.setup.top_k, self.setup.max_top_k)

    # ------------------------------------------------------------ embedding
    async def _text_vector(self, query: checks.TextQuery) -> np.ndarray:
        if self.llm is None:
            return await self._call(self.clip.embed_text, query.text)
        raw = await self._call(self.llm.encode, query.text)
        return await self._call(self.clip.adapt, raw)

    async def _image_vector(self, body: bytes) -> np.ndarray:
        if not body:
            raise checks.BadRequest(checks.NO_QUERY, "send the image's bytes as the request body")
        image = checks.image_query(body, self.setup.image_limits)
        return await self._call(self.clip.embed_image, image)

    def _image_hits(self, vector: np.ndarray, k: int) -> list[dict]:
        hits = self.images.search(vector, k)[0]
        return [{"rank": r + 1, "image_id": self.image_ids[i], "score": round(float(s), 6),
                 "thumbnail": checks.data_uri(self.thumbnails[i])} for r, (i, s) in enumerate(zip(hits.rows, hits.scores))]

    def _caption_hits(self, vector: np.ndarray, k: int) -> list[dict]:
        if self.captions is None:
            return []
        hits = self.captions.index.search(vector, k)[0]
        return [{"rank": r + 1, "text": self.captions.texts[i], "image_id": self.captions.image_ids[i], "score": round(float(s), 6)}
                for r, (i, s) in enumerate(zip(hits.rows, hits.scores))]

    # ------------------------------------------------------------ routes
    @api.get("/health")
    def health(self) -> dict:
        return {"status": "ok", "model": self.setup.model, "dataset": self.setup.dataset, "images": len(self.image_ids),
                "captions": len(self.captions.texts) if self.captions else 0, "index": self.images.kind,
                "index_version": self.setup.index_version}

    @api.get("/", response_class=HTMLResponse)
    def page(self) -> str:
        return self.page_html

    @api.post("/embed/text")
    async def embed_text(self, request: Request) -> dict:
        query = checks.text_query((await self._json(request)).get("text"), self.setup.max_text_chars)
        vector = await self._text_vector(query)
        return {"embedding": [float(v) for v in vector], "dim": len(vector), "truncated": query.truncated, "chars": query.chars}

    @api.post("/embed/image")
    async def embed_image(self, request: Request) -> dict:
        vector = await self._image_vector(await self._body(request))
        return {"embedding": [float(v) for v in vector], "dim": len(vector)}

    @api.post("/search")
    async def search(self, request: Request) -> dict:
        """JSON {"text": ..., "k": ...} searches by text; image bytes (any other content type,
        `?k=` in the URL) search by image and also return the dataset's nearest captions."""
        started = time.perf_counter()
        if request.headers.get("content-type", "").split(";")[0].strip() == "application/json":
            data = await self._json(request)
            k = self._k(data.get("k"))
            query = checks.text_query(data.get("text"), self.setup.max_text_chars)
            vector = await self._text_vector(query)
            out = {"query": {"kind": "text", "truncated": query.truncated, "chars": query.chars}, "images": self._image_hits(vector, k)}
        else:
            raw_k = request.query_params.get("k")
            k = self._k(None if raw_k is None else int(raw_k) if raw_k.isdigit() else raw_k)
            vector = await self._image_vector(await self._body(request))
            out = {"query": {"kind": "image"}, "images": self._image_hits(vector, k), "captions": self._caption_hits(vector, k)}
        return out | {"index": self.images.kind, "ms": round(1000 * (time.perf_counter() - started), 2)}


# ---------------------------------------------------------------- building and deploying
def pinned_model(cfg: PipelineConfig) -> str:
    """The model to serve, an alias resolved to its version (every replica loads the same weights)."""
    from pipeline.model_refs import pin_alias

    ref = cfg.serve.model
    if ref is None:
        tc = cfg.train_clip
        if not tc.register_as:
            raise ValueError("serve.model: name the model (models:/NAME@ALIAS, models:/NAME/VERSION or a path)")
        ref = f"models:/{tc.register_as}@{tc.register_alias}"
    return pin_alias(ref, cfg.mlflow.tracking_uri if cfg.mlflow.enabled else None)


@ray.remote(num_cpus=0.1)
def _model_config(ref: str):
    from pipeline.clip_model import LLM2CLIPConfig

    config = LLM2CLIPConfig.of_model(ref)
    if config is None:
        raise ValueError(f"serve.model: {ref} is not an LLM2CLIP model (no model config)")
    return config


def search_setup(cfg: PipelineConfig, model: str, index_version: str) -> SearchSetup:
    """What the replicas need, the model's config read once here (not in every replica)."""
    sc = cfg.serve
    recorded = ray.get(_model_config.options(runtime_env=worker_runtime_env()).remote(model))
    text_encoder = sc.text_encoder or recorded.text_encoder
    if recorded.text_tower == "llm" and text_encoder is None:
        raise ValueError("serve.text_encoder: the model records no text encoder; name it")
    return SearchSetup(
        store_uri=cfg.store.uri, dataset=sc.dataset or cfg.ingest.dataset, split=sc.split, model=model, text_tower=recorded.text_tower,
        text_encoder=text_encoder, encoder_version=recorded.encoder_version, caption_versions=tuple(sc.caption_versions), index_version=index_version,
        top_k=sc.top_k, max_top_k=sc.max_top_k, max_text_chars=sc.max_text_chars, max_request_bytes=sc.max_request_bytes,
        image_limits=sc.image_limits, token_env=sc.token_env, token_file=sc.token_file, approximate_from=sc.approximate_from,
        ef_search=sc.ef_search)


def search_app(cfg: PipelineConfig, setup: SearchSetup):
    """The bound application: SearchApi over ClipTowers (and LlmEncoder for the llm tower)."""
    sc = cfg.serve
    clip = ClipTowers.options(num_replicas=sc.clip_deployment.replicas, ray_actor_options=_actor_options(sc.clip_deployment))
    clip = clip.bind(setup.model, sc.clip_deployment)
    llm = None
    if setup.text_tower == "llm":
        llm = LlmEncoder.options(num_replicas=sc.text_deployment.replicas, ray_actor_options=_actor_options(sc.text_deployment))
        llm = llm.bind(setup.text_encoder, setup.encoder_version, sc.text_precision, sc.text_deployment)
    front = ServeDeployment(replicas=sc.api_replicas, cpus=sc.api_cpus)
    return SearchApi.options(num_replicas=sc.api_replicas, ray_actor_options=_actor_options(front)).bind(setup, clip, llm)


def ensure_token(cfg: PipelineConfig) -> str | None:
    """Locally, with neither the variable nor a file set: a new random token in
    {run_dir}/serve/token (mode 600), the file the service then reads. Returns the file used."""
    import os

    sc = cfg.serve
    if os.environ.get(sc.token_env) or sc.token_file:
        return sc.token_file
    path = Path(cfg.run_dir) / "serve" / "token"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(32) + "\n")
        path.chmod(0o600)
    cfg.serve.token_file = str(path)
    return str(path)


def run_serve(cfg: PipelineConfig, tracker: Tracker) -> ServeResult:
    sc = cfg.serve
    if sc.action == "stop":
        serve.delete(sc.app_name)
        return ServeResult(url="", model="", index_version="", app_name=sc.app_name, action="stopped")
    model = pinned_model(cfg)
    dataset = sc.dataset or cfg.ingest.dataset
    log.info("serve: model %s, dataset %s%s", model, dataset, f" (split {sc.split})" if sc.split else "")
    # the dataset's images are read as ingest read them (serve.image_limits is for uploads)
    built = build_index(cfg.store.uri, model, dataset, sc.split, cfg.ingest.limits.max_bytes, sc.thumbnail_size, sc.index_actors,
                        sc.index_batch_size, sc.index_cpus, sc.index_gpus, tracker.run_id)
    log.info("serve: index %s: %d images, %d embedded now", built.version, built.images, built.written)
    tracker.log_params({"serve.model": model, "serve.index_version": built.version})
    tracker.log_metrics({"serve.images": built.images, "serve.embedded_now": built.written})
    result = ServeResult(url="", model=model, index_version=built.version, images=built.images - sum(built.rejected.values()),
                         embedded_now=built.written, app_name=sc.app_name, index_rejected=built.rejected, action="indexed")
    if sc.action == "deploy":
        result.token_file = ensure_token(cfg)
        setup = search_setup(cfg, model, built.version)
        serve.start(http_options={"host": sc.host, "port": sc.port})
        serve.run(search_app(cfg, setup), name=sc.app_name, route_prefix=sc.route_prefix, blocking=False)
        result.url, result.action = f"http://{sc.host}:{sc.port}{sc.route_prefix.rstrip('/')}/", "deployed"
    result.tracked_by(tracker)
    return result


def app(args: dict):
    """The application builder of a RayService (serveConfigV2 `import_path:
    pipeline.stages.serve:app`). `args`: `config` (a repo config), `model` (the version to serve;
    an alias is pinned here), `set` (overrides, as --set). The index must exist (serve.action=index)."""
    from pipeline.config import load_config
    from pipeline.stages.image_index import index_identity

    overrides = [*(args.get("set") or []), *([f"serve.model={args['model']}"] if args.get("model") else [])]
    cfg = load_config(args["config"], overrides)
    model = pinned_model(cfg)
    return search_app(cfg, search_setup(cfg, model, index_identity(model, cfg.serve.thumbnail_size)[0]))

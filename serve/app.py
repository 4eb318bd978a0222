"""The MUSAR Ray Serve application: an HTTP ingress and a model deployment.

    client --HTTP--> MusarIngress (FastAPI)  --handle, multiplexed_model_id=<lora id>-->  MusarModel
                     auth, body limits,                                                   MUSARPipeline,
                     parsing, validation,                                                 @serve.batch,
                     image decoding, timeout                                              @serve.multiplexed LoRAs

``MusarIngress`` refuses everything it can before the model sees a request (``serve/api.py``): a bad
request costs the model replica nothing and cannot make it unhealthy. ``MusarModel`` holds one
pipeline; concurrent compatible requests (same LoRA, size, steps, guidance and subject count) are
batched by ``@serve.batch`` into ONE pipeline call with a list of prompts, per-prompt subjects and
one seeded generator per image, so each image equals the same request run alone (up to batched-kernel
rounding). LoRAs are served side by side with ``@serve.multiplexed``: a model id names a LoRA that the
operator registered in the config (a folder or ``mlflow:<run_id>``); the "model" it loads is the set
of LoRA weights, held in memory per replica (LRU) and copied into the one transformer before a batch
that uses it, so N LoRAs cost N adapter copies, not N base models. Serve splits batches by model id.
All pipeline work runs in one worker thread per replica, so weight swaps never race a generation.

Deploy with ``serve deploy serve/serve_config.yaml`` (or ``serve run``), or ``musar serve`` locally.
"""

# No `from __future__ import annotations`: the deployment classes travel by value, and FastAPI must see
# real annotation objects (a string "Request" would no longer resolve in the replica).

import asyncio
import base64
import collections
import dataclasses
import hmac
import io
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from .api import ApiError, GenerateRequest, check_content_length, parse_body, validate
from .config import ServeAppConfig

logger = logging.getLogger("ray.serve")

MODEL_DEPLOYMENT = "MusarModel"
INGRESS_DEPLOYMENT = "MusarIngress"
WEB_PAGE = Path(__file__).parent / "web" / "index.html"
LATENCY_BUCKETS_S = [0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300]


def _metric(kind: str, name: str, description: str, **kwargs):
    from ray.serve import metrics

    return getattr(metrics, kind)(name, description=description, **kwargs)


# ---- LoRA weights --------------------------------------------------------------------------------
class LoraWeights:
    """One LoRA's adapter tensors, kept in memory and copied into the live transformer on demand."""

    def __init__(self, lora_id: str, tensors: dict, meta: dict | None) -> None:
        self.id, self.tensors, self.meta = lora_id, tensors, meta

    @staticmethod
    def snapshot(lora_id: str, transformer, meta: dict | None = None) -> "LoraWeights":
        tensors = {k: p.detach().clone() for k, p in transformer.named_parameters()
                   if ".lora_A." in k or ".lora_B." in k}  # fmt: skip
        return LoraWeights(lora_id, tensors, meta)

    def apply(self, transformer) -> None:
        import torch

        params = dict(transformer.named_parameters())
        with torch.no_grad():
            for key, value in self.tensors.items():
                params[key].copy_(value)


def resolve_lora_source(source: str, tracking_uri: str) -> Path:
    """A registered LoRA source -> a local folder: the folder itself, or an MLflow run's ``lora`` artifact."""
    if source.startswith("mlflow:"):
        import mlflow

        from training.checkpoints import LORA_DIR
        from training.tracking import resolve_tracking_uri

        mlflow.set_tracking_uri(resolve_tracking_uri(tracking_uri))
        return Path(mlflow.artifacts.download_artifacts(run_id=source.split(":", 1)[1], artifact_path=LORA_DIR))
    return Path(source).expanduser().resolve()


def _error(status: int, field: str, message: str) -> dict:
    return {"ok": False, "status": status, "field": field, "message": message}


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# ---- model deployment ----------------------------------------------------------------------------
@serve.deployment(name=MODEL_DEPLOYMENT)
class MusarModel:
    """One ``MUSARPipeline`` per replica, batched requests, multiplexed LoRAs."""

    def __init__(self, cfg: ServeAppConfig) -> None:
        from musar.generate import GenerateConfig, load_pipeline
        from musar_core.checkpoint import check_compatible, read_metadata

        self.cfg = cfg
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="musar-pipeline")
        if cfg.device == "cpu":  # as many torch threads as CPUs Ray gave the replica: more thrash a shared machine
            import ray
            import torch

            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
            torch.set_num_threads(max(1, int(cpus)))
        default_lora = resolve_lora_source(cfg.lora, cfg.mlflow_tracking_uri) if cfg.lora else None
        self.pipe = load_pipeline(GenerateConfig(
            model=cfg.model, lora=str(default_lora) if default_lora else None, device=cfg.device, dtype=cfg.dtype,
            offload=cfg.offload, max_sequence_length=cfg.max_sequence_length, max_subjects=cfg.limits.max_subjects,
            musar=cfg.musar))  # fmt: skip
        transformer = self.pipe.transformer
        self.max_prompt_tokens = min(self.pipe.max_sequence_length, self.pipe.encoders.tokenizer_2.model_max_length)
        # Registered folders are checked now: a LoRA that does not fit the model fails the deployment, not a request.
        for lora_id, source in cfg.loras.items():
            if not source.startswith("mlflow:"):
                try:
                    check_compatible(read_metadata(resolve_lora_source(source, cfg.mlflow_tracking_uri)), transformer)
                except ValueError as err:
                    raise ValueError(f"loras.{lora_id}: {err}") from err
        self._default: LoraWeights | None = None
        if cfg.loras:  # requests switch LoRAs: keep the default's weights (zero adapters if there is none) to return to
            if not transformer.has_lora:
                transformer.add_lora()
            self._default = LoraWeights.snapshot("", transformer)
        self._active: LoraWeights | None = self._default
        self.lora_weights = serve.multiplexed(max_num_models_per_replica=cfg.model_deployment.max_loras_per_replica)(
            self._make_loader())  # fmt: skip
        self.generate_batch.set_max_batch_size(cfg.batching.max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(cfg.batching.batch_wait_timeout_s)

        self._queued = 0  # requests inside generate(): waiting for a batch or running
        self._calls = 0
        self._requests = 0
        self._recent = collections.deque(maxlen=256)  # (call id, batch size, lora id) of recent pipeline calls
        self._fatal: str | None = None
        self._m_queue = _metric("Gauge", "musar_model_queue_length", "Requests waiting for or in a pipeline call")
        self._m_batch = _metric("Histogram", "musar_model_batch_size", "Images per pipeline call",
                                boundaries=[1, 2, 3, 4, 6, 8, 12, 16, 32])  # fmt: skip
        self._m_call = _metric("Histogram", "musar_model_pipeline_seconds", "Seconds per pipeline call",
                               boundaries=LATENCY_BUCKETS_S)  # fmt: skip
        self._m_swaps = _metric("Counter", "musar_model_lora_swaps", "LoRA weight swaps into the transformer")
        self._m_queue.set(0)
        logger.info("MusarModel ready: model=%s loras=%s batching=%s", cfg.model, sorted(cfg.loras), cfg.batching)

    # -- requests --
    async def generate(self, req: GenerateRequest) -> dict:
        """One request (already validated by the ingress) -> result dict; client errors are returned, not raised."""
        from musar_core.encoding import phrase_token_span
        from musar_core.subjects import phrase_char_span

        req.timings["model_received"] = time.time()
        tokenizer = self.pipe.encoders.tokenizer_2
        for i, subject in enumerate(req.subjects):  # token-level checks, so one bad request never fails a batch
            try:
                phrase_token_span(tokenizer, req.prompt, *phrase_char_span(req.prompt, subject), self.max_prompt_tokens)
            except ValueError as err:
                return _error(422, f"subjects[{i}].phrase", str(err))
        self._queued += 1
        self._requests += 1
        self._m_queue.set(self._queued)
        try:
            return await self.generate_batch(req)
        finally:
            self._queued -= 1
            self._m_queue.set(self._queued)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def generate_batch(self, reqs: list[GenerateRequest]) -> list[dict]:
        model_id = serve.get_multiplexed_model_id()
        try:
            weights = await self.lora_weights(model_id) if model_id else self._default
        except KeyError:
            return [_error(404, "lora", f"unknown LoRA id {model_id!r}")] * len(reqs)
        except Exception as err:  # a registered LoRA that cannot be loaded is the server's problem
            logger.exception("loading LoRA %r failed", model_id)
            return [_error(500, "lora", f"LoRA {model_id!r} could not be loaded: {err}")] * len(reqs)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(reqs):
            groups.setdefault(r.batch_key(), []).append(i)
        results: list[dict | None] = [None] * len(reqs)
        loop = asyncio.get_running_loop()
        for indices in groups.values():
            outs = await loop.run_in_executor(self._executor, self._run_group, weights, [reqs[i] for i in indices])
            for i, out in zip(indices, outs):
                results[i] = out
        return results

    def _make_loader(self):
        async def load_lora(model_id: str) -> LoraWeights:
            source = self.cfg.loras[model_id]  # KeyError: unknown id (never a path from a request)
            return await asyncio.get_running_loop().run_in_executor(self._executor, self._load_lora, model_id, source)

        return load_lora

    def _load_lora(self, model_id: str, source: str) -> LoraWeights:
        """Runs in the pipeline thread: load with the checkpoint's own checks, keep a copy of the weights."""
        transformer = self.pipe.transformer
        self._active = None  # the transformer's adapters are being overwritten
        meta = transformer.load_lora(resolve_lora_source(source, self.cfg.mlflow_tracking_uri))
        weights = LoraWeights.snapshot(model_id, transformer, meta)
        self._active = weights
        logger.info("loaded LoRA %r from %s", model_id, source)
        return weights

    def _run_group(self, weights: LoraWeights | None, reqs: list[GenerateRequest]) -> list[dict]:
        """Runs in the pipeline thread: one pipeline call for compatible requests (each alone if it fails)."""
        try:
            return self._pipeline_call(weights, reqs)
        except ValueError as err:
            if len(reqs) > 1:  # isolate the request that the pipeline refused
                return [self._run_group(weights, [r])[0] for r in reqs]
            return [_error(422, "body", str(err))]
        except Exception as err:
            import torch

            if isinstance(err, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
                message = "the model ran out of device memory; retry, or ask for a smaller size"
                return [_error(503, "body", message)] * len(reqs)
            if "CUDA error" in str(err):
                self._fatal = f"device fault: {err}"
            logger.exception("pipeline call failed")
            return [_error(500, "body", f"internal error during generation: {type(err).__name__}")] * len(reqs)

    def _pipeline_call(self, weights: LoraWeights | None, reqs: list[GenerateRequest]) -> list[dict]:
        import torch

        from musar_core.routing_maps import render_routing_map

        if weights is not None and self._active is not weights:
            weights.apply(self.pipe.transformer)
            self._active = weights
            self._m_swaps.inc()
        first = reqs[0]
        started = time.time()
        out = self.pipe(
            [r.prompt for r in reqs], [r.subjects for r in reqs] if first.subjects else None,
            height=first.height, width=first.width, num_inference_steps=first.steps, guidance_scale=first.guidance,
            generator=[torch.Generator("cpu").manual_seed(r.seed) for r in reqs],
            return_routing=any(r.routing_map for r in reqs), progress=False,
        )  # fmt: skip
        finished = time.time()
        self._calls += 1
        call_id = self._calls
        self._recent.append((call_id, len(reqs), weights.id if weights else ""))
        self._m_batch.observe(len(reqs))
        self._m_call.observe(finished - started)
        results = []
        for i, r in enumerate(reqs):
            routing_png = None
            if r.routing_map:
                trace = dataclasses.replace(out.routing, subjects=[s.phrase for s in r.subjects])
                routing_png = _png(render_routing_map(out.images[i], trace, sample=i))
            timings = {**r.timings, "batch_started": started, "batch_finished": finished}
            results.append({"ok": True, "image": _png(out.images[i]), "routing_map": routing_png, "seed": r.seed,
                            "batch_size": len(reqs), "model_call": call_id, "timings": timings})  # fmt: skip
        return results

    # -- operations --
    def check_health(self) -> None:
        """Serve's health check: a replica is unhealthy only after a device fault, never after bad input."""
        if self._fatal:
            raise RuntimeError(self._fatal)

    async def health(self) -> dict:
        return {"status": "ok" if not self._fatal else "unhealthy", "queue_length": self._queued}

    async def stats(self) -> dict:
        return {"pipeline_calls": self._calls, "requests": self._requests, "queue_length": self._queued,
                "recent_calls": list(self._recent),
                "active_lora": self._active.id if self._active else None}  # fmt: skip

    def __del__(self) -> None:
        # Graceful shutdown: Serve stops routing to the replica and waits graceful_shutdown_wait_loop_s for
        # requests in flight; then the pipeline thread finishes the call it is in before the replica exits.
        executor = getattr(self, "_executor", None)
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)


# ---- HTTP ingress --------------------------------------------------------------------------------
api = FastAPI(title="MUSAR", version="1", docs_url=None, redoc_url=None)  # docs pages would load assets from a CDN
_INGRESS_METRICS: dict = {}


@api.exception_handler(ApiError)
async def _api_error(request: Request, err: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    if err.status in (429, 503):
        headers = {"Retry-After": "5"}
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(ApiError(err.status_code, "path", str(err.detail)).body(), status_code=err.status_code)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
    first = err.errors()[0] if err.errors() else {"loc": ("body",), "msg": "invalid request"}
    field = ".".join(str(p) for p in first["loc"])
    return JSONResponse(ApiError(422, field, first["msg"]).body(), status_code=422)


@api.middleware("http")
async def _count(request: Request, call_next):
    started = time.perf_counter()
    route = request.url.path if request.url.path in ("/", "/healthz", "/v1/models", "/v1/generate") else "other"
    gauge = _INGRESS_METRICS.get("in_flight")
    _INGRESS_METRICS["in_flight_n"] = _INGRESS_METRICS.get("in_flight_n", 0) + 1
    if gauge:
        gauge.set(_INGRESS_METRICS["in_flight_n"])
    status = 500
    try:
        response = await call_next(request)
        status = response.status_code
        return response
    finally:
        _INGRESS_METRICS["in_flight_n"] -= 1
        if gauge:
            gauge.set(_INGRESS_METRICS["in_flight_n"])
        if "requests" in _INGRESS_METRICS:
            tags = {"route": route, "status": str(status)}
            _INGRESS_METRICS["requests"].inc(tags=tags)
            _INGRESS_METRICS["latency"].observe(time.perf_counter() - started, tags={"route": route})


def _init_ingress_metrics() -> None:
    # A module-level function, so that it runs against this module's globals in the replica (the deployment
    # classes themselves travel by value and would update a copy of _INGRESS_METRICS).
    _INGRESS_METRICS.update(
        requests=_metric("Counter", "musar_http_requests", "HTTP requests by route and status",
                         tag_keys=("route", "status")),
        latency=_metric("Histogram", "musar_http_request_seconds", "HTTP request latency by route",
                        boundaries=LATENCY_BUCKETS_S, tag_keys=("route",)),
        in_flight=_metric("Gauge", "musar_http_in_flight", "HTTP requests being handled"),
    )  # fmt: skip


def _parse_and_validate(body: bytes, content_type: str | None, accept: str | None, cfg: ServeAppConfig):
    """In a worker thread: parsing a large multipart body and decoding images must not stall the event loop."""
    return validate(parse_body(content_type, body), cfg, known_loras=set(cfg.loras), accept=accept)


async def _awaited(response):
    return await response


async def _read_body(request: Request, limit: int) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "body", f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _respond(req: GenerateRequest, result: dict, received: float) -> Response:
    t = result["timings"]
    done = time.time()
    timings = {
        "total_s": round(done - received, 4),
        "validate_s": round(t["validated"] - t["received"], 4),
        "queue_s": round(t["batch_started"] - t["validated"], 4),
        "generate_s": round(t["batch_finished"] - t["batch_started"], 4),
    }
    meta = {"seed": result["seed"], "width": req.width, "height": req.height, "steps": req.steps,
            "guidance": req.guidance, "lora": req.lora, "batch_size": result["batch_size"],
            "model_call": result["model_call"], "timings": timings}  # fmt: skip
    if req.response_format == "json":
        body = {"image": base64.b64encode(result["image"]).decode(), "format": "png", **meta}
        if req.routing_map:
            body["routing_map"] = base64.b64encode(result["routing_map"]).decode()
        return JSONResponse(body)
    headers = {"X-Seed": str(result["seed"]), "X-Batch-Size": str(result["batch_size"]),
               "X-Model-Call": str(result["model_call"]), "X-Timings": json.dumps(timings)}  # fmt: skip
    return Response(result["image"], media_type="image/png", headers=headers)


@serve.deployment(name=INGRESS_DEPLOYMENT)
@serve.ingress(api)
class MusarIngress:
    """HTTP: ``/`` (web page), ``/healthz``, ``GET /v1/models``, ``POST /v1/generate``."""

    def __init__(self, model, cfg: ServeAppConfig, token: str | None) -> None:
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = cfg.limits.max_pixels  # PIL's own bomb check agrees with ours
        self.model, self.cfg, self._token = model, cfg, token
        self._page = WEB_PAGE.read_text()
        _init_ingress_metrics()

    def _authorize(self, request: Request) -> None:
        if self._token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self._token.encode()):
            raise ApiError(401, "authorization", "missing or wrong bearer token (Authorization: Bearer <token>)")

    @api.get("/", response_class=HTMLResponse)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(self._page)

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        try:
            model = await asyncio.wait_for(_awaited(self.model.health.remote()), timeout=10)
        except Exception as err:
            error = f"model deployment: {type(err).__name__}: {err}"
            return JSONResponse({"status": "unavailable", "error": error}, status_code=503)
        return JSONResponse({"status": "ok" if model["status"] == "ok" else "degraded", "model": model})

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self._authorize(request)
        registered = [{"id": k, "source": "mlflow" if v.startswith("mlflow:") else "folder"}
                      for k, v in sorted(self.cfg.loras.items())]  # fmt: skip
        return {
            "default": {"id": None, "lora": self.cfg.lora is not None},
            "models": registered,
            "limits": dataclasses.asdict(self.cfg.limits),
            "defaults": dataclasses.asdict(self.cfg.defaults),
            "auth": self._token is not None,
        }

    @api.post("/v1/generate")
    async def generate(self, request: Request) -> Response:
        received = time.time()
        lim = self.cfg.limits
        self._authorize(request)
        check_content_length(request.headers.get("content-length"), lim)
        body = await _read_body(request, lim.max_request_bytes())
        req = await asyncio.to_thread(_parse_and_validate, body, request.headers.get("content-type"),
                                      request.headers.get("accept"), self.cfg)  # fmt: skip
        req.timings["received"] = received
        req.timings["validated"] = time.time()
        handle = self.model if req.lora is None else self.model.options(multiplexed_model_id=req.lora)
        response = handle.generate.remote(req)
        remaining = lim.request_timeout_s - (time.time() - received)
        try:
            result = await asyncio.wait_for(_awaited(response), timeout=max(remaining, 0.001))
        except asyncio.TimeoutError:
            response.cancel()
            raise ApiError(504, "body", f"generation took longer than the limit of {lim.request_timeout_s} s") from None
        except Exception as err:
            from ray.serve.exceptions import BackPressureError

            if isinstance(err, BackPressureError):
                raise ApiError(503, "body", "the service is at capacity (queue full); retry shortly",
                               code="overloaded") from None  # fmt: skip
            logger.exception("model deployment call failed")
            raise ApiError(503, "body", f"the model deployment is unavailable ({type(err).__name__}); retry shortly",
                           code="unavailable") from None  # fmt: skip
        if not result["ok"]:
            raise ApiError(result["status"], result["field"], result["message"])
        return _respond(req, result, received)


# ---- building the application --------------------------------------------------------------------
def load_app_config(args: dict | ServeAppConfig | None) -> ServeAppConfig:
    """Serve's ``args`` -> ServeAppConfig: a YAML mapping, plus ``dotted.key=value`` strings from ``serve run``."""
    import yaml

    from musar.config import ConfigError, from_dict

    if isinstance(args, ServeAppConfig):
        return args
    data: dict = {}
    for key, value in dict(args or {}).items():
        if "." not in key:
            data[key] = value
            continue
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {part} is not a section")
        node[leaf] = yaml.safe_load(value) if isinstance(value, str) else value
    return from_dict(ServeAppConfig, data)


def build_app(args: dict | ServeAppConfig | None = None):
    """The application: ``serve.run(build_app(cfg))``, or ``import_path: serve.app:build_app`` in a Serve config."""
    cfg = load_app_config(args)
    token = None
    if cfg.auth_token_env:
        token = os.environ.get(cfg.auth_token_env)
        if not token:
            raise ValueError(f"auth_token_env: the environment variable {cfg.auth_token_env} is empty or unset")
    md = cfg.model_deployment
    model = MusarModel.options(
        autoscaling_config=md.autoscaling.to_serve(),
        max_ongoing_requests=md.max_ongoing_requests,
        max_queued_requests=md.max_queued_requests,
        health_check_period_s=md.health_check_period_s,
        health_check_timeout_s=md.health_check_timeout_s,
        graceful_shutdown_wait_loop_s=md.graceful_shutdown_wait_loop_s,
        graceful_shutdown_timeout_s=md.graceful_shutdown_timeout_s,
        ray_actor_options={"num_cpus": md.num_cpus, "num_gpus": md.num_gpus},
    ).bind(cfg)
    ing = cfg.ingress
    return MusarIngress.options(
        num_replicas=ing.num_replicas,
        max_ongoing_requests=ing.max_ongoing_requests,
        ray_actor_options={"num_cpus": ing.num_cpus},
    ).bind(model, cfg, token)

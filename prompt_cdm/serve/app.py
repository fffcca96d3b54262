"""HTTP service: compositions of a registry's sources, served by API key (FastAPI under uvicorn).

    prompt-cdm keys create --registry DIR --policy NAME     (prints a key once; --admin for an admin key)
    prompt-cdm serve --registry DIR [--host 127.0.0.1] [--port 8000]

Endpoints (`Authorization: Bearer KEY`; the schema is served at /openapi.json, docs at /docs):
    GET    /v1/health                      liveness, queue depth and counters (no key)
    GET    /v1/sources                     the sources this key's policy allows
    POST   /v1/generate                    {"prompt": str | [str], "sources", "router", "weights", "sparse", "caption_prior",
                                            "steps", "guidance", "seed", "size"} -> base64 PNGs, traces, credit
    GET    /v1/admin/sources               (admin key) every source, as `registry list`
    POST   /v1/admin/sources               (admin key) add a source: {"name", "files": {name: base64}}
    DELETE /v1/admin/sources/{name}        (admin key) forget it (the running generation finishes first)
    GET    /v1/admin/policies              (admin key)
    PUT    /v1/admin/policies/{name}       (admin key) {"sources": [...]}
    DELETE /v1/admin/policies/{name}       (admin key)

Answers: 401 missing/unknown/revoked key; 403 a source outside the key's policy (default deny: the
message names only what was asked for); 409 a source whose adapter does not load, or a forget that
could not finish (the source is out of the index and unloaded; rerun `registry forget`); 422 bad
JSON (nested too deeply included), wrong types, unknown fields, out-of-bound steps/prompts/size, an
upload that is not a valid adapter for this backbone, a generation whose noise prediction turned
NaN/inf; 429 + Retry-After when the queue is full; 504 past the request timeout.
Generation runs in `engine.Engine` (one worker, bounded queue); this module is only the HTTP edge.
"""

import asyncio
import base64
import binascii
import os
import re
import socket
import tempfile
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from .worker import PLACEHOLDER_IN_TEXT, PLACEHOLDER_MSG, Busy, Engine, Invalid, Job, ServeError, check_weights
from ..estimators import ESTIMATORS
from .keys import KeyRecord

NAME = r"^[A-Za-z0-9][A-Za-z0-9_\-]*$"  # registry source / policy names
FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


@dataclass
class ServeConfig:
    """Bounds of the service (a request beyond them is refused with 422; a full queue with 429)."""

    max_steps: int = field(default=50, metadata={"help": "sampling steps allowed per request (more: 422)"})
    # one UNet batch: 8 x (n+1) rows
    max_prompts: int = field(default=8, metadata={"help": "prompts (images) allowed per request (more: 422)"})
    # CLIP reads 77 tokens; more text is truncated anyway
    max_prompt_chars: int = field(default=500, metadata={"help": "characters allowed per prompt (more: 422)"})
    max_sources: int = field(default=32, metadata={"help": "sources named in one request (more: 422)"})
    max_guidance: float = field(default=50.0, metadata={"help": "largest guidance scale a request may ask"})
    default_steps: int = field(default=25, metadata={"help": "sampling steps of a request that names none (serve: 25, or max_steps when lower)"})
    default_guidance: float = field(default=5.0, metadata={"help": "guidance scale of a request that names none"})
    queue_size: int = field(default=16, metadata={"help": "requests waiting behind the running one (more: 429)"})
    # queue wait + generation
    timeout_s: float = field(default=120.0, metadata={"help": "seconds from acceptance to answer (then 504)"})
    max_body_kb: int = field(default=256, metadata={"help": "request body size in KiB (admin uploads: max_upload_mb)"})
    # an SD1.5 rank-8 LoRA is ~3 MB
    max_upload_mb: int = field(default=64, metadata={"help": "uploaded adapter size in MiB (base64 JSON)"})
    threads: int = field(default=0, metadata={"help": "torch threads of the worker (0: torch's default)"})

    def __post_init__(self):
        for k in ("max_steps", "max_prompts", "max_prompt_chars", "max_sources", "queue_size", "max_body_kb",
                  "max_upload_mb", "default_steps"):
            if getattr(self, k) < 1:
                raise ValueError(f"serve config: {k} must be >= 1, got {getattr(self, k)}")
        if not 1 <= self.default_steps <= self.max_steps:
            raise ValueError(f"serve config: default_steps must be in 1..max_steps={self.max_steps}")
        if not 0 <= self.default_guidance <= self.max_guidance:
            raise ValueError(f"serve config: default_guidance must be in 0..max_guidance={self.max_guidance}")
        if self.timeout_s <= 0 or self.threads < 0:
            raise ValueError("serve config: timeout_s must be > 0 and threads >= 0")


class _Timeout(ServeError):
    status = 504


class Error(BaseModel):
    detail: str
    errors: list[dict[str, Any]] | None = None


def _errors(*codes: int) -> dict:
    why = {401: "missing, unknown or revoked key", 403: "not allowed for this key", 404: "not found",
           409: "the registry does not allow it now (a source that does not load; a forget to finish)",
           413: "request body too large", 422: "invalid request", 429: "queue full (see Retry-After)",
           504: "request timeout"}
    return {c: {"model": Error, "description": why[c]} for c in codes}


def _models(cfg: ServeConfig, side: int):
    """The request/response models; their bounds come from the config (so the schema shows them)."""
    SourceName = Annotated[str, StringConstraints(pattern=NAME, max_length=100)]
    Prompt = Annotated[str, StringConstraints(min_length=1, max_length=cfg.max_prompt_chars)]

    class GenerateRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        prompt: Prompt | Annotated[list[Prompt], Field(min_length=1, max_length=cfg.max_prompts)] = Field(
            description=f"one prompt, or a list of up to {cfg.max_prompts} (one image each)")
        sources: Annotated[list[SourceName], Field(min_length=1, max_length=cfg.max_sources)] | None = Field(
            None, description="sources to compose (default: every source the key's policy allows)")
        router: Literal[tuple(ESTIMATORS)] = Field("uniform", description="weight estimator")
        weights: dict[SourceName, Annotated[float, Field(ge=0, allow_inf_nan=False)]] | None = Field(
            None, description="mixing prior per composed source (the mixture itself for router 'fixed')")
        sparse: bool = Field(False, description="drop low-weight sources after a warm-up")
        caption_prior: bool = Field(False, description="multiply the mixing prior by each source's caption model "
                                    "p_i(prompt) (the registry's caption statistics)")
        steps: int = Field(cfg.default_steps, ge=1, le=cfg.max_steps)
        guidance: float = Field(cfg.default_guidance, ge=0, le=cfg.max_guidance, allow_inf_nan=False)
        seed: int = Field(0, ge=0, le=2**32 - 1)
        size: int | None = Field(None, ge=side, le=side,
                                 description=f"image side in pixels; this backbone makes {side}x{side} only")

        @field_validator("prompt")
        @classmethod
        def _no_placeholders(cls, v):
            if any(PLACEHOLDER_IN_TEXT.search(p) for p in ([v] if isinstance(v, str) else v)):
                raise ValueError(PLACEHOLDER_MSG)
            return v

    class Image(BaseModel):
        prompt: str
        png_base64: str
        trace: dict[str, Any] = Field(description="sources, timesteps, weights [steps x n], credit, final")

    class GenerateResponse(BaseModel):
        id: str
        sources: list[str]
        router: str
        steps: int
        guidance: float
        seed: int
        credit: dict[str, float] = Field(description="each source's weight averaged over steps and images")
        seconds: float
        images: list[Image]

    class AddSource(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        name: SourceName
        files: dict[Annotated[str, StringConstraints(pattern=FILE_NAME.pattern, max_length=200)], str] = Field(
            description="the adapter folder's files, base64 (adapter_config.json, adapter_model.safetensors, ...)",
            min_length=1, max_length=16)
        manifest: str | None = Field(None, description="the source's data manifest (JSON), base64")

    class Policy(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        sources: Annotated[list[SourceName], Field(min_length=1, max_length=1000)]

    return GenerateRequest, GenerateResponse, AddSource, Policy


def _validation_message(errors) -> str:
    parts = []
    for e in errors:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        if e.get("type") == "json_invalid":
            parts.append(f"the body is not valid JSON ({e.get('why') or 'decode error'}"
                         + (f" at character {loc[0]})" if loc else ")"))
            continue
        where = ".".join(loc).replace("constrained-str", "string") or "body"
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts[:5]) + (f" (and {len(parts) - 5} more)" if len(parts) > 5 else "")


class _BodyLimit:
    """ASGI middleware: 413 for a body over the limit (by Content-Length, and by counting chunks)."""

    def __init__(self, app, limit: int, upload_limit: int):
        self.app, self.limit, self.upload_limit = app, limit, upload_limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.upload_limit if scope["path"].startswith("/v1/admin/") else self.limit
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await JSONResponse({"detail": f"request body over {limit} bytes"}, status_code=413)(
                scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            msg = await receive()
            seen += len(msg.get("body", b""))
            if seen > limit:  # FastAPI passes an HTTPException raised while reading the body through
                raise HTTPException(413, f"request body over {limit} bytes")
            return msg

        await self.app(scope, counted, send)


def create_app(registry_dir: str | os.PathLike, pipe, config: ServeConfig | None = None) -> FastAPI:
    """The FastAPI app serving `registry_dir` from `pipe` (the registry's backbone, loaded).

    The engine (worker thread, applied adapters) starts with the app's lifespan and stops with it;
    it is `app.state.engine`."""
    cfg = config or ServeConfig()
    engine = Engine(registry_dir, pipe, queue_size=cfg.queue_size, threads=cfg.threads or None)
    GenerateRequest, GenerateResponse, AddSource, Policy = _models(cfg, engine.image_size)
    stats = {"accepted": 0, "answered": 0, "busy": 0, "timeouts": 0}

    @asynccontextmanager
    async def lifespan(app):
        await run_in_threadpool(engine.start)
        try:
            yield
        finally:
            await run_in_threadpool(engine.stop)

    app = FastAPI(title="prompt_cdm", version="1", lifespan=lifespan,
                  description="Compartmentalized diffusion: compose the sources your key may use.")
    app.state.engine, app.state.config, app.state.stats = engine, cfg, stats
    bearer = HTTPBearer(auto_error=False, description="an API key from `prompt-cdm keys create`")

    def user(cred: HTTPAuthorizationCredentials | None = Depends(bearer)) -> KeyRecord:
        return engine.authenticate(cred.credentials if cred else None)

    def admin(cred: HTTPAuthorizationCredentials | None = Depends(bearer)) -> KeyRecord:
        return engine.authenticate(cred.credentials if cred else None, admin=True)

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, e: ServeError):
        headers = {}
        if e.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        if isinstance(e, Busy):
            headers["Retry-After"] = str(e.retry_after)
        return JSONResponse({"detail": e.message}, status_code=e.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        errors = [{"loc": list(x.get("loc", ())), "msg": str(x.get("msg", "")), "type": str(x.get("type", "")),
                   **({"why": str(x["ctx"]["error"])} if x.get("type") == "json_invalid" and x.get("ctx") else {})}
                  for x in e.errors()]
        detail = _validation_message(errors)
        if any(x["loc"] == ["body"] and x["type"] in ("model_attributes_type", "dict_type") for x in errors):
            detail = "invalid request: the body must be a JSON object (Content-Type: application/json)"
        return JSONResponse({"detail": detail, "errors": errors}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        if e.status_code == 400 and isinstance(e.__cause__, (ValueError, RecursionError)):  # a body FastAPI could not decode
            why = ("not UTF-8 text" if isinstance(e.__cause__, UnicodeDecodeError) else
                   "nested too deeply" if isinstance(e.__cause__, RecursionError) else str(e.__cause__))
            return JSONResponse({"detail": f"invalid request: the body is not valid JSON ({why})"}, status_code=422)
        return await http_exception_handler(request, e)

    @app.get("/v1/health", summary="liveness and load")
    async def health() -> dict:
        return {"status": "ok", "backbone": engine.backbone_name, "queued": engine.queued,
                "queue_size": cfg.queue_size, **stats}

    @app.get("/v1/sources", summary="the sources this key may compose", responses=_errors(401))
    def sources(key: KeyRecord = Depends(user)) -> dict:
        return {"key": key.id, "policy": key.policy, "sources": engine.allowed(key), "image_size": engine.image_size,
                "routers": sorted(ESTIMATORS)}

    @app.post("/v1/generate", response_model=GenerateResponse, summary="compose and generate",
              responses=_errors(401, 403, 409, 413, 422, 429, 504))
    async def generate(req: GenerateRequest, key: KeyRecord = Depends(user)):
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        names = await run_in_threadpool(engine.authorize, key, req.sources)
        check_weights(req.weights, names)
        job = Job(key.id, prompts, req.sources, req.router, req.weights, req.sparse, req.steps, req.guidance, req.seed,
                  caption_prior=req.caption_prior, deadline=time.monotonic() + cfg.timeout_s)
        try:
            fut = engine.submit(job)
        except Busy:
            stats["busy"] += 1
            raise
        stats["accepted"] += 1
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), cfg.timeout_s)
        except asyncio.TimeoutError:
            stats["timeouts"] += 1
            raise _Timeout(f"generation did not finish within {cfg.timeout_s:g} s") from None
        finally:
            stats["answered"] += 1

    # -- admin ------------------------------------------------------------------------------------

    @app.get("/v1/admin/sources", summary="every source (admin)", responses=_errors(401, 403))
    def admin_sources(key: KeyRecord = Depends(admin)) -> dict:
        return {"sources": engine.registry_view("sources"), "loaded": engine.loaded, "broken": engine.broken}

    @app.post("/v1/admin/sources", status_code=201, summary="add a source (admin)",
              responses=_errors(401, 403, 413, 422))
    def admin_add(req: AddSource, key: KeyRecord = Depends(admin)) -> dict:
        from ..registry.registry import RegistryError

        with tempfile.TemporaryDirectory(prefix="prompt-cdm-upload-") as tmp:
            folder = Path(tmp) / req.name
            folder.mkdir()
            try:
                for fname, data in req.files.items():
                    (folder / fname).write_bytes(base64.b64decode(data, validate=True))
                manifest = None
                if req.manifest is not None:
                    manifest = Path(tmp) / "manifest.json"
                    manifest.write_bytes(base64.b64decode(req.manifest, validate=True))
            except (binascii.Error, ValueError) as e:
                raise Invalid(f"files must be base64 ({e})") from None
            try:
                return engine.add_source(req.name, folder, manifest)
            except RegistryError as e:
                raise Invalid(str(e).replace(str(folder), req.name)) from None

    @app.delete("/v1/admin/sources/{name}", summary="forget a source (admin)", responses=_errors(401, 403, 404, 409))
    def admin_forget(name: str, key: KeyRecord = Depends(admin)) -> dict:
        report = engine.forget(name)
        return dict(asdict(report), unloaded=name not in engine.loaded)

    @app.get("/v1/admin/policies", summary="access policies (admin)", responses=_errors(401, 403))
    def admin_policies(key: KeyRecord = Depends(admin)) -> dict:
        return {"policies": engine.registry_view("policies")}

    @app.put("/v1/admin/policies/{name}", summary="create or replace a policy (admin)",
             responses=_errors(401, 403, 422))
    def admin_set_policy(name: str, req: Policy, key: KeyRecord = Depends(admin)) -> dict:
        from ..registry.registry import RegistryError

        try:
            return {"policy": name, "sources": engine.set_policy(name, req.sources)}
        except RegistryError as e:
            raise Invalid(str(e)) from None

    @app.delete("/v1/admin/policies/{name}", summary="remove a policy (admin)", responses=_errors(401, 403, 404))
    def admin_remove_policy(name: str, key: KeyRecord = Depends(admin)) -> dict:
        engine.remove_policy(name)
        return {"removed": name}

    app.add_middleware(_BodyLimit, limit=cfg.max_body_kb * 1024, upload_limit=cfg.max_upload_mb * 1024 * 1024)
    return app


def bind(host: str = "127.0.0.1", port: int = 8000) -> socket.socket:
    """A listening socket (port 0: a free one; read it back with `sock.getsockname()[1]`)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def make_server(app, log_level: str = "warning"):
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=30))


def run(app, host: str = "127.0.0.1", port: int = 8000, announce=print) -> None:
    """Serve `app` with uvicorn until interrupted; `announce` gets the URL once the socket is bound."""
    sock = bind(host, port)
    h, p = sock.getsockname()[:2]
    announce(f"serving on http://{h if ':' not in h else f'[{h}]'}:{p} (schema: /openapi.json)")
    make_server(app, log_level="info").run(sockets=[sock])

"""`prompt-cdm serve` over real HTTP on loopback (uvicorn in a thread, a free port): keys stored hashed,
401/403/422/429/504, forgetting while serving, revocation, admin endpoints, the audit log, and a
schemathesis fuzz run against the served OpenAPI schema with no 5xx. Random tiny pipeline, 2 steps."""
from __future__ import annotations

import base64
import io
import json
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from PIL import Image

from helpers import save_random_adapters
from prompt_cdm.serve.audit import AuditLog
from prompt_cdm.cli import main
from prompt_cdm.serve.keys import KeyStore, KeyStoreError, keys_path
from prompt_cdm.registry.registry import Registry
from prompt_cdm.routing.routers import cache_caption_stats
from prompt_cdm.serve.app import ServeConfig, bind, create_app, make_server
from prompt_cdm.world.dataset import render_domain

# small bounds: steps 2 keep a request at ~0.1-0.2 s on one thread
CFG = dict(max_steps=3, default_steps=2, max_prompts=2, queue_size=2, timeout_s=60.0)


@pytest.fixture(scope="module")
def adapters(pipe, tmp_path_factory):
    return save_random_adapters(pipe, tmp_path_factory.mktemp("adapters"))


@dataclass
class Served:
    url: str
    app: object
    folder: Path
    keys: dict  # name -> key text: "ab" (policy ab: a, b), "c" (policy c-only), "admin"

    @property
    def engine(self):
        return self.app.state.engine

    def client(self, key: str | None = None, **kw) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.keys.get(key, key)}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60, **kw)


@contextmanager
def serving(folder, pipe, **cfg):
    """uvicorn serving the registry at `folder` on a free loopback port, in a thread of this process."""
    app = create_app(folder, pipe, ServeConfig(**{**CFG, **cfg}))
    sock = bind("127.0.0.1", 0)
    server = make_server(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield app, f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def _registry(pipe, adapters, folder) -> Registry:
    reg = Registry.create(folder, "tiny-random", pipe.backbone_fingerprint)
    for name in ("a", "b", "c"):
        reg.add(name, adapters[name])
    reg.set_policy("ab", ["a", "b"])
    reg.set_policy("c-only", ["c"])
    return reg


@pytest.fixture
def served(pipe, adapters, tmp_path):
    reg = _registry(pipe, adapters, tmp_path / "reg")
    store = KeyStore(reg.folder)
    keys = {"ab": store.create(policy="ab")[1], "c": store.create(policy="c-only")[1],
            "admin": store.create(admin=True)[1]}
    with serving(reg.folder, pipe) as (app, url):
        yield Served(url, app, reg.folder, keys)


def _png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


@contextmanager
def pipeline_held(engine):
    """Hold the engine's pipeline lock: the worker takes a job and waits, later jobs queue."""
    engine._pipe.acquire()
    try:
        yield
    finally:
        engine._pipe.release()


def _in_thread(fn, *args, **kw):
    out = {}

    def target():
        try:
            out["r"] = fn(*args, **kw)
        except Exception as e:  # surfaced by the caller's assertion
            out["e"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, out


def _wait(cond, what: str, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# ---------------------------------------------------------------- keys (pure)


def test_keys_are_stored_hashed_verified_and_revoked(tmp_path):
    store = KeyStore(tmp_path)
    rec, key = store.create(policy="p", note="museum")
    _, admin_key = store.create(admin=True)
    text = keys_path(tmp_path).read_text()
    secret = key.split("_", 2)[2]
    assert secret not in text and key not in text and rec.id in text  # only the hash is kept
    assert store.verify(key) == rec and store.verify(admin_key).admin
    for bad in (None, "", "nope", key[:-1] + ("A" if key[-1] != "A" else "B"), f"pcdm_{'0' * 12}_{secret}"):
        assert store.verify(bad) is None
    other = KeyStore(tmp_path)  # another process (the CLI) revokes: this store sees it on its next check
    other.revoke(rec.id)
    assert store.verify(key) is None and [r.revoked is not None for r in store.records()] == [True, False]
    with pytest.raises(KeyStoreError, match="unknown key id"):
        store.revoke("ffffffffffff")
    with pytest.raises(KeyStoreError, match="either"):
        store.create()


# ---------------------------------------------------------------- auth: 401 / 403


def test_401_and_403_name_nothing_of_other_sources(served):
    body = {"prompt": "a red star", "steps": 2}
    with served.client() as c:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic dXNlcjpwdw=="},
                        {"Authorization": f"Bearer pcdm_{'0' * 12}_{'x' * 43}"}):
            r = c.post("/v1/generate", json=body, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", r.text
        assert c.get("/v1/sources").status_code == 401
        assert c.get("/v1/health").json()["status"] == "ok"  # health needs no key
    with served.client("c") as c:
        assert [s["name"] for s in c.get("/v1/sources").json()["sources"]] == ["c"]
        replies = [c.post("/v1/generate", json=dict(body, sources=[s])) for s in ("a", "zebra")]
        assert [r.status_code for r in replies] == [403, 403]
        # the same answer for a source that exists and one that does not; no other source is named
        assert replies[0].json()["detail"].replace("'a'", "X") == replies[1].json()["detail"].replace("'zebra'", "X")
        assert all("'b'" not in r.text and "'c'" not in r.text for r in replies)
    with served.client("admin") as c:  # admin keys administer; they compose nothing (default deny)
        r = c.post("/v1/generate", json=body)
        assert r.status_code == 403 and "no source" in r.json()["detail"]
    with served.client("ab") as c:
        assert c.get("/v1/admin/sources").status_code == 403
        assert c.delete("/v1/admin/sources/a").status_code == 403


# ---------------------------------------------------------------- generation, audit


def test_generate_returns_pngs_trace_and_credit_and_audits_it(served):
    with served.client("ab") as c:
        r = c.post("/v1/generate", json={"prompt": ["a red star", "a blue square"], "steps": 2, "seed": 3})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["sources"] == ["a", "b"] and len(out["images"]) == 2
        assert _png(out["images"][0]["png_base64"]).size == (64, 64)
        trace = out["images"][1]["trace"]
        assert trace["sources"] == ["a", "b"] and len(trace["weights"]) == 2
        assert sum(out["credit"].values()) == pytest.approx(1.0)
        again = c.post("/v1/generate", json={"prompt": ["a red star", "a blue square"], "steps": 2, "seed": 3}).json()
        assert again["images"][0]["png_base64"] == out["images"][0]["png_base64"]  # seeded

        fixed = c.post("/v1/generate", json={"prompt": "a red star", "sources": ["b", "a"], "router": "fixed",
                                             "weights": {"a": 0.25, "b": 0.75}, "steps": 2}).json()
        assert fixed["sources"] == ["b", "a"] and fixed["credit"] == pytest.approx({"a": 0.25, "b": 0.75})

        body = {"prompt": "a red star", "caption_prior": True, "steps": 2}
        r = c.post("/v1/generate", json=body)  # no caption statistics cached yet
        assert r.status_code == 422 and "no caption statistics" in r.json()["detail"], r.text
        reg = Registry(served.folder)
        for name, domain in (("a", "stars"), ("b", "striped")):
            render_domain(domain, 6, served.folder.parent / f"data_{domain}", seed=1)
            cache_caption_stats(reg, name, served.engine.pipe.tokenizer, served.folder.parent / f"data_{domain}")
        prior = c.post("/v1/generate", json=body).json()
        assert prior["credit"]["a"] > 0.9, prior["credit"]
    rows = AuditLog(served.folder / "serve" / "audit.jsonl").read()
    ab = served.engine.keys.verify(served.keys["ab"]).id
    assert len(rows) == 4 and all(set(r) >= {"time", "key", "sources", "credit"} for r in rows)
    assert rows[2]["key"] == ab and rows[2]["sources"] == ["b", "a"] and rows[2]["credit"]["b"] == pytest.approx(0.75)
    log = (served.folder / "serve" / "audit.jsonl").read_text()
    assert all(k.split("_", 2)[2] not in log for k in served.keys.values())
    assert Registry(served.folder).verify() == []  # serve/ (keys, audit log) is part of a registry


# ---------------------------------------------------------------- 422


BAD_REQUESTS = [  # (body, what the 422's detail must say)
    (b'{"prompt": "a", ', "not valid JSON"),
    (b'{"prompt": "\x80"}', "not valid JSON (not UTF-8 text)"),
    (b'[1, 2]', "the body must be a JSON object"),
    ({"prompt": "a", "colour": "red"}, "colour: Extra inputs are not permitted"),
    ({"prompt": 7}, "prompt"),
    ({"prompt": "a", "steps": "2"}, "steps: Input should be a valid integer"),
    ({"prompt": "a", "steps": 4}, "steps: Input should be less than or equal to 3"),
    ({"prompt": ["a", "b", "c"]}, "at most 2 items"),
    ({"prompt": ""}, "at least 1 character"),
    ({"prompt": "a", "size": 512}, "size: Input should be less than or equal to 64"),
    ({"prompt": "a", "guidance": 1e9}, "guidance"),
    ({"prompt": "a", "router": "oracle"}, "router"),
    ({"prompt": "<cdm-c> a star", "sources": ["a"]}, "placeholder"),
    ({"prompt": "a", "weights": {"a": 1.0}}, "weights must name exactly the composed sources: a, b"),
    ({"prompt": "a", "sources": ["a", "b"], "weights": {"a": 0, "b": 0}}, "positive sum"),
    ({"prompt": "a", "router": "fixed"}, "router 'fixed' needs weights"),  # once a 500 (found by schemathesis)
    ({}, "prompt: Field required"),
]


def test_422_with_a_clear_message(served):
    with served.client("ab") as c:
        for body, needle in BAD_REQUESTS:
            if isinstance(body, bytes):
                r = c.post("/v1/generate", content=body, headers={"content-type": "application/json"})
            else:
                r = c.post("/v1/generate", json=body)
            assert r.status_code == 422 and needle in r.json()["detail"], (body, r.text)
        assert c.post("/v1/generate", json={"prompt": "a" * 400_000}).status_code == 413  # over max_body_kb


# ---------------------------------------------------------------- load: 429, timeout, nothing lost


def test_429_with_retry_after_when_the_queue_is_full_and_every_accepted_request_is_answered(served):
    engine, stats = served.engine, served.app.state.stats
    body = {"prompt": "a red star", "steps": 2}
    with served.client("ab") as c:
        with pipeline_held(engine):
            first = [_in_thread(c.post, "/v1/generate", json=body)]
            _wait(lambda: stats["accepted"] == 1 and engine.queued == 0, "the worker to take the first job")
            first += [_in_thread(c.post, "/v1/generate", json=body) for _ in range(2)]  # queue_size 2
            _wait(lambda: engine.queued == 2, "two queued jobs")
            r = c.post("/v1/generate", json=body)
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1 and "capacity" in r.json()["detail"]
        for t, out in first:
            t.join(60)
            assert "r" in out and out["r"].status_code == 200, out
    assert stats["accepted"] == stats["answered"] == 3 and stats["busy"] == 1


def test_504_past_the_timeout_and_a_cancelled_job_never_runs(served):
    engine, cfg = served.engine, served.app.state.config
    before = len(engine.audit.read())
    cfg.timeout_s = 0.3
    try:
        with pipeline_held(engine), served.client("ab") as c:
            r = c.post("/v1/generate", json={"prompt": "a red star", "steps": 2})
            assert r.status_code == 504 and "within 0.3 s" in r.json()["detail"]
    finally:
        cfg.timeout_s = 60.0
    with served.client("ab") as c:  # the worker skipped the cancelled job and serves the next one
        assert c.post("/v1/generate", json={"prompt": "a", "steps": 2}).status_code == 200
    assert len(engine.audit.read()) == before + 1


# ---------------------------------------------------------------- forgetting while serving, revocation


def test_forget_while_serving_in_flight_finishes_later_requests_never_see_it(served, monkeypatch):
    import prompt_cdm.compose.pipeline as compose

    engine = served.engine
    started, go = threading.Event(), threading.Event()
    real = compose.compose_images

    def gated(*a, **k):
        started.set()
        assert go.wait(60)
        return real(*a, **k)

    monkeypatch.setattr(compose, "compose_images", gated)
    body = {"prompt": "a red star", "steps": 2, "sources": ["a", "b"]}
    user, admin = served.client("ab"), served.client("admin")
    inflight = _in_thread(user.post, "/v1/generate", json=body)
    assert started.wait(30)
    queued = _in_thread(user.post, "/v1/generate", json=body)  # accepted before the forget
    _wait(lambda: engine.queued == 1, "the second request to queue")
    forget = _in_thread(admin.delete, "/v1/admin/sources/b")
    _wait(lambda: "b" not in Registry(served.folder).sources, "the registry to drop b")
    # from now on nobody gets b, while the in-flight generation still runs with it
    r = user.post("/v1/generate", json=dict(body, sources=["b"]))
    assert r.status_code == 403 and "'b'" in r.json()["detail"]
    assert [s["name"] for s in user.get("/v1/sources").json()["sources"]] == ["a"]
    assert "b" in engine.loaded and forget[0].is_alive()  # forget waits for the in-flight request
    go.set()
    for t, _ in (inflight, queued, forget):
        t.join(60)
    r1 = inflight[1]["r"]
    assert r1.status_code == 200 and r1.json()["sources"] == ["a", "b"] and r1.json()["credit"]["b"] > 0
    assert queued[1]["r"].status_code == 403  # queued, not in flight: refused when its turn came
    rep = forget[1]["r"].json()
    assert forget[1]["r"].status_code == 200 and rep["unloaded"] and "adapters/b" in rep["deleted"]
    assert "b" not in engine.loaded and "b" not in engine.pipe.unet.peft_config
    assert Registry(served.folder).verify_forgotten("b") == []
    later = user.post("/v1/generate", json={"prompt": "a", "steps": 2}).json()
    assert later["sources"] == ["a"]  # the default (the policy's sources) no longer has b
    assert admin.delete("/v1/admin/sources/b").status_code == 404
    user.close(), admin.close()


def test_revoking_a_key_with_the_cli_while_serving(served, capsys):
    reg = str(served.folder)
    assert main(["keys", "create", "--registry", reg, "--policy", "c-only", "--note", "tmp"]) == 0
    cap = capsys.readouterr()
    key = cap.out.strip()
    assert key.startswith("pcdm_") and "shown once" in cap.err and key not in keys_path(reg).read_text()
    kid = key.split("_")[1]
    with served.client(key) as c:
        assert c.post("/v1/generate", json={"prompt": "a", "steps": 2}).status_code == 200
        assert main(["keys", "revoke", kid, "--registry", reg]) == 0
        r = c.post("/v1/generate", json={"prompt": "a", "steps": 2})
        assert r.status_code == 401 and "revoked" in r.json()["detail"]
    capsys.readouterr()
    assert main(["keys", "list", "--registry", reg]) == 0
    listed = {r["id"]: r for r in json.loads(capsys.readouterr().out)}
    assert listed[kid]["revoked"] and listed[kid]["note"] == "tmp" and "sha256" not in listed[kid]
    for args, needle in ((["keys", "create", "--registry", reg, "--policy", "vip"], "unknown policy 'vip'"),
                         (["keys", "create", "--registry", reg], "exactly one of"),
                         (["keys", "revoke", "ffffffffffff", "--registry", reg], "unknown key id"),
                         (["serve", "--registry", reg, "--max-steps", "0"], "max_steps must be >= 1"),
                         (["serve", "--registry", reg + "-nowhere"], "not a registry")):
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err


# ---------------------------------------------------------------- admin endpoints


def test_admin_adds_a_source_and_changes_policies(served, pipe, tmp_path):
    from prompt_cdm.adapters import LoraAdapterConfig, lora, save_adapter

    folder = save_adapter(tmp_path / "d", lora.create(pipe, LoraAdapterConfig(rank=2, alpha=2.0)), pipe,
                          source_id="d", data_hash="hash-d")
    files = {p.name: base64.b64encode(p.read_bytes()).decode() for p in folder.iterdir() if p.is_file()}
    with served.client("admin") as adm, served.client("c") as user:
        r = adm.post("/v1/admin/sources", json={"name": "d", "files": files})
        assert r.status_code == 201 and r.json()["loaded"] and r.json()["kind"] == "lora", r.text
        assert adm.post("/v1/admin/sources", json={"name": "d", "files": files}).status_code == 422  # exists
        bad = adm.post("/v1/admin/sources", json={"name": "e", "files": {"adapter_config.json": "!!"}})
        assert bad.status_code == 422 and "base64" in bad.json()["detail"]
        pickled = adm.post("/v1/admin/sources", json={"name": "e", "files": dict(files, **{"x.bin": "AAAA"})})
        assert pickled.status_code == 422
        assert "d" in [s["name"] for s in adm.get("/v1/admin/sources").json()["sources"]]

        assert user.post("/v1/generate", json={"prompt": "a", "sources": ["d"], "steps": 2}).status_code == 403
        r = adm.put("/v1/admin/policies/c-only", json={"sources": ["c", "d"]})
        assert r.status_code == 200 and r.json()["sources"] == ["c", "d"]
        r = user.post("/v1/generate", json={"prompt": "a", "steps": 2})
        assert r.status_code == 200 and r.json()["sources"] == ["c", "d"]
        assert adm.put("/v1/admin/policies/x", json={"sources": ["zebra"]}).status_code == 422
        assert adm.get("/v1/admin/policies").json()["policies"]["c-only"] == ["c", "d"]
        assert adm.delete("/v1/admin/policies/c-only").status_code == 200
        assert adm.delete("/v1/admin/policies/c-only").status_code == 404
        r = user.post("/v1/generate", json={"prompt": "a", "steps": 2})
        assert r.status_code == 403 and "no source" in r.json()["detail"]  # its policy is gone: deny


# ---------------------------------------------------------------- schema-driven fuzzing


def test_schemathesis_fuzz_of_the_served_openapi_finds_no_5xx(pipe, adapters, tmp_path, monkeypatch):
    """Every operation, admin ones included, on a registry holding a source ('c') that cannot be forgotten
    (its adapter folder cannot be deleted)."""
    import prompt_cdm.registry.registry as registry
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error

    reg = _registry(pipe, adapters, tmp_path / "reg")
    store = KeyStore(reg.folder)
    user, admin = store.create(policy="ab")[1], store.create(admin=True)[1]
    real = registry._rmtree

    def stuck(path):
        if path == reg.folder / "adapters" / "c":
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(registry, "_rmtree", stuck)
    with serving(reg.folder, pipe, max_steps=2, queue_size=4) as (app, url):
        r = httpx.delete(f"{url}/v1/admin/sources/c", headers={"Authorization": f"Bearer {admin}"}, timeout=60)
        assert r.status_code == 409, r.text
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        ran = {}
        for result in schema.get_all_operations():
            op = result.ok()
            key = admin if op.path.startswith("/v1/admin/") else user
            n = 6 if op.path == "/v1/generate" else 3
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

                @given(case=op.as_strategy(generation_mode=mode))
                @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate],
                          suppress_health_check=list(HealthCheck))
                def fuzz(case):
                    response = case.call(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
                    tag = (f"{op.method.upper()} {op.path}", response.status_code)
                    ran[tag] = ran.get(tag, 0) + 1
                    case.validate_response(response, checks=[not_a_server_error])

                try:
                    fuzz()
                except Unsatisfiable:  # nothing to break in an operation without parameters (health)
                    assert mode == GenerationMode.NEGATIVE
        print("fuzz status counts:", dict(sorted(ran.items())))
        assert not any(status >= 500 for _, status in ran), ran
        assert ran.get(("POST /v1/generate", 200)) and ran.get(("POST /v1/generate", 422)), ran
        assert {"POST /v1/admin/sources", "DELETE /v1/admin/sources/{name}", "PUT /v1/admin/policies/{name}"} <= \
            {tag for tag, _ in ran}, ran


# ---------------------------------------------------------------- issue 16: refusals, never a 500


def test_a_key_of_a_removed_policy_is_not_regranted_by_a_new_policy_of_that_name(served):
    """Finding 4: `policy rm p2` then `policy set p2 ...` re-granted every old p2 key."""
    with served.client("admin") as adm, served.client("ab") as old:
        assert [s["name"] for s in old.get("/v1/sources").json()["sources"]] == ["a", "b"]
        assert adm.delete("/v1/admin/policies/ab").status_code == 200
        assert adm.put("/v1/admin/policies/ab", json={"sources": ["a", "b"]}).status_code == 200
        assert old.get("/v1/sources").json()["sources"] == []
        r = old.post("/v1/generate", json={"prompt": "a", "steps": 2})
        assert r.status_code == 403
        # replacing a policy's sources keeps its identity: a key made for the new one stays valid
        new = KeyStore(served.folder).create(policy="ab")[1]
        assert adm.put("/v1/admin/policies/ab", json={"sources": ["a"]}).status_code == 200
        with served.client(new) as c:
            assert [s["name"] for s in c.get("/v1/sources").json()["sources"]] == ["a"]


def _bad_uploads(pipe, tmp_path) -> dict:
    """name -> (files of an adapter folder, what the refusal says): finding 5's adapters."""
    import torch
    from safetensors.torch import save_file

    from prompt_cdm.adapters import LoraAdapterConfig, lora, save_adapter

    good = save_adapter(tmp_path / "good", lora.create(pipe, LoraAdapterConfig(rank=2, alpha=2.0)), pipe,
                        source_id="g", data_hash="hash-g")
    files = {p.name: p.read_bytes() for p in good.iterdir() if p.is_file()}
    from safetensors.torch import load_file

    tensors = load_file(str(good / "adapter_model.safetensors"))
    cfg = json.loads(files["adapter_config.json"])

    def st(ts):
        path = tmp_path / f"w{len(list(tmp_path.iterdir()))}.safetensors"
        save_file(ts, str(path))
        return path.read_bytes()

    k0 = sorted(tensors)[0]
    out = {
        "huge": (dict(files, **{"adapter_model.safetensors": st(dict(tensors, **{k0: torch.full_like(tensors[k0], 3e38)}))}),
                 "magnitude"),
        "alpha": (dict(files, **{"adapter_config.json": json.dumps(dict(cfg, params=dict(cfg["params"], alpha=1e308))).encode()}),
                  "alpha"),
        "missing": (dict(files, **{"adapter_model.safetensors": st({k: v for k, v in tensors.items()
                                                                     if ".down_blocks." not in k} or tensors)}), "lack"),
        "deep": (dict(files, **{"adapter_config.json": b"[" * 100_000 + b"]" * 100_000}), "nested too deeply"),
    }
    return out


def test_admin_uploads_of_bad_adapters_are_422_naming_no_server_path(served, pipe, tmp_path):
    """Findings 5 and 7: huge weights / alpha passed and blackened compositions; a shape error reached users
    as a 500 with an internal path; a 100k-deep adapter_config.json was a 500 on POST /v1/admin/sources."""
    with served.client("admin") as adm:
        for name, (files, needle) in _bad_uploads(pipe, tmp_path).items():
            body = {"name": f"bad-{name}", "files": {k: base64.b64encode(v).decode() for k, v in files.items()}}
            r = adm.post("/v1/admin/sources", json=body)
            assert r.status_code == 422 and needle in r.json()["detail"], (name, r.text)
            assert "/tmp" not in r.json()["detail"] and "prompt-cdm-upload" not in r.json()["detail"], r.text
        assert not [s for s in Registry(served.folder).sources if s.startswith("bad-")]
        r = adm.post("/v1/admin/sources", content=b"[" * 100_000 + b"]" * 100_000,
                     headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and "nested too deeply" in r.json()["detail"], r.text


def test_a_source_that_turns_the_step_nan_fails_the_request_not_the_image(served, monkeypatch):
    """Finding 5: one source that produced NaN blackened a composition with good sources (200, black PNG)."""
    unet = served.engine.pipe.unet

    def poison(module, args, output):
        output.sample[-1] = float("nan")  # the last conditional row: source b's
        return output

    handle = unet.register_forward_hook(poison)
    try:
        with served.client("ab") as user:
            r = user.post("/v1/generate", json={"prompt": "a", "steps": 2, "sources": ["a", "b"]})
    finally:
        handle.remove()
    assert r.status_code == 422 and "source(s) b is NaN or infinite" in r.json()["detail"], r.text


def test_a_forget_that_cannot_finish_is_409_and_the_source_is_unloaded(served, monkeypatch):
    """Finding 7: DELETE /v1/admin/sources/NAME answered a bare 500 after the index changed and before
    the adapter was unloaded."""
    import prompt_cdm.registry.registry as registry

    real = registry._rmtree

    def stuck(path):
        if path.name == "b" and path.parent.name == "adapters":
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(registry, "_rmtree", stuck)
    with served.client("admin") as adm, served.client("ab") as user:
        r = adm.delete("/v1/admin/sources/b")
        assert r.status_code == 409 and "registry forget` again" in r.json()["detail"], r.text
        assert "b" not in served.engine.loaded
        assert user.post("/v1/generate", json={"prompt": "a", "sources": ["b"], "steps": 2}).status_code == 403
        monkeypatch.setattr(registry, "_rmtree", real)
        Registry(served.folder).forget("b")
        assert Registry(served.folder).verify() == []

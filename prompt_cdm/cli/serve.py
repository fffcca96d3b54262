"""`prompt-cdm serve` and `prompt-cdm keys ...`: the HTTP service and its API keys."""
from __future__ import annotations

import json
import sys

from .common import UsageError, _load_backbone_quietly, add_compile, add_placement


def serve_config(a):
    """The service's bounds from `prompt-cdm serve`'s flags (generated from ServeConfig) and --set."""
    from ..serve.app import ServeConfig
    from .fields import build, request_fields

    # a request that names no steps gets 25, or max_steps when that is lower
    steps = a.default_steps if a.default_steps is not None else min(25, a.max_steps)
    return build(ServeConfig, a, request_fields(ServeConfig, ("default_steps",)), {"default_steps": steps})


def cmd_serve(a) -> None:
    from ..registry.registry import Registry
    from ..serve.app import create_app, run

    reg = Registry(a.registry)
    if not 0 <= a.port <= 65535:
        raise UsageError(f"--port must be in 0..65535 (0: a free one), got {a.port}")
    try:
        cfg = serve_config(a)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    pipe = _load_backbone_quietly(a.backbone or reg.backbone["name"], a)
    app = create_app(a.registry, pipe, cfg)
    try:
        run(app, a.host, a.port, announce=lambda line: print(line, flush=True))
    except OSError as e:
        raise UsageError(f"cannot listen on {a.host}:{a.port}: {e.strerror or e}") from None


def cmd_keys_create(a) -> None:
    from ..serve.keys import KeyStore
    from ..registry.registry import Registry

    reg = Registry(a.registry)
    if a.admin == (a.policy is not None):
        raise UsageError("give exactly one of --policy NAME (a user key) or --admin (an admin key)")
    if a.policy is not None:
        reg.policy(a.policy)  # an unknown policy is refused here, not at the first request
    rec, key = KeyStore(a.registry).create(policy=a.policy, admin=a.admin, note=a.note)
    print(key)
    what = "admin key" if rec.admin else f"key for policy {rec.policy!r}"
    print(f"{what}, id {rec.id}: shown once, only its hash is kept", file=sys.stderr)


def cmd_keys_revoke(a) -> None:
    from ..serve.keys import KeyStore
    from ..registry.registry import Registry

    Registry(a.registry)
    rec = KeyStore(a.registry).revoke(a.key_id)
    print(f"revoked key {rec.id} ({rec.revoked})")


def cmd_keys_list(a) -> None:
    from ..serve.keys import KeyStore
    from ..registry.registry import Registry

    Registry(a.registry)
    print(json.dumps([r.public() for r in KeyStore(a.registry).records()], indent=1))


def add_parsers(sub) -> None:
    from ..serve.app import ServeConfig
    from .fields import add_fields, add_set

    s = sub.add_parser("serve", help="serve a registry's compositions over HTTP, by API key (FastAPI + uvicorn)")
    s.add_argument("--registry", required=True, metavar="DIR", help="the registry folder (keys: `prompt-cdm keys`)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on")
    s.add_argument("--port", type=int, default=8000, help="port (0: a free one, printed at start)")
    s.add_argument("--backbone", default=None, help="default: the registry's backbone")
    add_placement(s)
    add_compile(s)
    add_fields(s, ServeConfig, aliases={"timeout_s": ["--timeout"]}, defaults={"default_steps": None})
    add_set(s, "service's bounds (serve.app.ServeConfig)", "max_steps=20")
    s.set_defaults(func=cmd_serve)

    k = sub.add_parser("keys", help="API keys of `serve`, stored hashed in the registry")
    ks = k.add_subparsers(dest="keys_cmd", required=True)
    kc = ks.add_parser("create", help="make a key bound to a policy (or an admin key); prints it once")
    kc.add_argument("--registry", required=True, metavar="DIR", help="the registry folder")
    kc.add_argument("--policy", default=None, help="the access policy whose sources the key may compose")
    kc.add_argument("--admin", action="store_true", help="an admin key (admin endpoints only; no sources)")
    kc.add_argument("--note", default="", help="a label shown by `keys list`")
    kc.set_defaults(func=cmd_keys_create)
    kr = ks.add_parser("revoke", help="revoke a key by id (a running server refuses it at once)")
    kr.add_argument("key_id", help="the key's id (`keys list`)")
    kr.add_argument("--registry", required=True, metavar="DIR", help="the registry folder")
    kr.set_defaults(func=cmd_keys_revoke)
    kl = ks.add_parser("list", help="print the keys (ids, policies, revoked; never secrets) as JSON")
    kl.add_argument("--registry", required=True, metavar="DIR", help="the registry folder")
    kl.set_defaults(func=cmd_keys_list)

"""The set of sources a service composes: add, list, verify, forget; access policies; router artifacts.

A registry is a folder (DESIGN.md sections 1 and 4):

    REGISTRY/registry.json            the index (written atomically; the only mutable file)
    REGISTRY/adapters/NAME/           each source's adapter folder, copied in and checksummed
    REGISTRY/routers/ROUTER/          router artifacts beside the adapters: router.json declares its
                                      kind and the sources whose data it has seen; weights.safetensors
    REGISTRY/caches/NAME/             files derived from a source's data (e.g. cached latents)
    REGISTRY/manifests/NAME.json      the source's data manifest
    REGISTRY/reference/               the ratio heads' public reference set (tied to the backbone)
    REGISTRY/serve/                   the server's hashed API keys and append-only audit log (keys.py, audit.py)

Forgetting a source (CDM's exact unlearning: Golatkar et al. 2023, section 1) deletes its adapter,
its own ratio head, its caches and its manifest; a router that saw it together with other sources
(the paper's n-way classifier) loses its weights -- they hold the forgotten data's information --
and is marked stale until retrained on the rest. `verify` proves that no artifact lists a forgotten
source and no file derived from its data remains; `forget` refuses to finish while one does.
Forgotten names are kept (with their data hash) so `verify` can keep proving it; they cannot be
reused, and an adapter trained on forgotten data (same data hash) is refused.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from ..util.io import read_json, sha256_file, write_json

REGISTRY_FILE = "registry.json"
ADAPTERS, ROUTERS, CACHES, MANIFESTS = "adapters", "routers", "caches", "manifests"
ROUTER_FILE, ROUTER_WEIGHTS = "router.json", "weights.safetensors"
ROUTER_KINDS = ("classifier", "ratio")
REFERENCE = "reference"  # the public reference set of the ratio heads (no source's data)
SERVE = "serve"  # API keys and the audit log of `prompt-cdm serve` (no source's data)
FORMAT, VERSION = "prompt_cdm.registry", 1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")  # also a valid peft adapter name


class RegistryError(ValueError):
    """A registry operation is refused (unknown source or policy, wrong backbone, ...); nothing changed."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")



def _check_name(name: str, what: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise RegistryError(f"{what} name {name!r} must be letters, digits, '_' or '-' (starting with a "
                            "letter or digit)")


def _rmtree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@dataclass
class ForgetReport:
    """What `forget` did: every path deleted, routers made stale, policies edited."""

    name: str
    deleted: list[str] = field(default_factory=list)
    stale_routers: list[str] = field(default_factory=list)
    policies: list[str] = field(default_factory=list)


class Registry:
    """A registry folder. Open one with `Registry(folder)`, create one with `Registry.create`."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        path = self.folder / REGISTRY_FILE
        if not path.is_file():
            raise RegistryError(f"{self.folder} is not a registry (no {REGISTRY_FILE}); create one with "
                                "`prompt-cdm registry init --registry DIR --backbone NAME`")
        self.data = self._validate(read_json(path, RegistryError), path)

    # -- the index --------------------------------------------------------------------------------

    @staticmethod
    def _validate(data, path: Path) -> dict:
        keys = {"format", "version", "backbone", "sources", "policies", "routers", "forgotten"}
        if not isinstance(data, dict) or set(data) != keys:
            raise RegistryError(f"{path}: expected exactly the keys {sorted(keys)}")
        if data["format"] != FORMAT or data["version"] != VERSION:
            raise RegistryError(f"{path}: format {data['format']!r} v{data['version']} is not "
                                f"{FORMAT!r} v{VERSION}")
        bb = data["backbone"]
        if not isinstance(bb, dict) or not bb.get("fingerprint"):
            raise RegistryError(f"{path}: backbone must record a fingerprint")
        return data

    @classmethod
    def create(cls, folder: str | os.PathLike, backbone_name: str, fingerprint: str) -> "Registry":
        """A new, empty registry for the backbone with `fingerprint` (backbone.fingerprint)."""
        folder = Path(folder)
        if (folder / REGISTRY_FILE).exists():
            raise RegistryError(f"{folder} is already a registry")
        if folder.exists() and any(folder.iterdir()):
            raise RegistryError(f"{folder} exists and is not empty; pick a new folder for the registry")
        if not fingerprint:
            raise RegistryError("a registry needs the backbone's fingerprint")
        write_json(folder / REGISTRY_FILE, {
            "format": FORMAT, "version": VERSION,
            "backbone": {"name": str(backbone_name), "fingerprint": str(fingerprint)},
            "sources": {}, "policies": {}, "routers": {}, "forgotten": [],
        })
        return cls(folder)

    def _save(self) -> None:
        write_json(self.folder / REGISTRY_FILE, self.data)

    @property
    def backbone(self) -> dict:
        """{"name": ..., "fingerprint": ...}"""
        return dict(self.data["backbone"])

    @property
    def sources(self) -> list[str]:
        return list(self.data["sources"])

    def source(self, name: str) -> dict:
        if name not in self.data["sources"]:
            raise RegistryError(f"unknown source {name!r}; this registry has: "
                                f"{', '.join(self.sources) or '(none)'}")
        return dict(self.data["sources"][name])

    def adapter_dir(self, name: str) -> Path:
        return self.folder / self.source(name)["adapter"]

    def cache_dir(self, name: str) -> Path:
        """Where files derived from source `name`'s data live (deleted when it is forgotten)."""
        self.source(name)
        return self.folder / CACHES / name

    def manifest_path(self, name: str) -> Path:
        self.source(name)
        return self.folder / MANIFESTS / f"{name}.json"

    # -- sources ----------------------------------------------------------------------------------

    def add(self, name: str, adapter_dir: str | os.PathLike, manifest: str | os.PathLike | None = None) -> dict:
        """Copy an adapter folder in as source `name`, after validating it (`adapters.validate`, the check
        hub push and pull run too: config, weights' keys, shapes and values, no pickle files), trained on this
        registry's backbone (fingerprint), not on forgotten data, no name/placeholder clash."""
        from ..adapters.errors import AdapterError
        from ..adapters.kinds import get_kind
        from ..adapters.store import CONFIG_NAME
        from ..adapters.validate import check_adapter_folder

        _check_name(name, "source")
        src = Path(adapter_dir)
        if name in self.data["sources"]:
            raise RegistryError(f"source {name!r} is already in the registry; `forget` it first or pick another name")
        gone = {f["name"]: f for f in self.data["forgotten"]}
        if name in gone:
            raise RegistryError(f"{name!r} names a forgotten source; names are not reused (so verify can keep "
                                "proving it is gone) -- pick another name")
        try:
            cfg = check_adapter_folder(src)
        except AdapterError as e:
            raise RegistryError(f"cannot add {name!r}: {e}") from None
        fp = self.data["backbone"]["fingerprint"]
        if cfg.backbone_fingerprint != fp:
            raise RegistryError(f"{src / CONFIG_NAME}: the adapter was trained on backbone "
                                f"{cfg.backbone_fingerprint} ({cfg.base_model}), this registry's backbone is {fp} "
                                f"({self.data['backbone']['name']}); retrain the adapter on this backbone")
        if cfg.data_hash and cfg.data_hash in {f.get("data_hash") for f in gone.values()}:
            raise RegistryError(f"{src}: its data hash {cfg.data_hash} is that of a forgotten source; "
                                "forgotten data cannot come back")
        if cfg.source_id in {f.get("source_id") for f in gone.values()}:
            raise RegistryError(f"{src}: it was trained on source {cfg.source_id!r}, which this registry "
                                "forgot; forgotten data cannot come back")
        ph = get_kind(cfg.kind).trigger(cfg.params)  # a trigger word must be unique among composable sources
        if ph is not None:
            for other, e in self.data["sources"].items():
                if e.get("placeholder") == ph:
                    raise RegistryError(f"source {other!r} already uses the placeholder {ph}; two soft prompts "
                                        "with one placeholder cannot be composed -- retrain with another")
        if manifest is not None and not Path(manifest).is_file():
            raise RegistryError(f"manifest {manifest} is not a file")

        rel = f"{ADAPTERS}/{name}"
        dst = self.folder / rel
        if dst.exists():
            raise RegistryError(f"{dst} exists but is not registered (an orphan); run `registry verify` and "
                                "remove it")
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=dst.parent))
        created = []
        try:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
            entry = {
                "kind": cfg.kind, "adapter": rel, "source_id": cfg.source_id, "data_hash": cfg.data_hash,
                "sha256": {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()},
                "added": _now(),
            }
            if ph is not None:
                entry["placeholder"] = ph
            os.replace(tmp, dst)
            created.append(dst)
            if manifest is not None:
                mpath = self.folder / MANIFESTS / f"{name}.json"
                mpath.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(manifest, mpath)
                created.append(mpath)
            self.data["sources"][name] = entry
            self._save()
        except BaseException:
            self.data["sources"].pop(name, None)
            _rmtree(tmp)
            for p in created:
                _rmtree(p)
            raise
        return dict(entry)

    def resolve(self, sources: Sequence[str] | None = None, policy: str | None = None) -> list[str]:
        """The sources a request composes: `sources` (all if None), restricted by access `policy`.
        Unknown sources or policies, and sources the policy does not allow, are refused."""
        allowed = self.policy(policy) if policy is not None else self.sources
        if sources is None:
            chosen = list(allowed)
        else:
            chosen = list(dict.fromkeys(sources))
            for s in chosen:
                self.source(s)
                if s not in allowed:
                    raise RegistryError(f"source {s!r} is not allowed by policy {policy!r} "
                                        f"(allowed: {', '.join(allowed) or '(none)'})")
        if not chosen:
            raise RegistryError("no source to compose" + (f": policy {policy!r} allows none" if policy else
                                                         ": the registry is empty (add one with `registry add`)"))
        return chosen

    # -- access policies ---------------------------------------------------------------------------

    def policy(self, name: str) -> list[str]:
        if name not in self.data["policies"]:
            raise RegistryError(f"unknown policy {name!r}; policies: "
                                f"{', '.join(self.data['policies']) or '(none)'}")
        return list(self.data["policies"][name])

    @property
    def policies(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in self.data["policies"].items()}

    def set_policy(self, name: str, sources: Sequence[str]) -> list[str]:
        """Create or replace access policy `name`: the sources its callers may compose."""
        _check_name(name, "policy")
        sources = list(dict.fromkeys(sources))
        if not sources:
            raise RegistryError(f"policy {name!r} must allow at least one source")
        for s in sources:
            self.source(s)
        self.data["policies"][name] = sources
        self._save()
        return sources

    def remove_policy(self, name: str) -> None:
        self.policy(name)
        del self.data["policies"][name]
        self._save()

    # -- router artifacts --------------------------------------------------------------------------

    @property
    def routers(self) -> dict[str, dict]:
        return {k: dict(v) for k, v in self.data["routers"].items()}

    def router(self, name: str) -> dict:
        if name not in self.data["routers"]:
            raise RegistryError(f"no router {name!r} in the registry (have: "
                                f"{', '.join(self.data['routers']) or 'none'}); train one with "
                                "`prompt-cdm router train --registry DIR`")
        return dict(self.data["routers"][name])

    def router_dir(self, name: str) -> Path:
        return self.folder / ROUTERS / name

    def add_router(self, name: str, kind: str, tensors: dict, sources_seen: Sequence[str],
                   config: dict | None = None, replace: bool = True) -> dict:
        """Write router artifact `name` (weights + router.json declaring the sources it has seen)."""
        from ..util.io import save_safetensors

        _check_name(name, "router")
        if kind not in ROUTER_KINDS:
            raise RegistryError(f"router kind must be one of {ROUTER_KINDS}, got {kind!r}")
        seen = list(dict.fromkeys(sources_seen))
        for s in seen:
            self.source(s)
        if not seen:
            raise RegistryError("a router must declare the sources whose data it has seen")
        if name in self.data["routers"] and not replace:
            raise RegistryError(f"router {name!r} exists")
        meta = {"kind": kind, "sources_seen": seen, "stale": False, "config": dict(config or {}),
                "trained": _now()}
        dst = self.router_dir(name)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=dst.parent))
        try:
            save_safetensors(tmp / ROUTER_WEIGHTS, tensors)
            write_json(tmp / ROUTER_FILE, meta)
            if dst.exists():
                _rmtree(dst)
            os.replace(tmp, dst)
        except BaseException:
            _rmtree(tmp)
            raise
        self.data["routers"][name] = {"kind": kind, "path": f"{ROUTERS}/{name}", "sources_seen": seen, "stale": False}
        self._save()
        return meta

    def load_router(self, name: str) -> tuple[dict, dict]:
        """(router.json, tensors) of a usable (not stale) router."""
        from safetensors.torch import load_file

        entry = self.router(name)
        if entry["stale"]:
            raise RegistryError(f"router {name!r} is stale (a source it saw was forgotten); retrain it with "
                                "`prompt-cdm router train --registry DIR`")
        folder = self.folder / entry["path"]
        meta = json.loads((folder / ROUTER_FILE).read_text())
        return meta, load_file(str(folder / ROUTER_WEIGHTS))

    # -- forgetting --------------------------------------------------------------------------------

    def forget(self, name: str) -> ForgetReport:
        """Exactly unlearn source `name`: delete every file derived from its data and every mention.

        Order: the index is rewritten first (the source leaves it; routers that saw it lose their
        weights and turn stale; policies drop it; the forgotten log records its data hash), then
        the files go. Re-running `forget` after a crash finishes the deletion. Raises RegistryError
        unless `verify` finds nothing of the source afterwards."""
        pending = [f for f in self.data["forgotten"] if f["name"] == name]
        if name not in self.data["sources"] and not pending:
            self.source(name)  # raises: unknown source
        rep = ForgetReport(name)
        if name in self.data["sources"]:
            entry = self.data["sources"].pop(name)
            for r, e in self.data["routers"].items():
                if name in e.get("retrain_on", []):
                    e["retrain_on"].remove(name)
                if name in e["sources_seen"]:
                    if e["sources_seen"] == [name]:
                        e["delete"] = True  # its own head (ratio): goes entirely
                    else:
                        e.update(stale=True, sources_seen=[], retrain_on=[s for s in e["sources_seen"] if s != name])
                        rep.stale_routers.append(r)
            for p, members in self.data["policies"].items():
                if name in members:
                    members.remove(name)
                    rep.policies.append(p)
            self.data["forgotten"].append({"name": name, "source_id": entry.get("source_id", name),
                                           "data_hash": entry.get("data_hash", ""), "at": _now()})
            for r in [r for r, e in self.data["routers"].items() if e.get("delete")]:
                rep.deleted.append(self.data["routers"].pop(r)["path"])
            self._save()
        rep.deleted = [f"{ADAPTERS}/{name}", f"{CACHES}/{name}", f"{MANIFESTS}/{name}.json"] + rep.deleted

        # the files: the index no longer names any of them
        for rel in rep.deleted:
            _rmtree(self.folder / rel)
        for r, e in self.data["routers"].items():
            folder = self.folder / e["path"]
            if e["stale"] and folder.is_dir():
                _rmtree(folder / ROUTER_WEIGHTS)
                meta_path = folder / ROUTER_FILE
                meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {"kind": e["kind"]}
                meta.update(stale=True, sources_seen=[], retrain_on=e.get("retrain_on", []))
                write_json(meta_path, meta)
        for rel in list((self.folder / ROUTERS).glob("*")) if (self.folder / ROUTERS).is_dir() else []:
            if rel.name not in self.data["routers"] and not rel.name.startswith("."):
                meta_path = rel / ROUTER_FILE
                seen = json.loads(meta_path.read_text()).get("sources_seen", []) if meta_path.is_file() else []
                if name in seen:
                    _rmtree(rel)  # a crash left a deleted head's folder behind
                    rep.deleted.append(f"{ROUTERS}/{rel.name}")
        problems = self.verify_forgotten(name)
        if problems:
            raise RegistryError(f"forget {name!r} did not finish: {problems[0]} (run forget again)")
        return rep

    # -- verification ------------------------------------------------------------------------------

    def verify_forgotten(self, name: str) -> list[str]:
        """Problems that show forgotten source `name` is not entirely gone (empty list = gone)."""
        rec = next((f for f in self.data["forgotten"] if f["name"] == name), None)
        if rec is None:
            return [f"{name!r} was never forgotten"]
        out = []
        if name in self.data["sources"]:
            out.append(f"source {name!r} is still registered")
        for rel in (f"{ADAPTERS}/{name}", f"{CACHES}/{name}", f"{MANIFESTS}/{name}.json"):
            if (self.folder / rel).exists():
                out.append(f"{rel} still exists")
        for p, members in self.data["policies"].items():
            if name in members:
                out.append(f"policy {p!r} still lists {name!r}")
        routers = self.folder / ROUTERS
        for folder in sorted(routers.iterdir()) if routers.is_dir() else []:
            meta_path = folder / ROUTER_FILE
            meta = {}
            if meta_path.is_file():
                try:
                    meta = json.loads(meta_path.read_text())
                except json.JSONDecodeError:
                    out.append(f"{ROUTERS}/{folder.name}/{ROUTER_FILE} is not valid JSON")
            if name in meta.get("sources_seen", []) + meta.get("retrain_on", []):
                out.append(f"router {folder.name!r} still lists {name!r}")
        for r, e in self.data["routers"].items():
            if name in e["sources_seen"] + e.get("retrain_on", []):
                out.append(f"the index says router {r!r} lists {name!r}")
        # a copy of its adapter under another name (same data hash or source id) is its data too
        for cfg_path in sorted((self.folder / ADAPTERS).glob("*/adapter_config.json")):
            try:
                cfg = json.loads(cfg_path.read_text())
            except json.JSONDecodeError:
                continue
            if (rec.get("data_hash") and cfg.get("data_hash") == rec["data_hash"]) or \
                    cfg.get("source_id") == rec.get("source_id"):
                out.append(f"{cfg_path.parent.relative_to(self.folder)} holds an adapter trained on "
                           f"{name!r}'s data")
        return out

    def verify(self) -> list[str]:
        """Every problem with the registry (empty list = consistent): adapters present, unmodified
        (sha256), valid and on this backbone; policies and routers name only registered sources;
        stale routers hold no weights; no unregistered (orphan) files; every forgotten source gone."""
        from ..adapters.errors import AdapterError
        from ..adapters.store import read_adapter_config

        out: list[str] = []
        fp = self.data["backbone"]["fingerprint"]
        for name, e in self.data["sources"].items():
            folder = self.folder / e["adapter"]
            if not folder.is_dir():
                out.append(f"source {name!r}: {e['adapter']} is missing")
                continue
            try:
                cfg = read_adapter_config(folder)
            except AdapterError as err:
                out.append(f"source {name!r}: {err}")
                continue
            if cfg.backbone_fingerprint != fp:
                out.append(f"source {name!r}: adapter trained on backbone {cfg.backbone_fingerprint}, registry is {fp}")
            if cfg.kind != e["kind"]:
                out.append(f"source {name!r}: kind {cfg.kind!r} on disk, {e['kind']!r} in the index")
            have = {p.name for p in folder.iterdir() if p.is_file()}
            for fname, digest in e["sha256"].items():
                if fname not in have:
                    out.append(f"source {name!r}: {fname} is missing")
                elif sha256_file(folder / fname) != digest:
                    out.append(f"source {name!r}: {fname} was modified after it was added")
            for extra in sorted(have - set(e["sha256"])):
                out.append(f"source {name!r}: unregistered file {extra}")
        for p, members in self.data["policies"].items():
            for s in members:
                if s not in self.data["sources"]:
                    out.append(f"policy {p!r} lists unknown source {s!r}")
        for r, e in self.data["routers"].items():
            folder = self.folder / e["path"]
            for s in e["sources_seen"]:
                if s not in self.data["sources"]:
                    out.append(f"router {r!r} lists unknown source {s!r}")
            meta_path = folder / ROUTER_FILE
            if not meta_path.is_file():
                out.append(f"router {r!r}: {e['path']}/{ROUTER_FILE} is missing")
                continue
            meta = json.loads(meta_path.read_text())
            if meta.get("sources_seen") != e["sources_seen"] or bool(meta.get("stale")) != bool(e["stale"]):
                out.append(f"router {r!r}: {ROUTER_FILE} and the index disagree on the sources it has seen")
            if e["stale"] and (folder / ROUTER_WEIGHTS).exists():
                out.append(f"router {r!r} is stale but still holds weights")
            if not e["stale"] and not (folder / ROUTER_WEIGHTS).is_file():
                out.append(f"router {r!r}: {ROUTER_WEIGHTS} is missing")
        # orphans: anything on disk the index does not account for
        known = {ADAPTERS: set(self.data["sources"]), CACHES: set(self.data["sources"]),
                 MANIFESTS: {f"{s}.json" for s in self.data["sources"]}, ROUTERS: set(self.data["routers"])}
        for sub, names in known.items():
            d = self.folder / sub
            for p in sorted(d.iterdir()) if d.is_dir() else []:
                if p.name not in names:
                    out.append(f"orphan {sub}/{p.name}: not registered (left by a crash, or derived from a "
                               "removed source) -- delete it")
        for p in sorted(self.folder.iterdir()):
            if p.name not in (REGISTRY_FILE, REFERENCE, SERVE, *known):
                out.append(f"orphan {p.name}: not part of a registry")
        for f in self.data["forgotten"]:
            out += self.verify_forgotten(f["name"])
        return out

    def check_backbone(self, pipe) -> None:
        """RegistryError unless `pipe` is the backbone the registry's sources were trained on."""
        fp = getattr(pipe, "backbone_fingerprint", None)
        if fp != self.backbone["fingerprint"]:
            raise RegistryError(f"the registry's sources were trained on backbone {self.backbone['fingerprint']} "
                                f"({self.backbone['name']}); this pipeline is {fp} -- pass --backbone "
                                f"{self.backbone['name']}")

    # -- what a composition reads from the registry (the source provider of compose.CDMPipeline) ----------

    def heads(self, estimator: str, names: Sequence[str]):
        """The trained router heads of `estimator` for sources `names`: (score_fn, estimator kwargs)."""
        from ..routing.routers import score_fn_from_registry

        return score_fn_from_registry(self, estimator, list(names))

    def caption_prior(self, names: Sequence[str], prompts: Sequence[str], tokenizer, strength: float = 1.0):
        """lambda(c) [N x n] of `prompts` over `names` from the sources' cached caption statistics."""
        from ..routing.routers import caption_prior_from_registry

        return caption_prior_from_registry(self, list(names), list(prompts), tokenizer, strength)

    def summary(self) -> list[dict]:
        """One row per source: name, kind, adapter folder, the routers that saw it, its policies."""
        rows = []
        for name, e in self.data["sources"].items():
            rows.append({"name": name, "kind": e["kind"], "adapter": e["adapter"], "data_hash": e["data_hash"],
                         "routers": [r for r, x in self.data["routers"].items() if name in x["sources_seen"]],
                         "policies": [p for p, m in self.data["policies"].items() if name in m]})
        return rows

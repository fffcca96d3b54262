"""The set of sources a service composes: add, list, verify, forget; access policies; router artifacts.

A registry is a folder (DESIGN.md sections 1 and 4):

    REGISTRY/registry.json            the index (written atomically; lists every file below with its sha256)
    REGISTRY/.lock                    the writer lock: one read-modify-write at a time (util.lock)
    REGISTRY/adapters/NAME/           each source's adapter folder, copied in (no links) and checksummed
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

Every change is one read-modify-write under the registry's writer lock (`util.lock.locked`), which
`prompt-cdm keys` and the server take too: parallel writers queue instead of overwriting each other.
New files are written beside their place and renamed in after an fsync, and the index is written
last, so a writer killed at any moment leaves either its whole change or files the next writer
removes (temp folders, an adapter folder the index never listed).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from ..util.io import atomic_path, copy_tree, fsync_path, loads_json, read_json, sha256_file, tree_files, write_json
from ..util.lock import LOCK_NAME, locked

REGISTRY_FILE = "registry.json"
ADAPTERS, ROUTERS, CACHES, MANIFESTS = "adapters", "routers", "caches", "manifests"
ROUTER_FILE, ROUTER_WEIGHTS = "router.json", "weights.safetensors"
ROUTER_KINDS = ("classifier", "ratio")
REFERENCE = "reference"  # the public reference set of the ratio heads (no source's data)
SERVE = "serve"  # API keys and the audit log of `prompt-cdm serve` (no source's data)
SERVE_FILES = ("keys.json", "audit.jsonl")  # what serve/ may hold (serve.keys, serve.audit)
AUDIT_FILE = "audit.jsonl"
FORGOTTEN_MARK = "[forgotten]"  # what a forgotten source's name becomes in the audit log
FORMAT, VERSION = "prompt_cdm.registry", 1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")  # also a valid peft adapter name
MAX_NAME = 100  # a name is a folder name (and a peft adapter name): far below any file system's limit
# keys of the index that registries made before them lack (read as empty)
OPTIONAL_KEYS = ("policy_ids", "files")


class RegistryError(ValueError):
    """A registry operation is refused (unknown source or policy, wrong backbone, ...); nothing changed."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")



def _check_name(name: str, what: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise RegistryError(f"{what} name {name!r} must be letters, digits, '_' or '-' (starting with a "
                            "letter or digit)")
    if len(name) > MAX_NAME:
        raise RegistryError(f"{what} name {name[:20]}... is {len(name)} characters; use at most {MAX_NAME}")


def _is_temp(p: Path) -> bool:
    """A writer's temp file or folder (util.io.atomic_path, mkdtemp here, replace_dir's .old)."""
    return p.name.startswith(".") and p.name.endswith((".tmp", ".old"))


def _rmtree(path: Path) -> None:
    """Delete a file or folder. A folder is first renamed to a temp name (atomic), so a kill during the
    deletion leaves a temp folder the next writer removes (`_clean_temps`), never half a folder that still
    looks like a source, a cache or a router. A deletion that fails (an error, not a kill) puts what is
    left back under its name, for `verify` to name and a rerun to finish."""
    if path.is_dir() and not path.is_symlink():
        doomed = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        os.replace(path, doomed)  # replaces the empty temp folder
        try:
            shutil.rmtree(doomed)
        except BaseException:
            if doomed.exists():
                os.replace(doomed, path)
            raise
    elif path.exists() or path.is_symlink():
        path.unlink()


@dataclass
class ForgetReport:
    """What `forget` did: every path deleted, routers made stale, policies edited."""

    name: str
    deleted: list[str] = field(default_factory=list)
    stale_routers: list[str] = field(default_factory=list)
    policies: list[str] = field(default_factory=list)
    user_cache: list[str] = field(default_factory=list)  # cached data manifests of the source deleted
    audit_lines_redacted: int = 0  # audit log lines whose mention of the source was replaced
    kept: list[str] = field(default_factory=list)  # what stays, and why (docs/forgetting.md)


KEPT = [
    "registry.json keeps the name, source id and data hash in its forgotten list, so verify can keep proving "
    "the source is gone and add can refuse its data coming back; they are hashes and ids, not data",
    f"serve/{AUDIT_FILE} keeps its lines (time, request and key ids, other sources' credit); the source's name "
    f"in them is replaced by {FORGOTTEN_MARK}",
    "copies outside the registry are not touched: the adapter folder it was added from, the training output "
    "(OUT, OUT.train with its latent cache: `prompt-cdm train --clean-cache`), hub pushes, and the source's "
    "images themselves -- delete those where you keep them",
]


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
        if not isinstance(data, dict) or not keys <= set(data) <= keys | set(OPTIONAL_KEYS):
            raise RegistryError(f"{path}: expected exactly the keys {sorted(keys)} (and optionally "
                                f"{', '.join(OPTIONAL_KEYS)})")
        if data["format"] != FORMAT or data["version"] != VERSION:
            raise RegistryError(f"{path}: format {data['format']!r} v{data['version']} is not "
                                f"{FORMAT!r} v{VERSION}")
        bb = data["backbone"]
        if not isinstance(bb, dict) or not bb.get("fingerprint"):
            raise RegistryError(f"{path}: backbone must record a fingerprint")
        for k in OPTIONAL_KEYS:
            data.setdefault(k, {})
        return data

    @classmethod
    def create(cls, folder: str | os.PathLike, backbone_name: str, fingerprint: str,
               modules: dict | None = None) -> "Registry":
        """A new, empty registry for the backbone with `fingerprint` (backbone.fingerprint). `modules`: the
        backbone's `adapters.kinds.backbone_table`, kept so that `add` checks every adapter's keys and shapes
        against the backbone without loading it (`registry init` records it)."""
        folder = Path(folder)
        if (folder / REGISTRY_FILE).exists():
            raise RegistryError(f"{folder} is already a registry")
        if folder.exists() and any(folder.iterdir()):
            raise RegistryError(f"{folder} exists and is not empty; pick a new folder for the registry")
        if not fingerprint:
            raise RegistryError("a registry needs the backbone's fingerprint")
        write_json(folder / REGISTRY_FILE, {
            "format": FORMAT, "version": VERSION,
            "backbone": {"name": str(backbone_name), "fingerprint": str(fingerprint),
                         **({"modules": modules} if modules else {})},
            "sources": {}, "policies": {}, "routers": {}, "forgotten": [], "policy_ids": {}, "files": {},
        })
        return cls(folder)

    def _save(self) -> None:
        write_json(self.folder / REGISTRY_FILE, self.data)
        fsync_path(self.folder / REGISTRY_FILE)

    def _reload(self) -> None:
        path = self.folder / REGISTRY_FILE
        self.data = self._validate(read_json(path, RegistryError), path)

    @contextmanager
    def _writing(self):
        """One read-modify-write of the index: hold the writer lock, reread the index (another process
        may have changed it since this object read it), remove temp files a killed writer left, run the
        block, save. On an error nothing is saved and the index is reread."""
        with locked(self.folder):
            self._reload()
            self._clean_temps()
            try:
                yield
            except BaseException:
                self._reload()
                raise
            self._save()

    def _clean_temps(self) -> None:
        """(under the lock: no writer is running) Delete what killed writers left: temp files and folders."""
        dirs = [self.folder] + [self.folder / d for d in (ADAPTERS, ROUTERS, MANIFESTS, CACHES, REFERENCE, SERVE)]
        dirs += [p for p in (self.folder / CACHES).iterdir() if p.is_dir()] if (self.folder / CACHES).is_dir() else []
        for d in dirs:
            for p in list(d.iterdir()) if d.is_dir() else []:
                if _is_temp(p):
                    _rmtree(p)

    def policy_id(self, name: str) -> str | None:
        """The identity of policy `name`: a new one each time the name is (re)created, so keys bound to a
        removed policy never apply to a later policy of the same name. None: made before policy ids."""
        self.policy(name)
        return self.data["policy_ids"].get(name)

    @property
    def backbone(self) -> dict:
        """{"name": ..., "fingerprint": ...} (and "modules": the backbone's shapes, when recorded)"""
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
        """Copy an adapter folder in as source `name` (regular files only: a symbolic link anywhere is refused)
        and validate the copy (`adapters.validate`, the check hub push and pull run too: config, weights' keys,
        shapes, values and bounds, no pickle files): trained on this registry's backbone (fingerprint), not on
        forgotten data, no name/placeholder clash. Every copied file is indexed with its sha256."""
        _check_name(name, "source")
        src = Path(adapter_dir)
        if manifest is not None and (not Path(manifest).is_file() or Path(manifest).is_symlink()):
            raise RegistryError(f"manifest {manifest} is not a file")
        with self._writing():
            return self._add(name, src, manifest)

    def _add(self, name: str, src: Path, manifest) -> dict:
        """(under the lock) Copy into a temp folder, validate the copy, rename it in; the index is saved last."""
        from ..adapters.errors import AdapterError
        from ..adapters.kinds import get_kind
        from ..adapters.store import CONFIG_NAME
        from ..adapters.validate import check_adapter_folder

        if name in self.data["sources"]:
            raise RegistryError(f"source {name!r} is already in the registry; `forget` it first or pick another name")
        gone = {f["name"]: f for f in self.data["forgotten"]}
        if name in gone:
            raise RegistryError(f"{name!r} names a forgotten source; names are not reused (so verify can keep "
                                "proving it is gone) -- pick another name")
        if not src.is_dir() or src.is_symlink():
            raise RegistryError(f"cannot add {name!r}: {src} is not a folder; pass an adapter folder written by "
                                "save_adapter")
        rel = f"{ADAPTERS}/{name}"
        dst = self.folder / rel
        mpath = self.folder / MANIFESTS / f"{name}.json"
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=dst.parent))
        created = []
        try:
            try:
                hashes = copy_tree(src, tmp, AdapterError)
                bb = self.data["backbone"]
                cfg = check_adapter_folder(tmp, label=str(src),
                                           backbone=dict(bb["modules"], name=bb["name"]) if bb.get("modules") else None)
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
            for f in gone.values():
                copies = sorted(rel for rel, h in hashes.items() if h in set(f.get("weights_sha256", [])))
                if copies:
                    raise RegistryError(f"{src}/{copies[0]} is a copy of forgotten source {f['name']!r}'s weights; "
                                        "forgotten data cannot come back")
            ph = get_kind(cfg.kind).trigger(cfg.params)  # a trigger word must be unique among composable sources
            if ph is not None:
                for other, e in self.data["sources"].items():
                    if e.get("placeholder") == ph:
                        raise RegistryError(f"source {other!r} already uses the placeholder {ph}; two soft prompts "
                                            "with one placeholder cannot be composed -- retrain with another")
            entry = {"kind": cfg.kind, "adapter": rel, "source_id": cfg.source_id, "data_hash": cfg.data_hash,
                     "sha256": hashes, "added": _now()}
            if ph is not None:
                entry["placeholder"] = ph
            for leftover in (dst, mpath):  # what an add killed before it wrote the index left behind
                _rmtree(leftover)
            if manifest is not None:
                mpath.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(mpath) as mtmp:
                    shutil.copyfile(manifest, mtmp)
                    fsync_path(mtmp)
                created.append(mpath)
                entry["manifest_sha256"] = sha256_file(mpath)
            os.replace(tmp, dst)
            created.append(dst)
            fsync_path(dst.parent)
            self.data["sources"][name] = entry
        except BaseException:
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
        with self._writing():
            for s in sources:
                self.source(s)
            if name not in self.data["policies"]:
                self.data["policy_ids"][name] = secrets.token_hex(8)
            self.data["policies"][name] = sources
        return sources

    def remove_policy(self, name: str) -> None:
        with self._writing():
            self.policy(name)
            del self.data["policies"][name]
            self.data["policy_ids"].pop(name, None)

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
        with self._writing():
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
                hashes = {f: sha256_file(tmp / f) for f in (ROUTER_FILE, ROUTER_WEIGHTS)}
                if dst.exists():
                    _rmtree(dst)
                os.replace(tmp, dst)
                fsync_path(dst.parent)
            except BaseException:
                _rmtree(tmp)
                raise
            self.data["routers"][name] = {"kind": kind, "path": f"{ROUTERS}/{name}", "sources_seen": seen,
                                          "stale": False, "sha256": hashes}
        return meta

    # -- files derived from a source's data, and the reference set ------------------------------------

    def save_derived(self, rel: str, write) -> Path:
        """Write the file `rel` (caches/SOURCE/FILE: derived from a registered source's data, deleted when it
        is forgotten; or reference/FILE: the public reference set) under the writer lock, and index its
        sha256. `write(path)` writes the file's bytes to the temp path it is given."""
        parts = Path(rel).parts
        ok = (len(parts) == 3 and parts[0] == CACHES) or (len(parts) == 2 and parts[0] == REFERENCE)
        if not ok or any(_is_temp(Path(x)) or x in ("..", ".") for x in parts):
            raise RegistryError(f"{rel}: derived files live at {CACHES}/SOURCE/FILE or {REFERENCE}/FILE")
        with self._writing():
            if parts[0] == CACHES:
                self.source(parts[1])
            path = self.folder / rel
            with atomic_path(path) as tmp:
                write(tmp)
                fsync_path(tmp)
            fsync_path(path.parent)
            self.data["files"][Path(rel).as_posix()] = sha256_file(path)
        return path

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

    def forget(self, name: str, cache_dir: str | os.PathLike | None = None) -> ForgetReport:
        """Exactly unlearn source `name`: delete every file derived from its data and every mention.

        Order, under the writer lock: the index is rewritten first (the source leaves it; routers that saw
        it lose their weights and turn stale; policies drop it; the forgotten log records its data hash and
        its weights' hashes), then the files go, then the source's cached data manifests outside the
        registry (`data.sources.cache_root`, or `cache_dir`), then its name is redacted from the audit log.
        Re-running `forget` after a crash finishes the deletion. Raises RegistryError unless `verify` finds
        nothing of the source afterwards. The report's `kept` says what stays and why."""
        with self._writing():
            return self._forget(name, cache_dir)

    def _forget(self, name: str, cache_dir) -> ForgetReport:
        from ..data.sources import clear_cached_manifests

        pending = [f for f in self.data["forgotten"] if f["name"] == name]
        if name not in self.data["sources"] and not pending:
            self.source(name)  # raises: unknown source
        rep = ForgetReport(name, kept=list(KEPT))
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
            weights = sorted({h for f, h in entry.get("sha256", {}).items() if f.endswith(".safetensors")})
            self.data["forgotten"].append({"name": name, "source_id": entry.get("source_id", name),
                                           "data_hash": entry.get("data_hash", ""), "weights_sha256": weights,
                                           "at": _now()})
            for r in [r for r, e in self.data["routers"].items() if e.get("delete")]:
                rep.deleted.append(self.data["routers"].pop(r)["path"])
            for f in [f for f in self.data["files"] if f.startswith(f"{CACHES}/{name}/")]:
                del self.data["files"][f]
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
                meta = self._router_meta(meta_path) or {"kind": e["kind"]}
                meta.update(stale=True, sources_seen=[], retrain_on=e.get("retrain_on", []))
                write_json(meta_path, meta)
                e["sha256"] = {ROUTER_FILE: sha256_file(meta_path)}
        for rel in list((self.folder / ROUTERS).glob("*")) if (self.folder / ROUTERS).is_dir() else []:
            if rel.name not in self.data["routers"] and not rel.name.startswith("."):
                if name in (self._router_meta(rel / ROUTER_FILE) or {}).get("sources_seen", []):
                    _rmtree(rel)  # a crash left a deleted head's folder behind
                    rep.deleted.append(f"{ROUTERS}/{rel.name}")
        rec = next(f for f in self.data["forgotten"] if f["name"] == name)
        rep.user_cache = clear_cached_manifests(rec["source_id"], cache_dir)
        rep.audit_lines_redacted = self._redact_audit(name)
        problems = self.verify_forgotten(name)
        if problems:
            raise RegistryError(f"forget {name!r} did not finish: {problems[0]} (run forget again)")
        return rep

    @staticmethod
    def _router_meta(path: Path) -> dict | None:
        """router.json, or None when it is missing or unreadable."""
        if not path.is_file():
            return None
        try:
            meta = loads_json(path.read_bytes(), RegistryError, str(path))
        except RegistryError:
            return None
        return meta if isinstance(meta, dict) else None

    def _redact_audit(self, name: str) -> int:
        """(under the lock, which the audit log's appends take too) Replace `name` in serve/audit.jsonl's
        `sources` and `credit` by FORGOTTEN_MARK; the number of lines changed."""
        path = self.folder / SERVE / AUDIT_FILE
        if not path.is_file():
            return 0
        out, changed = [], 0
        for line in path.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                row = None
            if not isinstance(row, dict):
                if name in line:  # not ours to parse: drop the mention anyway
                    line, changed = line.replace(name, FORGOTTEN_MARK), changed + 1
                out.append(line)
                continue
            hit = False
            if isinstance(row.get("sources"), list) and name in row["sources"]:
                row["sources"] = [FORGOTTEN_MARK if s == name else s for s in row["sources"]]
                hit = True
            if isinstance(row.get("credit"), dict) and name in row["credit"]:
                credit = {}
                for k, v in row["credit"].items():
                    k = FORGOTTEN_MARK if k == name else k
                    credit[k] = credit.get(k, 0.0) + v if isinstance(v, (int, float)) else v
                row["credit"], hit = credit, True
            changed += hit
            out.append(json.dumps(row) if hit else line)
        if changed:
            from ..util.io import write_text

            write_text(path, "".join(x + "\n" for x in out))
            fsync_path(path)
        return changed

    # -- verification ------------------------------------------------------------------------------

    def _walk(self, rel: str) -> tuple[list[str], list[str]]:
        """(files, problems) under the registry path `rel`: the relative paths of its regular files, and a
        problem for each link, special file or folder with no file in it (the index lists files only)."""
        files, problems = [], []
        root = self.folder / rel
        if not root.is_dir():
            return files, problems
        for dirpath, dirs, names in os.walk(root):
            d = Path(dirpath)
            if not dirs and not names and d != root:
                problems.append(f"unregistered empty folder {d.relative_to(self.folder).as_posix()}")
            for n in sorted(dirs) + sorted(names):
                p = d / n
                r = p.relative_to(self.folder).as_posix()
                if p.is_symlink():
                    problems.append(f"{r} is a symbolic link (the registry holds regular files only)")
                elif n in names and not p.is_file():
                    problems.append(f"{r} is not a regular file")
                elif n in names:
                    files.append(r)
            dirs[:] = [n for n in dirs if not (d / n).is_symlink()]
        return sorted(files), problems

    def _check_files(self, listed: dict[str, str], on_disk: list[str], what: str) -> list[str]:
        """Problems of the files `on_disk` (registry-relative) against `listed` {relative path: sha256}."""
        out = []
        have = set(on_disk)
        for rel, digest in sorted(listed.items()):
            if rel not in have:
                out.append(f"{what}: {rel} is missing")
            elif sha256_file(self.folder / rel) != digest:
                out.append(f"{what}: {rel} was modified after it was added")
        for extra in sorted(have - set(listed)):
            out.append(f"{what}: unregistered file {extra} (not in the index) -- delete it")
        return out

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
            meta = self._router_meta(meta_path)
            if meta is None and meta_path.is_file():
                out.append(f"{ROUTERS}/{folder.name}/{ROUTER_FILE} is not valid JSON")
            meta = meta or {}
            seen = [x for k in ("sources_seen", "retrain_on") for x in (meta.get(k) or []) if isinstance(x, str)]
            if name in seen:
                out.append(f"router {folder.name!r} still lists {name!r}")
        for r, e in self.data["routers"].items():
            if name in e["sources_seen"] + e.get("retrain_on", []):
                out.append(f"the index says router {r!r} lists {name!r}")
        # a copy of its adapter under another name (same data hash or source id) is its data too
        for cfg_path in sorted((self.folder / ADAPTERS).rglob("adapter_config.json")):
            cfg = self._router_meta(cfg_path) or {}
            if (rec.get("data_hash") and cfg.get("data_hash") == rec["data_hash"]) or \
                    cfg.get("source_id") == rec.get("source_id"):
                out.append(f"{cfg_path.parent.relative_to(self.folder)} holds an adapter trained on "
                           f"{name!r}'s data")
        # ... and so is a copy of its weights anywhere, under any name
        gone = set(rec.get("weights_sha256", []))
        if gone:
            for p in sorted(self.folder.rglob("*")):
                if p.is_file() and not p.is_symlink() and p.name != REGISTRY_FILE and sha256_file(p) in gone:
                    out.append(f"{p.relative_to(self.folder).as_posix()} is a copy of {name!r}'s weights")
        return out

    def verify(self) -> list[str]:
        """Every problem with the registry (empty list = consistent): every file under the registry is
        listed in the index with its sha256 and unmodified (adapters, manifests, router artifacts, caches,
        the reference set); adapters valid and on this backbone; policies and routers name only
        registered sources; stale routers hold no weights; nothing else on disk (an unlisted file, folder
        or link anywhere is a problem naming it); every forgotten source gone."""
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
            files, problems = self._walk(e["adapter"])
            out += [f"source {name!r}: {p}" for p in problems]
            prefix = e["adapter"] + "/"
            out += [x.replace(prefix, "") for x in self._check_files(
                {prefix + f: h for f, h in e["sha256"].items()}, files, f"source {name!r}")]
            mrel = f"{MANIFESTS}/{name}.json"
            if "manifest_sha256" in e:
                if not (self.folder / mrel).is_file():
                    out.append(f"source {name!r}: {mrel} is missing")
                elif sha256_file(self.folder / mrel) != e["manifest_sha256"]:
                    out.append(f"source {name!r}: {mrel} was modified after it was added")
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
            meta = self._router_meta(meta_path)
            if meta is None:
                out.append(f"router {r!r}: {e['path']}/{ROUTER_FILE} is not valid JSON")
                continue
            if meta.get("sources_seen") != e["sources_seen"] or bool(meta.get("stale")) != bool(e["stale"]):
                out.append(f"router {r!r}: {ROUTER_FILE} and the index disagree on the sources it has seen")
            if e["stale"] and (folder / ROUTER_WEIGHTS).exists():
                out.append(f"router {r!r} is stale but still holds weights")
            if not e["stale"] and not (folder / ROUTER_WEIGHTS).is_file():
                out.append(f"router {r!r}: {ROUTER_WEIGHTS} is missing")
            files, problems = self._walk(e["path"])
            out += [f"router {r!r}: {p}" for p in problems]
            listed = e.get("sha256")
            if listed is None:  # indexed before routers' files were hashed: only their two names
                listed_names = {ROUTER_FILE, ROUTER_WEIGHTS}
                out += [f"router {r!r}: unregistered file {f}" for f in files
                        if f.rsplit("/", 1)[-1] not in listed_names or f.count("/") != 2]
            else:
                out += self._check_files({f"{e['path']}/{f}": h for f, h in listed.items()}, files, f"router {r!r}")
        # caches and the reference set: every file listed in the index's `files`
        derived = {}
        for sub in (CACHES, REFERENCE):
            files, problems = self._walk(sub)
            out += problems
            derived.update({f: None for f in files})
        out += self._check_files(self.data["files"], list(derived), "derived files")
        for f in self.data["files"]:
            parts = f.split("/")
            if parts[0] == CACHES and parts[1] not in self.data["sources"]:
                out.append(f"the index lists {f} of unknown source {parts[1]!r}")
        # serve/: the key file and the audit log, nothing else
        files, problems = self._walk(SERVE)
        out += problems
        out += [f"unregistered file {f}: {SERVE}/ holds only {', '.join(SERVE_FILES)} -- delete it"
                for f in files if f.split("/", 1)[1] not in SERVE_FILES]
        # orphans: anything on disk the index does not account for
        known = {ADAPTERS: set(self.data["sources"]), CACHES: set(self.data["sources"]),
                 MANIFESTS: {f"{s}.json" for s in self.data["sources"]}, ROUTERS: set(self.data["routers"])}
        for sub, names in known.items():
            d = self.folder / sub
            for p in sorted(d.iterdir()) if d.is_dir() else []:
                if p.name not in names:
                    out.append(f"orphan {sub}/{p.name}: not registered (left by a crash, or derived from a "
                               "removed source) -- delete it")
        for name, e in self.data["sources"].items():
            if (self.folder / MANIFESTS / f"{name}.json").exists() and "manifest_sha256" not in e:
                out.append(f"source {name!r}: unregistered file {MANIFESTS}/{name}.json (not in the index) -- "
                           "delete it")
        for p in sorted(self.folder.iterdir()):
            if p.name not in (REGISTRY_FILE, LOCK_NAME, REFERENCE, SERVE, *known):
                out.append(f"orphan {p.name}: not part of a registry")
            elif p.name in (REFERENCE, SERVE, *known) and (p.is_symlink() or not p.is_dir()):
                out.append(f"{p.name} is not a folder")
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

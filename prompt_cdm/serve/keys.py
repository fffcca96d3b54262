"""API keys of the HTTP service, stored hashed in the registry (pure: standard library only).

    REGISTRY/serve/keys.json    {"format": "prompt_cdm.keys", "version": 1, "keys": {KEY_ID: record}}

A key is `pcdm_<id>_<secret>`: `id` (12 hex digits) names the key in listings and the audit log;
`secret` (32 random bytes, URL-safe base64) is shown once, when the key is made, and only
`sha256(salt || secret)` is kept. A slow password hash (scrypt) buys nothing here: the secret has
256 random bits, so no guessing attack exists to slow down, and a fast hash keeps a request's auth
at microseconds. Checking compares digests in constant time (`hmac.compare_digest`), and an unknown
id costs the same hash as a known one.

Each record is bound to an access policy of the registry (the sources its holder may compose) --
by the policy's name and its id (`Registry.policy_id`), so removing a policy and creating another of
the same name grants the old keys nothing -- or is an admin key (no policy: admin endpoints only).
Revoked keys stay listed (their ids appear in the audit log) but never authenticate again. Every
change is a read-modify-write under the registry's writer lock (`util.lock`: parallel `keys create`
and `keys revoke` never lose one another's change), written atomically; `refresh()` rereads the file
when another process (the CLI) changed it, so a running server honours a revocation at once.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from ..util.io import read_json, write_json
from ..util.lock import locked
from ..registry.registry import SERVE as SERVE_DIR

KEYS_FILE = "keys.json"
FORMAT, VERSION = "prompt_cdm.keys", 1
PREFIX = "pcdm"
_KEY = re.compile(r"^pcdm_([0-9a-f]{12})_([A-Za-z0-9_\-]{43})$")


class KeyStoreError(ValueError):
    """A key operation is refused (unknown key id, unreadable key file, ...); nothing changed."""


@dataclass(frozen=True)
class KeyRecord:
    """One key as stored (without its secret): id, policy (None for admin), admin, created, revoked."""

    id: str
    policy: str | None
    admin: bool
    created: str
    revoked: str | None = None
    note: str = ""
    policy_id: str | None = None  # the identity of the policy when the key was made (None: before policy ids)

    @property
    def active(self) -> bool:
        return self.revoked is None

    def public(self) -> dict:
        """What listings show: everything but the hash."""
        return asdict(self)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _digest(salt: str, secret: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + secret.encode()).hexdigest()


def keys_path(registry_folder: str | os.PathLike) -> Path:
    return Path(registry_folder) / SERVE_DIR / KEYS_FILE


class KeyStore:
    """The key file of a registry. `KeyStore(registry_folder)`; a missing file is an empty store."""

    def __init__(self, registry_folder: str | os.PathLike):
        self.path = keys_path(registry_folder)
        self.folder = Path(registry_folder)
        self._stamp = None
        self._data = {"format": FORMAT, "version": VERSION, "keys": {}}
        self.refresh()

    def _signature(self):
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)  # atomic rewrites change the inode

    def refresh(self) -> bool:
        """Reread the file if it changed on disk since the last read; True if it did."""
        stamp = self._signature()
        if stamp == self._stamp:
            return False
        if stamp is None:
            data = {"format": FORMAT, "version": VERSION, "keys": {}}
        else:
            data = read_json(self.path, KeyStoreError)
            if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION \
                    or not isinstance(data.get("keys"), dict):
                raise KeyStoreError(f"{self.path} is not a {FORMAT} v{VERSION} key file")
        self._data, self._stamp = data, stamp
        return True

    def _save(self) -> None:
        from ..util.io import fsync_path

        write_json(self.path, self._data)
        fsync_path(self.path)
        self._stamp = self._signature()

    # -- making and revoking ----------------------------------------------------------------------

    def create(self, policy: str | None = None, admin: bool = False, note: str = "") -> tuple[KeyRecord, str]:
        """A new key -> (its record, the key text). The text is not stored: show it once. A policy key
        records the policy's identity (`Registry.policy_id`), which a later policy of the same name lacks."""
        from ..registry.registry import REGISTRY_FILE, Registry

        if admin == (policy is not None):
            raise KeyStoreError("a key is either bound to a policy (--policy NAME) or an admin key (--admin)")
        with locked(self.folder):
            policy_id = None
            if policy is not None and (self.folder / REGISTRY_FILE).is_file():
                policy_id = Registry(self.folder).policy_id(policy)  # unknown policy: RegistryError
            self._stamp = None
            self.refresh()
            kid = secrets.token_hex(6)
            while kid in self._data["keys"]:
                kid = secrets.token_hex(6)
            secret, salt = secrets.token_urlsafe(32), secrets.token_hex(16)
            rec = KeyRecord(kid, policy, admin, _now(), None, note, policy_id)
            self._data["keys"][kid] = dict(rec.public(), salt=salt, sha256=_digest(salt, secret))
            self._save()
        return rec, f"{PREFIX}_{kid}_{secret}"

    def revoke(self, key_id: str) -> KeyRecord:
        """Revoke key `key_id` (it stays listed, never authenticates again). Idempotent."""
        with locked(self.folder):
            self._stamp = None
            self.refresh()
            entry = self._data["keys"].get(key_id)
            if entry is None:
                raise KeyStoreError(f"unknown key id {key_id!r}; `prompt-cdm keys list --registry DIR` shows them")
            if entry.get("revoked") is None:
                entry["revoked"] = _now()
                self._save()
        return self.get(key_id)

    # -- reading ----------------------------------------------------------------------------------

    def get(self, key_id: str) -> KeyRecord:
        e = self._data["keys"][key_id]
        return KeyRecord(e["id"], e["policy"], bool(e["admin"]), e["created"], e.get("revoked"), e.get("note", ""),
                         e.get("policy_id"))

    def records(self) -> list[KeyRecord]:
        self.refresh()
        return [self.get(k) for k in self._data["keys"]]

    def verify(self, token: str | None) -> KeyRecord | None:
        """The active record of key text `token`, or None (malformed, unknown, wrong secret, revoked)."""
        self.refresh()
        m = _KEY.match(token or "")
        kid, secret = (m.group(1), m.group(2)) if m else ("", token or "")
        entry = self._data["keys"].get(kid)
        salt = entry["salt"] if entry else "00" * 16
        digest = _digest(salt, secret)  # computed for unknown ids too: no timing oracle on ids
        if entry is None or not hmac.compare_digest(digest, entry["sha256"]):
            return None
        rec = self.get(kid)
        return rec if rec.active else None

"""Share adapter folders: push to and pull from the Hugging Face Hub or any fsspec location.

    prompt-cdm hub push ADAPTER_DIR DEST        DEST / SRC: a hub repo id `owner/name` (or `hf://owner/name`),
    prompt-cdm hub pull SRC --into DIR          a folder path, or an fsspec URL (file://, memory://, s3://, ...)

What is shared is the adapter folder itself (store.py) plus `checksums.json`: the sha256 and size of every
other file. The user's folder is not modified: push copies it to a temp folder, validates that copy (the
bytes that leave the machine), writes checksums.json into it and uploads it -- to the hub as ONE commit, so
a reader of a revision never sees half an adapter. Pull downloads into a temp folder beside DIR, checks
every checksum, validates the folder (optionally loads it onto a backbone to check the fingerprint), then
renames it into place: a failed pull leaves nothing at DIR.

Every refusal raises HubError (a ValueError) with one message naming the problem and the fix.
huggingface_hub and fsspec are imported only when a transfer runs; importing this module is cheap.
"""
from __future__ import annotations

import json
import os
import posixpath
import re
import shutil
import sys
import tempfile
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..util.io import loads_json, replace_dir, sha256_file, write_json

CHECKSUMS_NAME = "checksums.json"
CHECKSUMS_FORMAT = "prompt_cdm/checksums"
CHECKSUMS_VERSION = 1
# Never part of a pushed adapter: git metadata and huggingface_hub's local-dir download bookkeeping.
_NOT_PUSHED = (".git", ".cache/huggingface")
_HUB_HOUSEKEEPING = ".gitattributes"  # every hub repo gets one at creation; not adapter content
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class HubError(ValueError):
    """An adapter cannot be pushed or pulled; the message names the problem and the fix."""


# ---------------------------------------------------------------- locations


@dataclass(frozen=True)
class Location:
    """Where an adapter is shared: a hub repo (`repo_id`) or an fsspec URL / local path (`url`)."""

    repo_id: str | None = None
    url: str | None = None

    @property
    def is_hub(self) -> bool:
        return self.repo_id is not None

    def __str__(self) -> str:
        return self.repo_id if self.is_hub else self.url


def parse_location(text: str) -> Location:
    """Hub repo or fsspec location? `hf://owner/name` and a bare `owner/name` (exactly one '/', not an
    existing path, not starting with '.', '/' or '~') are hub repos; any other `scheme://` is an fsspec
    URL; everything else is a local folder path. Same rule as prompt_cdm.backbone.load."""
    text = str(text)
    if text.startswith("hf://"):
        repo_id = text[len("hf://"):].strip("/")
        if not _HUB_ID.match(repo_id):
            raise HubError(f"{text!r}: hf:// takes a model repo id owner/name, e.g. hf://alice/stars-lora")
        return Location(repo_id=repo_id)
    if "://" in text:
        return Location(url=text)
    looks_local = os.path.exists(text) or text.startswith((".", "/", "~")) or text.count("/") != 1
    if looks_local:
        return Location(url=str(Path(text).expanduser().resolve()))
    if not _HUB_ID.match(text):
        raise HubError(f"{text!r} is neither a hub repo id (owner/name: letters, digits, '-', '_', '.') nor an "
                       "existing path; for a new local folder write ./owner/name or an absolute path")
    return Location(repo_id=text)


def _filesystem(url: str):
    """(fsspec filesystem, path) for `url`, or HubError naming the backend package to install."""
    import fsspec
    from fsspec.registry import known_implementations

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        protocol = url.split("://", 1)[0]
        spec = known_implementations.get(protocol, {})
        package = spec.get("class", "").split(".")[0]
        if package in ("", "fsspec"):  # an fsspec-internal class whose dependency is missing
            package = getattr(e.__cause__, "name", None) or getattr(e, "name", None) or package
        raise HubError(f"{url}: the fsspec backend for {protocol}:// is not installed ({e}); "
                       f"install it with `pip install {package}`") from None
    except ValueError as e:
        raise HubError(f"{url}: {e}; use a hub repo id (owner/name), a folder path, or an fsspec URL whose "
                       "protocol fsspec knows (file://, memory://, s3://, gs://, ...)") from None


# ---------------------------------------------------------------- checksums and validation


def _local_files(folder: Path) -> list[str]:
    """Relative POSIX paths of the files under `folder`, minus checksums.json and _NOT_PUSHED."""
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if rel == CHECKSUMS_NAME or any(rel == n or rel.startswith(n + "/") for n in _NOT_PUSHED):
            continue
        if p.is_symlink():  # a link would upload whatever it points at (/etc/passwd, another source's weights)
            raise HubError(f"{folder}/{rel} is a symbolic link; an adapter folder holds regular files only -- "
                           "replace it with the file itself")
        if p.is_file():
            out.append(rel)
    return out



def compute_checksums(folder: str | os.PathLike) -> dict:
    """checksums.json content for `folder`: sha256 and size of every file except checksums.json itself."""
    folder = Path(folder)
    files = {rel: {"sha256": sha256_file(folder / rel), "size": (folder / rel).stat().st_size}
             for rel in _local_files(folder)}
    return {"format": CHECKSUMS_FORMAT, "version": CHECKSUMS_VERSION, "algorithm": "sha256", "files": files}


def _safe_relpath(rel: Any) -> bool:
    return (isinstance(rel, str) and rel != "" and not rel.startswith("/") and "\\" not in rel
            and all(part not in ("", ".", "..") for part in rel.split("/")))


def verify_checksums(folder: str | os.PathLike, label: str | None = None, ignore: tuple[str, ...] = ()) -> None:
    """Check `folder` against its checksums.json: every listed file present with its size and sha256, and no
    other file (files in `ignore` that checksums.json does not list are deleted). `label` names the
    source in messages."""
    folder = Path(folder)
    label = label or str(folder)
    again = "push the adapter folder again with `prompt-cdm hub push`"
    path = folder / CHECKSUMS_NAME
    if not path.is_file():
        raise HubError(f"{label} has no {CHECKSUMS_NAME}: it was not pushed with `prompt-cdm hub push`, or the push "
                       f"did not finish; {again}")
    data = loads_json(path.read_bytes(), HubError, f"{label}: {CHECKSUMS_NAME}", again)
    files = data.get("files") if isinstance(data, dict) else None
    if (not isinstance(files, dict) or data.get("format") != CHECKSUMS_FORMAT
            or data.get("version") != CHECKSUMS_VERSION or data.get("algorithm") != "sha256"):
        raise HubError(f"{label}: {CHECKSUMS_NAME} is not a {CHECKSUMS_FORMAT} v{CHECKSUMS_VERSION} sha256 file; "
                       f"{again}")
    for rel, entry in files.items():
        if not _safe_relpath(rel) or not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) \
                or not isinstance(entry.get("size"), int):
            raise HubError(f"{label}: {CHECKSUMS_NAME} has a malformed entry {rel!r}; {again}")
    for name in ignore:
        if name not in files and (folder / name).is_file():
            (folder / name).unlink()
    present = set(_local_files(folder))
    for rel in sorted(files):
        if rel not in present:
            raise HubError(f"{label}: {rel} is listed in {CHECKSUMS_NAME} but missing (an interrupted push, or the "
                           f"file was deleted since); {again}")
        local = folder / rel
        size, digest = local.stat().st_size, sha256_file(local)
        if size != files[rel]["size"] or digest != files[rel]["sha256"]:
            raise HubError(f"{label}: {rel} does not match {CHECKSUMS_NAME} (sha256 {digest[:12]}..., {size} bytes; "
                           f"expected {files[rel]['sha256'][:12]}..., {files[rel]['size']} bytes): it was changed or "
                           f"corrupted after the push; {again}, or pull from a copy you trust")
    extra = sorted(present - set(files))
    if extra:
        raise HubError(f"{label}: {extra[0]} is not listed in {CHECKSUMS_NAME} (added after the push?); {again}, "
                       "which also removes stale files")


def check_adapter_folder(folder: str | os.PathLike, label: str | None = None):
    """`adapters.validate.check_adapter_folder` (the one pipeline-free check of an adapter folder, also
    run by `registry add` and `load_adapter`), its refusals as HubErrors naming `label`."""
    from ..adapters.errors import AdapterError
    from ..adapters.validate import check_adapter_folder as check

    try:
        return check(folder, label=label, skip=_NOT_PUSHED + (CHECKSUMS_NAME,))
    except AdapterError as e:
        raise HubError(str(e)) from None


def _check_on_backbone(folder: Path, backbone, label: str) -> None:
    """Apply the adapter to `backbone` (a name for prompt_cdm.backbone.load, or a pipeline) with the strict
    load_adapter, then take it off again."""
    from ..adapters.errors import AdapterError
    from ..adapters.store import load_adapter

    if isinstance(backbone, (str, os.PathLike)):
        from ..backbone.loading import BackboneError, load

        name = str(backbone)
        try:
            pipe = load(name)
        except BackboneError as e:
            raise HubError(f"--backbone {name}: {e}") from None
    else:
        pipe, name = backbone, str(getattr(backbone, "backbone_name", None) or "the given pipeline")
    try:
        # a unique LoRA name: the check must not collide with an adapter the caller's pipeline already carries
        handle = load_adapter(folder, pipe, name=f"hubcheck-{uuid.uuid4().hex[:8]}")
    except AdapterError as e:
        raise HubError(f"{label} does not load on backbone {name}: {str(e).replace(str(folder), label)}") from None
    handle.remove()


# ---------------------------------------------------------------- hub client errors


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection errors of whichever HTTP stack huggingface_hub uses (httpx2 in 2.x, httpx in 1.x,
    requests in 0.x); only modules already imported can have raised."""
    out: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                         ("requests", "ConnectionError"), ("requests", "Timeout")):
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            out.append(cls)
    return tuple(out)


@contextmanager
def _hub_errors(action: str, repo_id: str, revision: str | None, endpoint: str | None) -> Iterator[None]:
    """Turn huggingface_hub's exceptions into one-line HubErrors that say what to do."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError)

    where = endpoint or constants.ENDPOINT
    offline = (f"cannot {action} {repo_id}: huggingface_hub's offline mode is on (HF_HUB_OFFLINE=1); unset "
               "HF_HUB_OFFLINE (and TRANSFORMERS_OFFLINE) to reach the hub")
    try:
        yield
    except HubError:
        raise
    except RevisionNotFoundError:
        raise HubError(f"{repo_id} has no revision {revision!r}; pass an existing branch, tag or commit with "
                       "--revision") from None
    except (RepositoryNotFoundError, GatedRepoError):
        raise HubError(f"cannot {action} {repo_id}: the repo does not exist, or it is private or gated and your "
                       "token cannot see it; check the id, and set HF_TOKEN or run `hf auth login`") from None
    except OfflineModeIsEnabled:
        raise HubError(offline) from None
    except LocalEntryNotFoundError as e:
        if isinstance(e.__cause__, OfflineModeIsEnabled):
            raise HubError(offline) from None
        raise HubError(f"cannot {action} {repo_id}: the hub at {where} did not answer ({e.__cause__ or e}); check "
                       "the network, or HF_ENDPOINT") from None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status == 401:
            raise HubError(f"cannot {action} {repo_id}: not logged in, or the token is invalid; set HF_TOKEN or run "
                           "`hf auth login`" + (" with a token that has write access" if action == "push to" else ""))\
                from None
        if status == 403:
            raise HubError(f"cannot {action} {repo_id}: your token has no permission for it; use a token with write "
                           "access to that owner (a user or an organization you belong to)") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HubError(f"cannot {action} {repo_id}: the hub at {where} answered {status} ({first})") from None
    except HFValidationError as e:
        raise HubError(f"{repo_id!r} is not a valid hub repo id ({e}); use owner/name") from None
    except _transport_errors() as e:
        raise HubError(f"cannot {action} {repo_id}: the connection to the hub at {where} failed "
                       f"({type(e).__name__}: {e}); check the network, or HF_ENDPOINT") from None


# ---------------------------------------------------------------- push


def _stage(folder: Path, stage: Path) -> None:
    for rel in _local_files(folder):
        (stage / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(folder / rel, stage / rel, follow_symlinks=False)


def push(folder: str | os.PathLike, dest: str, *, revision: str | None = None, private: bool | None = None,
         overwrite: bool = False, endpoint: str | None = None) -> str:
    """Validate the adapter folder and share it at `dest`; return where it went (a commit URL or a URL).

    Hub (`owner/name`): creates the repo if needed (`private=True` for an existing public repo is refused,
    not ignored as create_repo would), and the branch
    `revision` if it is not there; uploads one commit that also deletes files of an earlier push that
    the new folder lacks. A repo holding other files (no checksums.json) is refused. Hub history keeps
    earlier pushes, so no `overwrite` is needed. The token is huggingface_hub's own (HF_TOKEN or the
    saved login); `endpoint` defaults to HF_ENDPOINT.
    fsspec / folder: writes the files, checksums.json last. A location that already holds a pushed
    adapter is replaced only with `overwrite=True`; one holding other files is refused."""
    folder = Path(folder)
    loc = parse_location(dest)
    if not folder.is_dir():
        raise HubError(f"{folder} is not a folder; pass an adapter folder written by save_adapter")
    if not loc.is_hub:
        if revision is not None or private is not None:
            raise HubError(f"--revision and --private apply to hub repos; {dest} is a folder/URL (use another "
                           "folder for another version)")
        fs, root = _filesystem(loc.url)  # before any work: a missing backend fails fast
        root = root.rstrip("/")
        from fsspec.implementations.local import LocalFileSystem

        if isinstance(fs, LocalFileSystem):
            target, src = Path(root).resolve(), folder.resolve()
            if target == src or src in target.parents or target in src.parents:
                raise HubError(f"cannot push {folder} to {dest}: one lies inside the other; pick another destination")
    stage = Path(tempfile.mkdtemp(prefix="prompt-cdm-push-"))
    try:
        _stage(folder, stage)
        config = check_adapter_folder(stage, label=str(folder))  # the exact bytes that will be uploaded
        write_json(stage / CHECKSUMS_NAME, compute_checksums(stage))
        if loc.is_hub:
            return _hub_push(stage, loc.repo_id, config, revision, private, endpoint)
        _fs_push(stage, fs, root, loc.url, overwrite)
        return loc.url
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _refuse_foreign(label: str, remote: set[str]) -> None:
    if remote and CHECKSUMS_NAME not in remote:
        raise HubError(f"{label} already holds files ({sorted(remote)[0]}, ...) and no {CHECKSUMS_NAME}: it is not "
                       "an adapter pushed by prompt-cdm, and pushing would mix or delete them; push to a new "
                       "location")


def _hub_push(stage: Path, repo_id: str, config, revision: str | None, private: bool | None,
              endpoint: str | None) -> str:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    api = HfApi(endpoint=endpoint)
    files = _local_files(stage) + [CHECKSUMS_NAME]
    with _hub_errors("push to", repo_id, revision, endpoint):
        api.create_repo(repo_id, private=private, exist_ok=True)
        if private and not api.model_info(repo_id).private:  # create_repo ignores `private` for an existing repo
            raise HubError(f"hub repo {repo_id} exists and is public, so --private cannot apply; make it private "
                           "in its settings on the hub first, or push to a new repo")
        if revision not in (None, "main"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        remote = set(api.list_repo_files(repo_id, revision=revision)) - {_HUB_HOUSEKEEPING}
        _refuse_foreign(f"hub repo {repo_id}" + (f" (revision {revision})" if revision else ""), remote)
        operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(stage / rel)) for rel in files]
        operations += [CommitOperationDelete(path_in_repo=rel) for rel in sorted(remote - set(files))]
        info = api.create_commit(repo_id, operations, revision=revision,
                                 commit_message=f"prompt-cdm: {config.kind} adapter for source {config.source_id}")
    return str(info.commit_url)


def _fs_relpaths(fs, root: str) -> set[str]:
    """Files under `root` (relative POSIX paths); empty when `root` does not exist."""
    root = root.rstrip("/")
    if not fs.exists(root):
        return set()
    if fs.isfile(root):
        raise HubError(f"{root} is a file; push to / pull from a folder")
    out = set()
    for p in fs.find(root, withdirs=False):
        p = p.rstrip("/")
        if p.startswith(root + "/"):
            out.add(p[len(root) + 1:])
    return out


def _fs_push(stage: Path, fs, root: str, url: str, overwrite: bool) -> None:
    files = _local_files(stage)
    remote = _fs_relpaths(fs, root)
    _refuse_foreign(url, remote)
    if remote:
        if not overwrite:
            raise HubError(f"{url} already holds a pushed adapter; pass --overwrite (overwrite=True) to replace it, "
                           "or push to another folder")
        fs.rm_file(posixpath.join(root, CHECKSUMS_NAME))  # first: a reader now sees an unfinished push, never a mix
        for rel in sorted(remote - set(files) - {CHECKSUMS_NAME}):
            fs.rm_file(posixpath.join(root, rel))
    fs.makedirs(root, exist_ok=True)
    for rel in files + [CHECKSUMS_NAME]:  # checksums.json last: its presence marks a complete push
        parent = posixpath.dirname(posixpath.join(root, rel))
        fs.makedirs(parent, exist_ok=True)
        fs.put_file(str(stage / rel), posixpath.join(root, rel))


# ---------------------------------------------------------------- pull


def pull(src: str, into: str | os.PathLike, *, revision: str | None = None, backbone: Any = None,
         overwrite: bool = False, endpoint: str | None = None) -> Path:
    """Download the adapter at `src` to the folder `into`, verified; return `into`.

    Downloads into a temp folder beside `into`, checks checksums.json (every file, nothing extra),
    validates the folder (check_adapter_folder) and, with `backbone` (a name for prompt_cdm.backbone.load,
    or a loaded pipeline), applies it with the strict load_adapter and removes it again -- then renames
    the folder into place. `into` must not exist or be empty, unless `overwrite=True`. Any failure leaves
    `into` as it was. `revision` (hub only): a branch, tag or commit."""
    loc = parse_location(src)
    into = Path(into)
    if not loc.is_hub and revision is not None:
        raise HubError(f"--revision applies to hub repos; {src} is a folder/URL")
    if into.exists() and (not into.is_dir() or (any(into.iterdir()) and not overwrite)):
        raise HubError(f"{into} exists and is not an empty folder; pass --overwrite (overwrite=True) to replace it")
    label = f"{src}" + (f" (revision {revision})" if revision else "")
    try:  # before any download: a parent that is a file or cannot be written
        into.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{into.name}.", suffix=".pull", dir=into.parent))
    except OSError as e:
        raise HubError(f"cannot create {into}: {e.strerror or e} ({e.filename or into.parent}); pass --into a "
                       "folder you can write") from None
    try:
        if loc.is_hub:
            _hub_download(loc.repo_id, tmp, revision, endpoint)
            verify_checksums(tmp, label, ignore=(_HUB_HOUSEKEEPING,))
        else:
            _fs_download(loc.url, tmp)
            verify_checksums(tmp, label)
        check_adapter_folder(tmp, label=label)
        if backbone is not None:
            _check_on_backbone(tmp, backbone, label)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700
        replace_dir(tmp, into)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return into


def _hub_download(repo_id: str, tmp: Path, revision: str | None, endpoint: str | None) -> None:
    from huggingface_hub import snapshot_download

    with _hub_errors("pull from", repo_id, revision, endpoint):
        # tmp is new and empty, so snapshot_download cannot fall back to "whatever is already in local_dir"
        snapshot_download(repo_id, revision=revision, local_dir=tmp, endpoint=endpoint)
    shutil.rmtree(tmp / ".cache" / "huggingface", ignore_errors=True)  # local_dir bookkeeping, not adapter content
    if (tmp / ".cache").is_dir() and not any((tmp / ".cache").iterdir()):
        (tmp / ".cache").rmdir()


def _fs_download(url: str, tmp: Path) -> None:
    fs, root = _filesystem(url)
    root = root.rstrip("/")
    files = _fs_relpaths(fs, root)
    if not files:
        raise HubError(f"{url} does not exist or is empty; check the location (push an adapter there with "
                       "`prompt-cdm hub push`)")
    for rel in sorted(files):
        if not _safe_relpath(rel):
            raise HubError(f"{url}: unexpected file name {rel!r}; push the adapter folder again")
        info = fs.info(posixpath.join(root, rel))
        if info.get("islink") or info.get("type") not in (None, "file"):
            raise HubError(f"{url}: {rel} is a link or not a regular file; prompt-cdm pulls regular files only")
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(posixpath.join(root, rel), str(tmp / rel))

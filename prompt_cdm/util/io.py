"""Small file helpers shared by every writer: atomic writes (temp file in the same folder + rename)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# Files that unpickle (or, for numpy arrays, may) when loaded: prompt_cdm refuses them wherever it reads
# weights or data (adapter folders, hub uploads and downloads, backbone folders, source folders)
PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".bin", ".ckpt", ".joblib", ".npy", ".npz")


def is_pickle_name(name) -> bool:
    """Whether a file name carries one of PICKLE_SUFFIXES (case-insensitive)."""
    return os.path.splitext(str(name))[1].lower() in PICKLE_SUFFIXES


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj, indent: int | None = 2) -> None:
    write_text(path, json.dumps(obj, indent=indent) + "\n")


def write_jsonl(path: str | os.PathLike, rows) -> None:
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def image_format(path: str | os.PathLike) -> str | None:
    """The PIL format that saves `path` (by its suffix, e.g. .png -> PNG, .jpg -> JPEG); None if none does."""
    from PIL import Image

    Image.init()
    fmt = Image.registered_extensions().get(Path(path).suffix.lower())
    return fmt if fmt in Image.SAVE else None


def check_writable_file(path: str | os.PathLike, what: str, error: type[Exception]) -> Path:
    """`error` unless a file can be written at `path`: not a folder, its parent a folder (made if missing)
    that accepts a new file. Run before the work whose result goes there."""
    path = Path(path)
    if path.is_dir():
        raise error(f"{what} {path} is a folder; give a file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as e:
        raise error(f"{what} {path} cannot be written ({e.strerror or e}); pick a path in a folder you can "
                    "write") from None
    return path


def save_image(path: str | os.PathLike, image) -> None:
    """Save a PIL image atomically (format from the final suffix; PNG when it has none)."""
    path = Path(path)
    fmt = image_format(path) if path.suffix else "PNG"
    if fmt is None:
        raise ValueError(f"{path}: unknown image extension {path.suffix!r}; use .png, .jpg or .webp")
    with atomic_path(path) as tmp:
        image.save(tmp, format=fmt)


def save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def replace_dir(tmp: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Put the finished folder `tmp` at `dest` by renames (an existing `dest` is moved aside, then deleted)."""
    tmp, dest = Path(tmp), Path(dest)
    old = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
        try:
            os.replace(dest, old)  # onto an empty folder: allowed
        except BaseException:
            os.rmdir(old)
            raise
    try:
        os.replace(tmp, dest)
    except BaseException:
        if old is not None:
            os.replace(old, dest)  # put the previous folder back: no stray .old, dest as it was
        raise
    fsync_path(dest.parent)
    if old is not None:
        shutil.rmtree(old)
    return dest


def loads_json(text: str | bytes, error: type[Exception], label: str, fix: str = ""):
    """Parsed JSON `text`; text that is not UTF-8 JSON, or nested too deeply for the parser (a planted
    file of 100k brackets), raises `error` naming `label` (and `fix`)."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{label} is not valid JSON ({e})" + (f"; {fix}" if fix else "")) from None
    except RecursionError:
        raise error(f"{label} is nested too deeply to be a prompt_cdm file" + (f"; {fix}" if fix else "")) from None


def read_json(path: str | os.PathLike, error: type[Exception], fix: str = ""):
    """The parsed JSON file at `path`; text that is not UTF-8 JSON raises `error` naming the file (and `fix`)."""
    try:
        data = Path(path).read_bytes()
    except IsADirectoryError:
        raise error(f"{path} is a folder, not a JSON file" + (f"; {fix}" if fix else "")) from None
    return loads_json(data, error, str(path), fix)


# ---------------------------------------------------------------- folders copied in whole


def tree_files(folder: str | os.PathLike, error: type[Exception], label: str | None = None) -> list[str]:
    """Relative POSIX paths of the regular files under `folder`; `error` on a symlink or a special file
    anywhere inside (a link could smuggle /etc/passwd, or another source's weights, into a copy)."""
    folder = Path(folder)
    label = label or str(folder)
    out = []
    for root, dirs, files in os.walk(folder):
        for name in sorted(dirs) + sorted(files):
            p = Path(root) / name
            rel = p.relative_to(folder).as_posix()
            if p.is_symlink():
                raise error(f"{label}/{rel} is a symbolic link; prompt_cdm copies regular files only -- replace "
                            "it with the file itself")
            if name in files:
                if not p.is_file():
                    raise error(f"{label}/{rel} is not a regular file; remove it")
                out.append(rel)
        dirs.sort()
    return sorted(out)


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or a folder's entry to disk (a rename is durable only once its folder is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_tree(src: str | os.PathLike, dst: str | os.PathLike, error: type[Exception]) -> dict[str, str]:
    """Copy the regular files of `src` into the (new or empty) folder `dst`, refusing links (`tree_files`);
    every file and folder is fsynced. Returns {relative path: sha256} of what was copied."""
    src, dst = Path(src), Path(dst)
    hashes = {}
    for rel in tree_files(src, error):
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, target, follow_symlinks=False)
        fsync_path(target)
        hashes[rel] = sha256_file(target)
    for d in sorted({(dst / rel).parent for rel in hashes} | {dst}, key=lambda p: -len(p.parts)):
        fsync_path(d)
    return hashes


def tree_hashes(folder: str | os.PathLike, error: type[Exception]) -> dict[str, str]:
    """{relative path: sha256} of every regular file under `folder` (links refused)."""
    folder = Path(folder)
    return {rel: sha256_file(folder / rel) for rel in tree_files(folder, error)}

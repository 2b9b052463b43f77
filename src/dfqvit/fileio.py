"""Atomic writes: a result is either complete on disk or absent, never half-written."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from .errors import UserError


def _default_mode(directory: bool) -> int:
    """The permissions a plain open()/mkdir() would give under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def refuse_existing(path, force: bool, directory: bool = False) -> Path:
    """Stop before any work when an output cannot be written: it would overwrite something
    without ``--force``, it is a file where a directory goes (or the reverse), or its
    directory cannot be created or written to (probed by creating a file there)."""
    path = Path(path)
    if path.exists() and not force:
        raise UserError(f"{path} already exists; choose another --out or pass --force to replace it")
    if path.exists() and path.is_dir() != directory:
        raise UserError(f"{path} exists and is {'not ' if directory else ''}a directory; "
                        f"--out must name {'a directory' if directory else 'a file'} here")
    check_writable(path)
    return path


def check_writable(path) -> None:
    """Probe that ``path`` can be created: its nearest existing ancestor is a directory we can write."""
    path = Path(os.path.abspath(path))
    if len(path.name.encode()) > 255:
        raise UserError(f"cannot write {path}: the file name is longer than 255 bytes")
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"cannot write {path}: {ancestor} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".dfqvit-probe.", dir=ancestor)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write {path}: {ancestor} is not writable ({e.strerror}); "
                        "choose another --out") from None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _default_mode(directory=False))  # writers may have recreated the file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, force: bool = False):
    """Yield a temporary directory that becomes ``path`` when the block succeeds.

    An existing ``path`` is refused unless ``force``; then it is replaced only at the end.
    """
    path = refuse_existing(path, force, directory=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    os.chmod(tmp, _default_mode(directory=True))
    try:
        yield tmp
        for child in tmp.rglob("*"):      # writers such as safetensors create their files 0600
            if child.is_file():
                os.chmod(child, _default_mode(directory=False))
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)

"""Writing an adapter folder's files as one unit: after a crash at any point it reads as the old or the new save.

A folder's ``adapter_config.json`` and weights file only make sense together (new
weights with an old ``lora_alpha`` load without error and give wrong outputs), and
no file system renames two files at once. So a save

1. takes the folder's lock (``flock`` on the directory, POSIX only) and finishes or
   clears whatever an earlier, interrupted save left behind;
2. writes every new file under a staged name (``.peftcore-staged-<token>-<name>``),
   created with mode 0666 minus the umask, and fsyncs it;
3. **commits** by renaming a record of the staged names into place
   (``.peftcore-commit.json``, itself written to a temporary name first);
4. renames each staged file over its final name, deletes the files the save
   replaces (the other weights format), and removes the record.

Before step 3 the folder holds the old files (plus garbage the next save removes);
from step 3 on, readers (:func:`peftcore.files.committed_file`, used by every
load) take each file from its staged name while it is still there, so the folder
reads as the complete new save; the next save completes step 4 first. Reading
never writes. Every file operation here goes through ``os`` so that tests can make
any of them fail (``tests/test_atomic_saves.py``).
"""

from __future__ import annotations

import json
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from peftcore.files import (
    COMMIT_FORMAT,
    COMMIT_RECORD_NAME,
    CONFIG_NAME,
    PICKLE_WEIGHTS_NAME,
    SAFETENSORS_WEIGHTS_NAME,
    STAGED_PREFIX,
    read_commit_record,
)

Writer = Callable[[str], None]  # writes a file's whole content to the path it is given (which exists, empty)

# Temporary files an interrupted save may leave: this module's, and those of peftcore releases that
# wrote each file through a ``.<name>.<random>.tmp`` beside it.
_OLD_TEMP_PREFIXES = tuple(f".{name}." for name in (CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, PICKLE_WEIGHTS_NAME))
_RECORD_TEMP_PREFIX = ".peftcore-commit-"


def write_files(folder: str | os.PathLike, writers: dict[str, Writer], remove: tuple[str, ...] = ()) -> None:
    """Replace the files named in ``writers`` (and delete those in ``remove``) in ``folder``, all or none."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with _folder_lock(folder):
        _finish_interrupted_save(folder)
        token = secrets.token_hex(8)
        record = {"format": COMMIT_FORMAT, "token": token, "files": {},
                  "remove": [n for n in remove if n not in writers]}
        try:
            for name, write in writers.items():
                staged = folder / f"{STAGED_PREFIX}{token}-{name}"
                mode = _create_empty(staged)
                record["files"][name] = staged.name
                write(str(staged))
                _keep_mode(staged, mode)
                _fsync_path(staged)
            _fsync_path(folder)
            commit = json.dumps(record).encode()
            _write_bytes_atomic(folder, COMMIT_RECORD_NAME, commit, f"{_RECORD_TEMP_PREFIX}{token}")  # the commit
        except BaseException:
            for staged_name in record["files"].values():  # best effort: the next save clears what is left
                _remove_quietly(folder / staged_name)
            raise
        _apply(folder, record)


def text_writer(text: str) -> Writer:
    return lambda path: _write_bytes(path, text.encode("utf-8"))


def write_text(folder: str | os.PathLike, name: str, text: str) -> None:
    """``write_files`` for one text file (UTF-8)."""
    write_files(folder, {name: text_writer(text)})


def adapter_subfolder(save_directory: str | os.PathLike, adapter_name: str) -> Path:
    """Where ``save_pretrained`` writes an adapter: the folder itself (``default``), or a sub-folder inside it.

    Names cannot hold separators (peftcore.adapter_names), but a sub-folder may be a
    link: the check is made on the resolved paths, before anything is written.
    """
    root = Path(save_directory).resolve()
    if adapter_name == "default":
        return root
    folder = (root / adapter_name).resolve()
    if folder == root or root not in folder.parents:
        raise ValueError(
            f"save_pretrained: adapter {adapter_name!r} would be written to {folder}, outside {root} "
            f"({root / adapter_name} is a link); remove the link or save elsewhere"
        )
    return folder


def _apply(folder: Path, record: dict) -> None:
    """Step 4: move the committed files into place; safe to run again after a crash in the middle."""
    for name, staged_name in record["files"].items():
        staged = folder / staged_name
        if staged.is_file():
            os.replace(staged, folder / name)
    for name in record["remove"]:
        _remove_if_present(folder / name)
    _fsync_path(folder)
    os.unlink(folder / COMMIT_RECORD_NAME)
    _fsync_path(folder)


def _finish_interrupted_save(folder: Path) -> None:
    """Complete a committed save (its record exists), then delete every temporary file a save leaves."""
    try:
        record = read_commit_record(folder)
    except ValueError:  # a damaged record cannot be applied; this save replaces the folder's files anyway
        record = None
        _remove_if_present(folder / COMMIT_RECORD_NAME)
    if record is not None:
        _apply(folder, record)
    for entry in os.scandir(folder):
        name = entry.name
        leftover = name.startswith((STAGED_PREFIX, _RECORD_TEMP_PREFIX)) or (
            name.startswith(_OLD_TEMP_PREFIXES) and name.endswith(".tmp")
        )
        if leftover and entry.is_file(follow_symlinks=False):
            os.unlink(entry.path)


@contextmanager
def _folder_lock(folder: Path):
    """Exclusive while a save runs, so one save never deletes another's staged files; freed if the process dies."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock; concurrent saves into one folder are not supported there
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _create_empty(path: Path) -> int:
    """Create ``path`` new and empty, with mode 0666 minus the umask (as ``open(path, "w")`` would); its mode."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        return os.fstat(fd).st_mode & 0o777
    finally:
        os.close(fd)


def _keep_mode(path: Path, mode: int) -> None:
    """Writers that replace the file they are given (safetensors writes a private 0600 file and renames it
    over) lose the umask's mode: put it back."""
    if os.stat(path).st_mode & 0o777 != mode:
        os.chmod(path, mode)


def _write_bytes(path: str | os.PathLike, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def _write_bytes_atomic(folder: Path, name: str, data: bytes, temp_name: str) -> None:
    temp = folder / temp_name
    _create_empty(temp)  # the record keeps the umask's mode: it is written in place
    try:
        _write_bytes(temp, data)
        _fsync_path(temp)
        os.replace(temp, folder / name)
    except BaseException:
        _remove_quietly(temp)
        raise
    _fsync_path(folder)


def _fsync_path(path: Path) -> None:
    """Flush a file's data, or a folder's entries (renames), to disk; file systems without it are skipped."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # e.g. directories on some file systems
        pass
    finally:
        os.close(fd)


def _remove_if_present(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _remove_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass

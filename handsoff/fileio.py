"""Crash-safe file writing: write under a temporary name in the same folder, then rename."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

from handsoff.errors import DataError, FolderLocked, MissingInputError, OutputError


def atomic_save(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp_path)``, then rename onto ``path``, so a killed run never leaves a half-written file.

    The temporary name keeps ``path``'s suffix, since some writers (``np.save``, PIL) act on it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    write(tmp)
    os.replace(tmp, path)
    return path


def atomic_folder(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp_dir)`` on a new hidden folder beside ``path``, then put it in place of ``path`` (the old
    folder, if any, is removed after the swap), so readers see either the old or the new folder whole."""
    import shutil
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should get the usual permissions
    try:
        write(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_save(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    """``obj`` as indented JSON with a final newline, written atomically."""
    import json

    return atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())


def _kind(config: dict) -> str:
    """What a model folder's config.json describes: its "format", or its top-level model key."""
    return config.get("format") or next((k for k in ("encoder", "probe") if k in config), "unknown")


def check_model_folder(out_dir: str | os.PathLike, kind: str) -> None:
    """Raise OutputError (a FileExistsError) unless ``out_dir`` is new or already a model folder of ``kind`` (e.g.
    "handsoff-label-generator"): a retrained model may replace its own kind, nothing else is ever overwritten
    (a generator folder given as a label generator's output, say). Call it before any work."""
    import json

    existing = Path(out_dir) / "config.json"
    if not existing.exists():
        return
    try:
        old = json.loads(existing.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        old = None
    if not isinstance(old, dict) or _kind(old) != kind:
        what = _kind(old) if isinstance(old, dict) else "not a handsoff model folder"
        raise OutputError(f"{out_dir}: holds another kind of folder ({what}), not a {kind}; handsoff will not "
                          "overwrite it, choose another output folder")


def require_same_run(state_path: str | os.PathLike, saved: dict, current: dict, what: str) -> None:
    """Raise OutputError when the unfinished ``what`` (fit, training, ...) whose resumable state is ``state_path``
    was started with other inputs or settings than ``current``; the message lists the keys that differ."""
    changed = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
    if changed:
        state_path = Path(state_path)
        raise OutputError(f"{state_path}: this {what} was started with other {', '.join(changed)}; "
                          f"rerun with the same inputs and settings to resume, or delete {state_path.parent} (or "
                          "choose another --out) to start fresh")


def save_weights_folder(out_dir: str | os.PathLike, state_dict: dict, config: dict) -> Path:
    """A model folder: ``model.safetensors`` (the state dict, on CPU) and ``config.json``, each written atomically."""
    import json

    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    check_model_folder(out_dir, _kind(config))
    state = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    atomic_save(out_dir / "model.safetensors", lambda tmp: save_file(state, tmp))
    atomic_save(out_dir / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
    return out_dir


def read_weights_folder(path: str | os.PathLike, what: str) -> tuple[dict, dict]:
    """(config, state dict) of a folder written by ``save_weights_folder``; ``what`` names the folder's kind in
    the error for a missing file (e.g. "an encoder folder (train one with `handsoff train-encoder`)")."""
    import json

    import torch
    from safetensors.torch import load_file

    path = Path(path)
    for name in ("config.json", "model.safetensors"):
        if not (path / name).is_file():
            raise MissingInputError(f"{path / name}: missing; not {what}")
    try:
        config = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path / 'config.json'}: not valid JSON ({e}); not {what}") from None
    if not isinstance(config, dict):
        raise DataError(f"{path / 'config.json'}: expected a JSON object, got {type(config).__name__}; not {what}")
    try:
        state = load_file(path / "model.safetensors")
    except Exception as e:  # safetensors raises its own error type for truncated or corrupt files
        raise DataError(f"{path / 'model.safetensors'}: cannot read ({type(e).__name__}: {e}); the file is "
                        "truncated or corrupt, write it again") from None
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise DataError(f"{path / 'model.safetensors'}: weights {', '.join(bad[:3])} hold NaN or infinite values; "
                        "the model is unusable, train it again")
    return config, state


_HELD: dict[Path, list] = {}  # lock file -> [open handle, nesting depth] of the locks this process holds


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike):
    """Hold an exclusive lock on writing ``folder`` (a hidden ``.NAME.lock`` file beside it) for the ``with`` block,
    or raise FolderLocked at once if another process holds it. Re-entrant within a process (a command and the
    stage it runs may both take it). The kernel releases the lock when the process ends, killed or not, so a
    crashed run never blocks the next one."""
    import fcntl

    folder = Path(folder).resolve()
    key = folder.with_name(f".{folder.name}.lock")
    if key in _HELD:
        _HELD[key][1] += 1
    else:
        folder.parent.mkdir(parents=True, exist_ok=True)
        handle = open(key, "a+")  # noqa: SIM115 - held until the block ends
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise FolderLocked(f"{folder}: another handsoff process is writing this folder; wait for it to finish "
                               "or choose another output") from None
        _HELD[key] = [handle, 1]
    try:
        yield
    finally:
        _HELD[key][1] -= 1
        if _HELD[key][1] == 0:
            _HELD.pop(key)[0].close()  # closing releases the lock


def fingerprint(*state_dicts) -> str:
    """A short SHA-256 of tensors (names, shapes, dtypes and values): what identifies the networks a run used."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    for state in state_dicts:
        for name, tensor in sorted(state.items()):
            t = tensor.detach().cpu().contiguous()
            digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


def visible_files(folder: Path) -> list[Path]:
    """The files under ``folder``, sorted, except hidden ones (a name starting with "." anywhere below ``folder``):
    a writer's temporary ".NAME.png.tmp.png" (``atomic_save``: half-written if its writer was killed, or still being
    written beside a reader), lock files, macOS's "._NAME", folders such as ".progress/"."""
    return sorted(p for p in folder.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def folder_fingerprint(folder: str | os.PathLike) -> str:
    """A short SHA-256 of every file under ``folder`` (relative names and bytes; hidden files skipped,
    ``visible_files``): what identifies a dataset a run used."""
    import hashlib

    folder = Path(folder)
    digest = hashlib.sha256()
    for path in visible_files(folder):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]

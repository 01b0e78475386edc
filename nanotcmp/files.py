"""
The defences every script shares, each written once: files written whole or not at all (and what
killed runs left of them), a dataset folder built aside and swapped in whole, worker processes that
leave Ctrl-C to their parent and end with it, and errors as one line that names the path at fault
and what to do.
"""
import argparse
import contextlib
import errno
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor

from safetensors import SafetensorError

from nanotcmp.processes import print0


class DataError(ValueError):
    """A file or folder that is missing, damaged, unfitting or cannot be written; the message is one
    line that names it and what to do."""


@contextlib.contextmanager
def one_line_errors(script, interrupted, errors=()):
    """A script's body: a DataError (or one of errors) stops it with one line, Ctrl-C with the line
    interrupted() returns (what is kept) and exit code 130. A reader of its output that goes away
    (script | head) stops it quietly, as it stops cat: exit code 141, SIGPIPE's."""
    try:
        yield
        if sys.stdout is not None:
            sys.stdout.flush()  # here, where a closed pipe is still caught, not at exit
    except (DataError, *errors) as e:
        raise SystemExit(f"{script}: {e}") from None
    except KeyboardInterrupt:
        print0(f"{script}: {interrupted()}", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (Python flushes stdout on exit)
        raise SystemExit(141) from None


def given_path(text):
    """An argparse type: a path option's value, which must not be empty (--init "$RUN" with RUN unset
    would otherwise mean no --init at all); argparse names the option in its error"""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path: give a file or folder (is a shell variable unset?)")
    return text

# -----------------------------------------------------------------------------
# errors as one line


def file_in_the_way(path):
    """The file that stands where path, or a folder above it, should be a folder (None if none)"""
    up = os.path.abspath(path)
    while not os.path.exists(up):
        up = os.path.dirname(up)
    return None if os.path.isdir(up) else up


def cannot_read(e):
    """An OSError reading an input -> what went wrong, naming the path"""
    if e.errno == errno.ENOENT:
        return f"{e.filename} not found"
    why = {errno.EISDIR: "it is a folder, not a file", errno.EACCES: "permission denied",
           errno.ENOTDIR: f"{file_in_the_way(e.filename)} is a file, not a folder"}.get(e.errno, e.strerror)
    return f"cannot read {e.filename}: {why}"


def cannot_write(path, e, remedy="choose another --out"):
    """An error writing path -> a DataError of one line: what went wrong and, with remedy, what to do"""
    code = getattr(e, "errno", None)
    why = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is used up",
           errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
           errno.EPERM: "permission denied", errno.ENOTDIR: f"{file_in_the_way(path)} is a file, not a folder",
           errno.EEXIST: f"{file_in_the_way(path)} is a file, not a folder"}.get(code)
    if why is None:
        why = getattr(e, "strerror", None) or str(e).strip().splitlines()[0]
    if remedy and code is None:  # torch.save's own errors (a RuntimeError) say nothing of the disk: ask
        remedy = "is the disk full or read-only? " + remedy
    elif remedy and code in (errno.ENOSPC, errno.EDQUOT):
        remedy = "free some space or " + remedy
    elif remedy and code in (errno.EACCES, errno.EPERM):
        remedy = remedy.replace("another", "a folder you may write to as")
    return DataError(f"cannot write {path}: {why}" + (f"; {remedy}" if remedy else ""))

# -----------------------------------------------------------------------------
# files written whole or not at all


def pid_alive(pid):
    """Is a process of this id running (on this machine)?"""
    if os.name == "nt":
        return True  # there, os.kill(pid, 0) would end it
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # another user's
        return True
    return True


def make_folder(path, remedy="choose another --out"):
    """os.makedirs(path, exist_ok=True), or a one-line DataError naming the path (see cannot_write)"""
    try:
        os.makedirs(path, exist_ok=True)
    except (OSError, ValueError) as e:
        if isinstance(e, FileExistsError) or os.path.isfile(path):
            e = OSError(errno.ENOTDIR, "a file of that name exists")
        raise cannot_write(path, e, remedy) from None


def write_atomic(path, write, remedy="choose another --out"):
    """write(a temporary path), then rename it to path: a killed run never leaves a half-written file
    (the next run removes what it left: clean_leftovers), and runs writing the same file (a shared
    feature cache) never write into each other's. An error writing, a full disk say, is a DataError
    (see cannot_write)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        write(tmp)
        open_mode(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        writing = isinstance(e, (OSError, SafetensorError)) or (  # torch.save fails with a RuntimeError
            isinstance(e, RuntimeError) and ("inline_container" in str(e) or "writ" in str(e).lower()))
        if writing:  # (an out-of-memory RuntimeError, say, is not one)
            raise cannot_write(path, e, remedy) from None
        raise


UMASK = os.umask(0o22)  # read once, at import (os.umask both sets and returns it)
os.umask(UMASK)


def open_mode(path):
    """Give a file written by a library the mode open() gives a new file (0o666 less the umask):
    safetensors writes a private one (mode 600), which a teammate given the folder could not read"""
    with contextlib.suppress(OSError):  # (a file system without modes)
        os.chmod(path, 0o666 & ~UMASK)


def clean_leftovers(folder):
    """Remove the <file>.<pid>.tmp files of write_atomic that a killed run left in folder (of a
    process no longer running) -> their names, said in a line"""
    gone = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        m = re.fullmatch(r".+\.(?:safetensors|json|pt)\.([0-9]{1,9})\.tmp", name)  # the files runs write
        if m and not pid_alive(int(m[1])):
            with contextlib.suppress(FileNotFoundError):  # (another run cleaning the same folder)
                os.remove(os.path.join(folder, name))
            gone.append(name)
    if gone:
        print(f"removed what a killed run left in {folder}: {', '.join(gone)}")
    return gone


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_text(path, text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    write_atomic(path, write)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=1))


def read_json(path, keys, made_by):
    """A JSON object that must hold keys -> it, or a DataError naming the file and what is wrong;
    made_by: what its folder should be, for the message"""
    folder = os.path.dirname(path) or "."
    if not os.path.isfile(path):
        raise DataError(f"{path} not found: is {folder} {made_by}?")
    try:
        with open(path) as f:
            obj = json.load(f)
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    missing = [k for k in keys if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise DataError(f"{path}: no {', '.join(missing)}: is {folder} {made_by}?")
    return obj

# -----------------------------------------------------------------------------
# a folder built aside and swapped in whole (prepare.py's datasets)


def staged(out, kind):
    """This process's folder beside out: "tmp", the one being built, or "old", the one it replaces"""
    return f"{out}.{kind}-{os.getpid()}"


@contextlib.contextmanager
def staging(out):
    """Build a folder in a temporary one beside out (a real path, no link), then swap it in: a
    stopped run never leaves half a folder, and the old one stays until the new one is complete. A
    run killed outright leaves its folder, out.tmp-PID, for the next run to remove (remove_staged)."""
    tmp, old = staged(out, "tmp"), staged(out, "old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        yield tmp
        had = os.path.exists(out)
        if had:
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            if had:
                os.replace(old, out)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def remove_staged(out, ours, script):
    """Remove what staging runs killed outright (kill -9, a power cut) left beside out: out.tmp-PID,
    half a folder, and out.old-PID, the folder a run killed mid-swap was replacing (put back when out
    is gone). Only folders whose every name matches ours (a regex), of processes no longer running (one
    of this process's id is an earlier process's: this one has not staged anything yet)."""
    parent, name = os.path.split(out)
    for entry in sorted(os.listdir(parent)) if os.path.isdir(parent) else []:
        m = re.fullmatch(re.escape(name) + r"\.(tmp|old)-(\d+)", entry)
        path = os.path.join(parent, entry)
        running = m and int(m[2]) != os.getpid() and pid_alive(int(m[2]))
        if not m or running or os.path.islink(path) or not os.path.isdir(path) or \
                not all(ours.fullmatch(f) for f in os.listdir(path)):
            continue
        if m[1] == "old" and not os.path.exists(out):
            os.replace(path, out)
            print(f"{script}: put {path} back as {out}: a run (process {m[2]}) was killed while replacing it")
        else:
            shutil.rmtree(path)
            print(f"{script}: removed {path}, left by a run (process {m[2]}) that was killed")


def writes_out(e, out):
    """Whether the OSError e came writing out: out itself, its staging folders, or a folder above it"""
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) or not e.filename:
        return True
    real = os.path.realpath(e.filename)
    return real == out or real.startswith((out + os.sep, out + ".tmp-", out + ".old-")) or \
        out.startswith(real.rstrip(os.sep) + os.sep) and not os.path.exists(real)  # os.makedirs making it


def staged_path(path, out, shown):
    """A path in out's staging folder -> the path it will have, under out as the user gave it (shown)"""
    if path is None:
        return shown
    real, tmp = os.path.realpath(path), staged(out, "tmp")
    if real == tmp:
        return shown
    return os.path.join(shown, os.path.relpath(real, tmp)) if real.startswith(tmp + os.sep) else path

# -----------------------------------------------------------------------------
# worker processes


class Serial:
    """A pool's map, in this process (one worker)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def map(self, fn, *iterables, chunksize=1):
        return map(fn, *iterables)


class Workers(ProcessPoolExecutor):
    """Worker processes, spawned, not forked: torch (used by resampling) does not survive a fork.
    Ctrl-C, which the terminal sends them too, is this process's to handle: stopping early, it drops
    the work still to do, and they end once their current chunk is done (killed, one could leave the
    pool waiting forever for a result cut in half). Each ends itself if this process dies (killed
    with -9, say)."""

    def __init__(self, workers):
        super().__init__(workers, mp_context=multiprocessing.get_context("spawn"), initializer=exit_with,
                         initargs=(os.getpid(),))

    def map(self, *args, **kwargs):
        # map starts the workers: started while this process ignores Ctrl-C, they ignore it from birth
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            return super().map(*args, **kwargs)
        finally:
            signal.signal(signal.SIGINT, previous)

    def __exit__(self, kind, *exc):
        self.shutdown(wait=True, cancel_futures=kind is not None)
        return False


def exit_with(parent):
    """A worker's thread ends it once its parent has died (an orphan is adopted: its parent changes)"""
    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def worker_pool(workers):
    return Workers(workers) if workers > 1 else Serial()

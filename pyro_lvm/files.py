"""Reading and writing files without following planted links, and never leaving a file half written.

A run directory can come from someone else (a shared folder, a colleague's archive), so every file
pyro-lvm opens inside one is opened with ``O_NOFOLLOW`` and checked with ``fstat`` to be a regular
file with one name: a symbolic link planted as ``RUN/.lock`` or ``RUN/evaluations.jsonl`` is refused
instead of written through, a FIFO is refused instead of blocking, a directory instead of crashing.
New files are created with ``O_CREAT | O_EXCL``.

Every output is written atomically: to a fresh temporary file in the same folder (``mkstemp``, which
uses ``O_EXCL``), flushed, fsynced and renamed over the target, so a reader (or a crash, or a full
disk) sees either the old file or the whole new one. ``os.replace`` replaces a link itself, never its
target, and a link or non-regular file in the target's place is refused before that.

Every refusal is a :class:`~pyro_lvm.errors.UserError` naming the path, what it is, and the fix.
"""

import contextlib
import errno
import json
import os
import stat
import tempfile
from pathlib import Path

from .errors import UserError

#: Configuration files are small; a bigger one is damaged or not a configuration.
MAX_JSON_BYTES = 16 * 2 ** 20

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISREG, "a regular file"))


def kind_of_mode(mode):
    """``"a directory"``, ``"a FIFO (named pipe)"``, ... for an ``st_mode``."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def kind(path, follow=False):
    """What ``path`` is, in words (``"a symbolic link"``, ``"a directory"``, ...); ``None`` if nothing
    is there. With ``follow``, a link is described by its target (``"a dangling symbolic link"``)."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as err:  # a name over 255 bytes, a loop of links, no permission on a folder
        raise _os_error(err, path, "choose another path") from None
    if follow and stat.S_ISLNK(mode):
        try:
            mode = os.stat(path).st_mode
        except OSError:
            return "a dangling symbolic link"
    return kind_of_mode(mode)


def _refuse(path, what, fix):
    raise UserError(f"{path} is {what}, not a regular file; {fix}")


def _os_error(err, path, fix):
    """A one-line :class:`UserError` for an ``OSError`` met while opening ``path``."""
    if err.errno == errno.ELOOP:
        return UserError(f"{path} is a symbolic link; pyro-lvm never follows links inside a run directory "
                         f"(one could make it write elsewhere): remove the link")
    if err.errno == errno.ENAMETOOLONG:
        return UserError(f"the path {str(path)[:80]}... is too long (a name over 255 bytes); choose a shorter name")
    if err.errno == errno.ENOTDIR:
        return UserError(f"{path}: a folder in that path is a regular file; choose another path")
    if err.errno in (errno.EACCES, errno.EPERM):
        return UserError(f"no permission to open {path}; fix its permissions or choose another path")
    if err.errno == errno.EISDIR:
        return UserError(f"{path} is a directory, not a regular file; {fix}")
    if err.errno == errno.ENOENT:
        return UserError(f"{path} does not exist; {fix}")
    return UserError(f"cannot open {path}: {err.strerror or err}; {fix}")


def open_regular(path, flags=os.O_RDONLY, mode=0o644, follow=False, fix="remove it or choose another path",
                 single_link=False):
    """``os.open`` of a regular file, refusing anything else with a :class:`UserError`.

    ``O_NONBLOCK`` keeps a FIFO from blocking the open; it is cleared again on the regular file.
    Without ``follow``, a symbolic link is refused (``O_NOFOLLOW``). ``single_link`` refuses a file
    with more than one hard link (writing to it would write to the other name too).
    """
    extra = os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags | extra, mode)
    except OSError as err:
        raise _os_error(err, path, fix) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            _refuse(path, kind_of_mode(info.st_mode), fix)
        if single_link and info.st_nlink > 1:
            raise UserError(f"{path} has {info.st_nlink} hard links (another name for the same file elsewhere); "
                            f"pyro-lvm writes only to files of its own: {fix}")
        import fcntl

        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_file(path, follow=False, fix="remove it or choose another path"):
    """A binary file object for reading a regular file (see :func:`open_regular`)."""
    return os.fdopen(open_regular(path, follow=follow, fix=fix), "rb")


def read_bytes(path, max_bytes, follow=False, fix="remove it or choose another path", what="file"):
    """The bytes of a regular file of at most ``max_bytes``."""
    with open_file(path, follow=follow, fix=fix) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise UserError(f"{path} is larger than {max_bytes // 2 ** 20} MiB, too large for a {what}; {fix}")
    return data


def parse_json(data, path, fix):
    """JSON from ``data`` (bytes), refusing non-UTF-8, malformed and absurdly nested documents."""
    try:
        return json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text (byte {err.start}); {fix}") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); {fix}") from None
    except RecursionError:
        raise UserError(f"{path} nests JSON too deeply to be a configuration; {fix}") from None


def read_json(path, follow=False, fix="restore it or refit", max_bytes=MAX_JSON_BYTES):
    return parse_json(read_bytes(path, max_bytes, follow=follow, fix=fix, what="JSON file"), path, fix)


def check_replaceable(path, fix="remove it or choose another path"):
    """Refuse to replace ``path`` if something other than a regular file (or nothing) is there."""
    what = kind(path)
    if what not in (None, "a regular file"):
        _refuse(path, what, fix)


def atomic_write_bytes(path, data, fix="remove it or choose another path"):
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one.

    The file gets the usual permissions (``0o666`` less the umask), not ``mkstemp``'s ``0o600``.
    """
    path = Path(path)
    check_replaceable(path, fix)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:200]}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        if err.errno in (errno.ENOENT, errno.ENOTDIR):
            raise UserError(f"folder {str(path.parent)!r} does not exist; create it or choose another path") from None
        if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise UserError(f"cannot write in {path.parent}: {err.strerror}; choose a place where you may write") from None
        raise
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path, obj, fix="remove it or choose another path"):
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode(), fix)


def fsync_dir(folder):
    """Make a rename in ``folder`` durable (best effort: some file systems refuse)."""
    with contextlib.suppress(OSError):
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def append_line(path, line, fix="remove it (pyro-lvm writes one JSON line there per record)"):
    """Append ``line`` (bytes ending in a newline) with a single ``write`` call to a regular file of
    one name, creating it if needed. A torn last line (a crash mid-append, or a full disk) is closed
    with a newline first, so the new record stays readable on its own."""
    fd = open_regular(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644, fix=fix, single_link=True)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        try:
            written = os.write(fd, line)
            if written != len(line):  # a full disk wrote part of it: take the part back, say so
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            os.fsync(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)

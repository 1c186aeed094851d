"""Output files for processors: confined directories, timestamped names, atomic writes and retention.

A processor writes only inside JOBS[setting] (BACKUP_DIR, EXPORT_DIR) or a folder listed in
JOBS["ALLOWED_OUTPUT_DIRS"], whatever its `directory` parameter says. The check is made on the
real path (symlinks resolved) when a job is saved, and again when it runs; the run then opens
the directory one component at a time without following symlinks and makes, renames and
deletes files relative to that open directory, so a symlink swapped in meanwhile cannot send
a backup, or retention's deletions, elsewhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from rest_framework import serializers

from jobs.conf import config
from jobs.executors import ExecutorError

TIMESTAMP_FORMAT = "%Y%m%dT%H%M%SZ"
# Backups and exports hold data: readable by the owner and its group only.
DIRECTORY_MODE = 0o750
FILE_MODE = 0o640
_OPEN_DIRECTORY = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)


class OutputConfigError(ValueError):
    """JOBS['ALLOWED_OUTPUT_DIRS'] (or the base directory setting) is not usable."""


class OutsideOutputDirs(ValueError):
    """A `directory` resolves to a place outside the folders a processor may write to."""


def allowed_roots(setting: str) -> list[Path]:
    """Return the real paths a processor using JOBS[setting] may write under: that setting, then ALLOWED_OUTPUT_DIRS."""
    base = getattr(config(), setting.lower())  # checked at start-up (jobs.conf)
    roots = [Path(os.path.realpath(os.path.abspath(base)))]
    roots += [Path(os.path.realpath(entry)) for entry in config().allowed_output_dirs]
    return roots


def resolve_directory(setting: str, directory: str | None) -> tuple[Path, Path]:
    """Return (allowed root, real target) for `directory`, absolute or relative to JOBS[setting].

    Raise OutsideOutputDirs when the real path (symlinks resolved, `..` applied) is not inside
    one of the allowed roots, OutputConfigError when the settings are unusable.
    """
    roots = allowed_roots(setting)
    base = os.path.abspath(getattr(config(), setting.lower()))
    target = Path(os.path.realpath(os.path.join(base, directory) if directory else base))
    for root in roots:
        if target == root or target.is_relative_to(root):
            return root, target
    raise OutsideOutputDirs(
        f"{directory!r} is outside the folders this job may write to: {', '.join(str(root) for root in roots)} "
        f"(JOBS[{setting!r}] and JOBS['ALLOWED_OUTPUT_DIRS'])"
    )


def directory_param(setting: str, help_text: str) -> serializers.CharField:
    """A `directory` parameter: absolute, or relative to JOBS[setting]; it must resolve inside the allowed folders."""

    def confined(value: str) -> None:
        if "\x00" in value:
            raise serializers.ValidationError("must not contain NUL characters")
        if ".." in Path(value).parts:
            raise serializers.ValidationError("must not climb out with '..'")
        try:
            resolve_directory(setting, value)
        except (OutsideOutputDirs, OutputConfigError) as exc:
            raise serializers.ValidationError(str(exc)) from exc
        except (OSError, ValueError) as exc:  # realpath on a path the system cannot handle (too long, ...)
            raise serializers.ValidationError(f"not a usable directory: {exc}") from exc

    return serializers.CharField(required=False, max_length=1000, validators=[confined], help_text=help_text)


class OutputDirectory:
    """An open directory inside the allowed folders; files are made, renamed and removed relative to it."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd = fd
        self.path = path

    def __enter__(self) -> OutputDirectory:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)

    def lstat(self, name: str) -> os.stat_result | None:
        """Return the entry's own status (a symlink is not followed), or None when it is absent."""
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def names(self) -> list[str]:
        return [entry.name for entry in os.scandir(self.fd)]

    def unlink(self, name: str) -> None:
        # unlinkat never follows the last component: a symlink is removed, never its target.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=self.fd)

    def create(self, name: str) -> int:
        """Create a new file (never an existing one, never through a symlink) and return its descriptor."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        return os.open(name, flags, 0o600, dir_fd=self.fd)

    def sync(self) -> None:
        with contextlib.suppress(OSError):  # some file systems cannot fsync a directory
            os.fsync(self.fd)

    def fd_path(self) -> Path:
        """Return a path to this very directory for code that needs one (sqlite3), immune to swaps if /proc exists."""
        magic = Path(f"/proc/self/fd/{self.fd}")
        return magic if magic.is_dir() else self.path

    @contextlib.contextmanager
    def scratch(self) -> Iterator[Path]:
        """Yield a private (0700) directory inside this one, removed with its contents afterwards."""
        name = f".scratch-{secrets.token_hex(8)}"
        os.mkdir(name, 0o700, dir_fd=self.fd)
        try:
            yield self.fd_path() / name
        finally:
            inner = os.open(name, _OPEN_DIRECTORY | getattr(os, "O_NOFOLLOW", 0), dir_fd=self.fd)
            try:
                for entry in os.scandir(inner):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.name, dir_fd=inner)
            finally:
                os.close(inner)
            os.rmdir(name, dir_fd=self.fd)


def open_output_directory(setting: str, directory: str | None) -> OutputDirectory:
    """Open (creating as needed) the confined directory for `directory`; raise ExecutorError if it is not allowed."""
    try:
        root, target = resolve_directory(setting, directory)
    except (OutsideOutputDirs, OutputConfigError) as exc:
        raise ExecutorError(str(exc)) from exc
    try:
        os.makedirs(root, mode=DIRECTORY_MODE, exist_ok=True)
        fd = os.open(root, _OPEN_DIRECTORY)
    except OSError as exc:
        raise ExecutorError(f"cannot open the output directory {root}: {exc}") from exc
    current = root
    # Below the root, walk the resolved path without following any symlink: one that appeared
    # since the path was resolved makes the run fail instead of writing where it points.
    for part in target.relative_to(root).parts:
        current = current / part
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, DIRECTORY_MODE, dir_fd=fd)
            child = os.open(part, _OPEN_DIRECTORY | getattr(os, "O_NOFOLLOW", 0), dir_fd=fd)
        except OSError as exc:
            os.close(fd)
            raise ExecutorError(
                f"the output directory {current} is not a plain directory (replaced by a symlink or a file?): {exc}"
            ) from exc
        os.close(fd)
        fd = child
    return OutputDirectory(fd, target)


class HashingWriter(io.BufferedIOBase):
    """A write-only binary stream that counts and hashes what goes through it to `raw`."""

    mode = "wb"

    def __init__(self, raw: IO[bytes]) -> None:
        super().__init__()
        self.raw = raw
        self.size = 0
        self.digest = hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.digest.update(view)
        self.size += view.nbytes
        return self.raw.write(view)

    def flush(self) -> None:
        self.raw.flush()


@dataclass
class Written:
    """A finished output file."""

    path: Path
    size_bytes: int
    sha256: str


# A prefix or suffix is a file name part: never a path, never hidden (temporary files are).
_NAME_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,150}$")


@dataclass
class SeriesNames:
    """Files named `<prefix>-<UTC timestamp>[-<n>]<suffix>` in one directory: one series for retention."""

    directory: OutputDirectory
    prefix: str
    suffix: str

    def __post_init__(self) -> None:
        if not _NAME_PART.fullmatch(self.prefix) or not _NAME_PART.fullmatch(self.suffix.lstrip(".")):
            raise ExecutorError(f"cannot name output files {self.prefix!r} ... {self.suffix!r}")

    def pattern(self) -> re.Pattern[str]:
        return re.compile(rf"^{re.escape(self.prefix)}-(\d{{8}}T\d{{6}}Z)(?:-(\d+))?{re.escape(self.suffix)}$")

    def candidates(self, now: datetime) -> Iterator[str]:
        stamp = now.astimezone(UTC).strftime(TIMESTAMP_FORMAT)
        yield f"{self.prefix}-{stamp}{self.suffix}"
        for counter in range(2, 1000):
            yield f"{self.prefix}-{stamp}-{counter}{self.suffix}"

    def existing(self) -> list[str]:
        """Return the names of the series' regular files, oldest first (symlinks and folders are not the series')."""
        pattern = self.pattern()
        found = []
        for name in self.directory.names():
            match = pattern.fullmatch(name)
            status = self.directory.lstat(name) if match else None
            if match and status is not None and stat.S_ISREG(status.st_mode):
                found.append((match[1], int(match[2] or 1), name))
        return [name for *_, name in sorted(found)]

    def prune(self, keep: int) -> list[str]:
        """Delete all but the newest `keep` files of the series; return the deleted names."""
        names = self.existing()
        deleted = names[:-keep] if keep > 0 else names
        for name in deleted:
            self.directory.unlink(name)
        return deleted


@contextlib.contextmanager
def atomic_output(names: SeriesNames, now: datetime) -> Iterator[tuple[HashingWriter, list[Written]]]:
    """Write a new file of the series; it appears under its final name only once complete.

    Yields a hashing writer and a list that holds the Written record after the block ends.
    A crash, an error or a timeout leaves no partial file behind that retention could count as
    a good one.
    """
    directory = names.directory
    temp = f".{names.prefix}-{secrets.token_hex(8)}.partial"
    fd = directory.create(temp)
    outcome: list[Written] = []
    try:
        with os.fdopen(fd, "wb") as raw:
            writer = HashingWriter(raw)
            yield writer, outcome
            raw.flush()
            os.fchmod(raw.fileno(), FILE_MODE)
            os.fsync(raw.fileno())
        final = _publish(temp, names, now)
        directory.sync()
        outcome.append(Written(path=directory.path / final, size_bytes=writer.size, sha256=writer.digest.hexdigest()))
    finally:
        directory.unlink(temp)


def _publish(temp: str, names: SeriesNames, now: datetime) -> str:
    directory = names.directory
    # A hard link never replaces an existing file, so two runs in the same second both survive.
    for candidate in names.candidates(now):
        try:
            os.link(temp, candidate, src_dir_fd=directory.fd, dst_dir_fd=directory.fd)
        except FileExistsError:
            continue
        except OSError:
            if directory.lstat(candidate) is not None:
                continue
            # File systems without hard links.
            os.rename(temp, candidate, src_dir_fd=directory.fd, dst_dir_fd=directory.fd)
        return candidate
    raise ExecutorError(f"too many files named {names.prefix}-<timestamp> in {directory.path} this second")

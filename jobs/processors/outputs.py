"""Output files for processors: directories, timestamped names, atomic writes and retention."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from rest_framework import serializers

from jobs.conf import get
from jobs.executors import ExecutorError

TIMESTAMP_FORMAT = "%Y%m%dT%H%M%SZ"


def directory_param(help_text: str) -> serializers.CharField:
    """A `directory` parameter: absolute, or relative to the setting's directory."""

    def no_escape(value: str) -> None:
        if "\x00" in value:
            raise serializers.ValidationError("must not contain NUL characters")
        if not os.path.isabs(value) and ".." in Path(value).parts:
            raise serializers.ValidationError("a relative directory must not climb out with '..'")

    return serializers.CharField(required=False, max_length=1000, validators=[no_escape], help_text=help_text)


def output_directory(setting: str, directory: str | None) -> Path:
    """Return the directory to write into (created if needed): `directory` resolved against JOBS[setting]."""
    base = Path(get(setting))
    path = base / directory if directory else base
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExecutorError(f"cannot create the output directory {path}: {exc}") from exc
    if not os.access(path, os.W_OK):
        raise ExecutorError(f"the output directory {path} is not writable")
    return path


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


@dataclass
class SeriesNames:
    """Files named `<prefix>-<UTC timestamp>[-<n>]<suffix>` in one directory: one series for retention."""

    directory: Path
    prefix: str
    suffix: str

    def pattern(self) -> re.Pattern[str]:
        return re.compile(rf"^{re.escape(self.prefix)}-(\d{{8}}T\d{{6}}Z)(?:-(\d+))?{re.escape(self.suffix)}$")

    def candidates(self, now: datetime) -> Iterator[Path]:
        stamp = now.astimezone(UTC).strftime(TIMESTAMP_FORMAT)
        yield self.directory / f"{self.prefix}-{stamp}{self.suffix}"
        for counter in range(2, 1000):
            yield self.directory / f"{self.prefix}-{stamp}-{counter}{self.suffix}"

    def existing(self) -> list[Path]:
        """Return the series' files, oldest first."""
        pattern = self.pattern()
        found = []
        for entry in self.directory.iterdir():
            match = pattern.fullmatch(entry.name)
            if match and entry.is_file():
                found.append((match[1], int(match[2] or 1), entry))
        return [entry for *_, entry in sorted(found)]

    def prune(self, keep: int) -> list[str]:
        """Delete all but the newest `keep` files of the series; return the deleted names."""
        deleted = []
        for path in self.existing()[:-keep] if keep > 0 else self.existing():
            path.unlink(missing_ok=True)
            deleted.append(path.name)
        return deleted


@contextlib.contextmanager
def atomic_output(names: SeriesNames, now: datetime) -> Iterator[tuple[HashingWriter, list[Written]]]:
    """Write a new file of the series; it appears under its final name only once complete.

    Yields a hashing writer and a list that holds the Written record after the block ends.
    A crash or an error leaves no partial file behind that retention could count as a good one.
    """
    fd, temp_name = tempfile.mkstemp(dir=names.directory, prefix=f".{names.prefix}-", suffix=".partial")
    temp = Path(temp_name)
    outcome: list[Written] = []
    try:
        with os.fdopen(fd, "wb") as raw:
            writer = HashingWriter(raw)
            yield writer, outcome
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(temp, 0o640)  # backups and exports hold data; not world-readable
        final = _publish(temp, names, now)
        outcome.append(Written(path=final, size_bytes=writer.size, sha256=writer.digest.hexdigest()))
    finally:
        temp.unlink(missing_ok=True)


def _publish(temp: Path, names: SeriesNames, now: datetime) -> Path:
    # A hard link never replaces an existing file, so two runs in the same second both survive.
    for candidate in names.candidates(now):
        try:
            os.link(temp, candidate)
        except FileExistsError:
            continue
        except OSError:
            if candidate.exists():
                continue
            os.replace(temp, candidate)  # file systems without hard links
        return candidate
    raise ExecutorError(f"too many files named {names.prefix}-<timestamp> in {names.directory} this second")

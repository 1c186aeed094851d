"""Where database_backup and model_export may write: BACKUP_DIR, EXPORT_DIR and JOBS['ALLOWED_OUTPUT_DIRS'] only."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings
from rest_framework import serializers

from jobs import services
from jobs.conf import config, problems
from jobs.executors import ExecutorError, get_executor
from jobs.executors.data_processing import outputs
from jobs.models import Job, JobRun

MakeRun = Callable[..., JobRun]
DATASETS = {"database_backup": "BACKUP_DIR", "model_export": "EXPORT_DIR"}
EXPORT = {"dataset": "model_export", "model": "jobs.Job"}


@pytest.fixture
def dirs(tmp_path: Path) -> Iterator[dict[str, Path]]:
    """BACKUP_DIR and EXPORT_DIR in a temporary directory, with a sibling folder `outside` that is not allowed."""
    paths = {"BACKUP_DIR": tmp_path / "backups", "EXPORT_DIR": tmp_path / "exports", "outside": tmp_path / "outside"}
    for path in paths.values():
        path.mkdir()
    with override_settings(
        JOBS={**settings.JOBS, "BACKUP_DIR": str(paths["BACKUP_DIR"]), "EXPORT_DIR": str(paths["EXPORT_DIR"])}
    ):
        yield paths


def body(dataset: str, **parameters: Any) -> dict[str, Any]:
    """Return the job parameters of `dataset` (an export of jobs.Job) with `parameters` added."""
    return {"dataset": dataset, **({"model": "jobs.Job"} if dataset == "model_export" else {}), **parameters}


def allow(*folders: Path) -> Any:
    return override_settings(JOBS={**settings.JOBS, "ALLOWED_OUTPUT_DIRS": [str(folder) for folder in folders]})


def refusal(parameters: dict[str, Any]) -> str:
    """Return the `directory` error of validating `parameters`."""
    with pytest.raises(serializers.ValidationError) as refused:
        get_executor("data_processing").validate_parameters(parameters)
    detail = refused.value.detail
    assert isinstance(detail, dict)
    return " | ".join(str(message) for message in detail["directory"])


def every_file(root: Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*"))


@pytest.mark.django_db
@pytest.mark.parametrize("dataset", sorted(DATASETS))
@pytest.mark.parametrize(
    "directory",
    ["{outside}", "/etc", "/", "{outside}/nested", "../outside", "sub/../../outside", "{base}/../outside"],
)
def test_a_directory_outside_the_allowed_folders_is_refused(
    dataset: str, directory: str, dirs: dict[str, Path]
) -> None:
    base = dirs[DATASETS[dataset]]
    path = directory.format(outside=dirs["outside"], base=base)
    message = refusal(body(dataset, directory=path))

    assert "outside the folders this job may write to" in message or "must not climb out with '..'" in message
    if ".." not in path:
        assert str(base.resolve()) in message  # names the folders that are allowed


@pytest.mark.django_db
def test_a_symlink_inside_export_dir_that_points_outside_is_refused_when_saved(dirs: dict[str, Path]) -> None:
    (dirs["EXPORT_DIR"] / "reports").symlink_to(dirs["outside"], target_is_directory=True)

    assert "outside the folders this job may write to" in refusal({**EXPORT, "directory": "reports"})
    assert "outside" in refusal({**EXPORT, "directory": str(dirs["EXPORT_DIR"] / "reports" / "deeper")})


@pytest.mark.django_db
@pytest.mark.parametrize("dataset", sorted(DATASETS))
def test_a_symlink_swapped_in_after_saving_fails_the_run_and_writes_nothing_outside(
    dataset: str, make_run: MakeRun, dirs: dict[str, Path]
) -> None:
    base = dirs[DATASETS[dataset]]
    run = make_run("data_processing", body(dataset, directory="reports"))
    (base / "reports").symlink_to(dirs["outside"], target_is_directory=True)

    with pytest.raises(ExecutorError, match="outside the folders this job may write to"):
        get_executor("data_processing").execute(run)

    assert every_file(dirs["outside"]) == []


@pytest.mark.django_db
def test_a_symlink_swapped_in_between_the_check_and_the_write_is_not_followed(
    make_run: MakeRun, dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = make_run("data_processing", {**EXPORT, "directory": "reports/daily"})
    checked = outputs.resolve_directory("EXPORT_DIR", "reports/daily")

    def swap_after_checking(setting: str, directory: str | None) -> tuple[Path, Path]:
        # Every check sees what was there when the job was saved; a symlink is there by now.
        if not (dirs["EXPORT_DIR"] / "reports").is_symlink():
            (dirs["EXPORT_DIR"] / "reports").symlink_to(dirs["outside"], target_is_directory=True)
        return checked

    monkeypatch.setattr(outputs, "resolve_directory", swap_after_checking)

    with pytest.raises(ExecutorError, match="is not a plain directory"):
        get_executor("data_processing").execute(run)

    assert every_file(dirs["outside"]) == []


@pytest.mark.django_db
def test_a_folder_listed_in_allowed_output_dirs_may_be_written_to(make_run: MakeRun, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    with allow(shared):
        run = make_run("data_processing", {**EXPORT, "directory": str(shared / "jobs")})
        result = get_executor("data_processing").execute(run)

    assert Path(result["path"]).parent == shared / "jobs"
    assert Path(result["path"]).is_file()


@pytest.mark.django_db
def test_allowed_output_dirs_are_resolved_too(dirs: dict[str, Path], tmp_path: Path) -> None:
    # The operator lists a symlink; what counts is where it leads.
    (tmp_path / "link").symlink_to(dirs["outside"], target_is_directory=True)

    with allow(tmp_path / "link"):
        cleaned = get_executor("data_processing").validate_parameters({**EXPORT, "directory": str(dirs["outside"])})

    assert cleaned["directory"] == str(dirs["outside"])


@pytest.mark.django_db
@pytest.mark.parametrize("setting", [["relative/path"], "/one/string", [3]])
def test_a_broken_allowed_output_dirs_setting_is_refused_at_start_up_naming_it(
    setting: Any, dirs: dict[str, Path]
) -> None:
    with override_settings(JOBS={**settings.JOBS, "ALLOWED_OUTPUT_DIRS": setting}):
        found = problems()
        with pytest.raises(ImproperlyConfigured, match=re.escape("JOBS['ALLOWED_OUTPUT_DIRS']")):
            config()

    assert len(found) == 1 and found[0].startswith("JOBS['ALLOWED_OUTPUT_DIRS']: ")


@pytest.mark.django_db
def test_a_relative_directory_stays_inside_and_is_created(make_run: MakeRun, dirs: dict[str, Path]) -> None:
    run = make_run("data_processing", {**EXPORT, "directory": "daily/jobs"})

    result = get_executor("data_processing").execute(run)

    assert Path(result["path"]).parent == dirs["EXPORT_DIR"] / "daily" / "jobs"


@pytest.mark.django_db(transaction=True)  # SQLite is not backed up from inside a transaction
@pytest.mark.parametrize("dataset", sorted(DATASETS))
def test_retention_never_deletes_through_a_symlinked_file(
    dataset: str, make_run: MakeRun, dirs: dict[str, Path]
) -> None:
    base = dirs[DATASETS[dataset]]
    name = "backup-default-20200101T000000Z.{}.gz" if dataset == "database_backup" else "jobs.job-20200101T000000Z.csv"
    victim = dirs["outside"] / "precious.txt"
    victim.write_text("keep me")
    vendor_suffix = "sqlite3" if "sqlite" in settings.DATABASES["default"]["ENGINE"] else "sql"
    link = base / name.format(vendor_suffix)
    link.symlink_to(victim)
    old = base / name.format(vendor_suffix).replace("2020", "2019")
    old.write_text("an old file of the series")
    run = make_run("data_processing", body(dataset, keep=1))

    result = get_executor("data_processing").execute(run)

    assert victim.read_text() == "keep me"
    assert link.is_symlink()  # not the series' file: neither counted nor deleted
    assert result["deleted"] == [old.name]
    assert sorted(path.name for path in base.iterdir()) == sorted([link.name, Path(result["path"]).name])


@pytest.mark.django_db
def test_retention_never_deletes_a_folder_named_like_the_series(make_run: MakeRun, dirs: dict[str, Path]) -> None:
    folder = dirs["EXPORT_DIR"] / "jobs.job-20200101T000000Z.csv"
    folder.mkdir()
    (folder / "inside.txt").write_text("x")
    run = make_run("data_processing", {**EXPORT, "keep": 1})

    result = get_executor("data_processing").execute(run)

    assert result["deleted"] == []
    assert (folder / "inside.txt").exists()


@pytest.mark.django_db
def test_output_files_and_folders_are_not_world_readable(make_run: MakeRun, dirs: dict[str, Path]) -> None:
    run = make_run("data_processing", {**EXPORT, "directory": "private"})

    path = Path(get_executor("data_processing").execute(run)["path"])

    assert path.stat().st_mode & 0o007 == 0
    assert path.parent.stat().st_mode & 0o007 == 0
    assert [entry for entry in os.listdir(path.parent) if entry.startswith(".")] == []  # no temporary files left


@pytest.mark.django_db
def test_a_job_saved_with_a_directory_outside_is_refused_by_the_service(dirs: dict[str, Path]) -> None:
    with pytest.raises(services.JobValidationError) as refused:
        services.job_create(
            name="Backup to a folder of my choosing",
            cron_expression="@daily",
            job_type="data_processing",
            parameters={"dataset": "database_backup", "directory": str(dirs["outside"])},
        )

    assert "outside the folders this job may write to" in str(refused.value.errors["parameters"])
    assert Job.objects.count() == 0

"""Who may schedule what: exports need `view` on the model, backups their own permission (check_permission)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.conf import settings
from django.contrib.auth.models import Permission, User
from django.contrib.contenttypes.models import ContentType
from django.test import override_settings
from rest_framework import serializers

from jobs.executors import get_executor
from jobs.models import Job

BACKUP = "jobs.schedule_database_backup"
WORD_COUNT = "jobs.tests.executors.sample_processors.WordCount"
MakeUser = Callable[..., User]


@pytest.fixture
def make_user(db: None) -> MakeUser:
    """Create an active user holding exactly the given "app_label.codename" permissions."""

    def make(*perms: str, superuser: bool = False) -> User:
        user = User.objects.create_user(f"user{User.objects.count()}", password="pw-123456", is_superuser=superuser)
        for perm in perms:
            app_label, codename = perm.split(".")
            if codename == "schedule_database_backup":
                # Declared on Job's Meta.permissions by the lead's migration; made here until it lands.
                Permission.objects.get_or_create(
                    codename=codename,
                    content_type=ContentType.objects.get_for_model(Job),
                    defaults={"name": "Can schedule database backups"},
                )
            user.user_permissions.add(Permission.objects.get(codename=codename, content_type__app_label=app_label))
        return User.objects.get(pk=user.pk)  # a fresh object: has_perm caches what it read

    return make


def check(user: User, parameters: dict[str, Any]) -> None:
    """Validate `parameters` as a job save would, then ask whether `user` may schedule them."""
    executor = get_executor("data_processing")
    executor.check_permission(user, executor.validate_parameters(parameters))


def refusal(user: User, parameters: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(serializers.ValidationError) as refused:
        check(user, parameters)
    detail = refused.value.detail
    assert isinstance(detail, dict)
    return {key: " | ".join(str(message) for message in value) for key, value in detail.items()}  # type: ignore[union-attr]


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("model", "perm"),
    [
        ("jobs.JobRun", "jobs.view_jobrun"),
        ("jobs.Job", "jobs.view_job"),
        ("auth.User", "auth.view_user"),
        ("contenttypes.ContentType", "contenttypes.view_contenttype"),
    ],
)
def test_exporting_a_model_needs_the_view_permission_on_it(model: str, perm: str, make_user: MakeUser) -> None:
    parameters = {"dataset": "model_export", "model": model}
    # add_job and change_job are what a person needs to save any job; they grant no data.
    without = make_user("jobs.add_job", "jobs.change_job")

    assert refusal(without, parameters) == {"model": f"exporting {model} needs the permission {perm}"}
    check(make_user(perm), parameters)
    check(make_user(superuser=True), parameters)


@pytest.mark.django_db
def test_a_permission_on_another_model_is_not_enough(make_user: MakeUser) -> None:
    user = make_user("jobs.view_job")

    assert "jobs.view_jobrun" in refusal(user, {"dataset": "model_export", "model": "jobs.JobRun"})["model"]


@pytest.mark.django_db
def test_filters_through_a_relation_need_view_on_the_related_model(make_user: MakeUser) -> None:
    parameters = {"dataset": "model_export", "model": "jobs.JobRun", "filters": {"job__name__startswith": "x"}}

    refused = refusal(make_user("jobs.view_jobrun"), parameters)

    assert refused == {"filters": "'job__name__startswith' reads jobs.Job, which needs the permission jobs.view_job"}
    check(make_user("jobs.view_jobrun", "jobs.view_job"), parameters)
    check(make_user("jobs.view_jobrun"), {**parameters, "filters": {"job": 1, "job_id__in": [1, 2]}})  # ids only


@pytest.mark.django_db
def test_an_inactive_user_may_export_nothing(make_user: MakeUser) -> None:
    user = make_user("jobs.view_job")
    user.is_active = False

    assert "model" in refusal(user, {"dataset": "model_export", "model": "jobs.Job"})


@pytest.mark.django_db
@pytest.mark.parametrize("parameters", [{}, {"keep": 3}, {"database": "default", "directory": "nightly"}])
def test_a_backup_needs_its_own_permission(parameters: dict[str, Any], make_user: MakeUser, tmp_path: Any) -> None:
    body = {"dataset": "database_backup", **parameters}
    with override_settings(JOBS={**settings.JOBS, "BACKUP_DIR": str(tmp_path)}):
        # Every model permission of the jobs app is still not enough.
        everything_else = make_user("jobs.add_job", "jobs.change_job", "jobs.view_job", "jobs.view_jobrun")
        refused = refusal(everything_else, body)

        check(make_user(BACKUP), body)
        check(make_user(superuser=True), body)

    assert refused == {
        "dataset": f"scheduling database backups needs the permission {BACKUP} "
        "(a backup holds every password hash and token in the database)"
    }


@pytest.fixture
def word_count() -> Iterator[None]:
    with override_settings(JOBS={**settings.JOBS, "DATA_PROCESSORS": [WORD_COUNT]}):
        yield


@pytest.mark.django_db
def test_a_processor_without_a_permission_rule_allows_anyone(word_count: None, make_user: MakeUser) -> None:
    check(make_user(), {"dataset": "word_count", "top": 3})

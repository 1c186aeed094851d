"""email_notification: send an email through Django's mail framework (so any EMAIL_BACKEND works)."""

from __future__ import annotations

import re
import zoneinfo
from functools import cache
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.core.exceptions import ValidationError as DjangoValidationError
from django.core.mail import EmailMultiAlternatives
from django.core.mail.utils import DNS_NAME
from django.core.validators import validate_email
from django.template import Context, Engine, TemplateSyntaxError
from django.utils import timezone
from django.utils.html import strip_tags
from rest_framework import serializers

from .base import Executor

if TYPE_CHECKING:
    from jobs.models import JobRun

# "Name <address>"; the name may not hold quotes, angle brackets or backslashes, so it can
# always be written back as one quoted string.
_NAMED_ADDRESS = re.compile(r'^(?P<name>[^<>"\\]*)<(?P<address>[^<>]*)>$')
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@cache
def template_engine(*, autoescape: bool) -> Engine:
    """Return a template engine with the built-in tags only: no template files, no extra libraries."""
    return Engine(dirs=[], app_dirs=False, libraries={}, autoescape=autoescape)


def _no_line_breaks(value: str) -> None:
    if "\n" in value or "\r" in value:
        raise serializers.ValidationError("must not contain line breaks (header injection)")
    if _CONTROL.search(value):
        raise serializers.ValidationError("must not contain control characters")


def _template(value: str) -> None:
    try:
        template_engine(autoescape=False).from_string(value)
    except TemplateSyntaxError as exc:
        raise serializers.ValidationError(f"template error: {exc}") from exc


def clean_address(value: Any) -> str:
    """Return `value` as one safe address ("a@example.com" or '"Name" <a@example.com>')."""
    if not isinstance(value, str):
        raise serializers.ValidationError("must be an email address")
    _no_line_breaks(value)
    value = value.strip()
    match = _NAMED_ADDRESS.fullmatch(value)
    name, address = (match["name"].strip(), match["address"].strip()) if match else ("", value)
    try:
        validate_email(address)
    except DjangoValidationError as exc:
        raise serializers.ValidationError("Enter a valid email address.") from exc
    return f'"{name}" <{address}>' if name else address


class AddressField(serializers.Field):
    """One email address, optionally with a display name."""

    def to_internal_value(self, data: Any) -> str:
        return clean_address(data)

    def to_representation(self, value: str) -> str:
        return value


class AddressListField(serializers.ListField):
    """One email address or a list of them; always a list once validated."""

    child = serializers.EmailField()  # for the JSON Schema; the addresses are checked by clean_address

    def to_internal_value(self, data: Any) -> list[str]:
        if isinstance(data, str):
            data = [data]
        if not isinstance(data, list):
            raise serializers.ValidationError("must be an email address or a list of them")
        if self.min_length is not None and len(data) < self.min_length:
            raise serializers.ValidationError(f"needs at least {self.min_length} address")
        if self.max_length is not None and len(data) > self.max_length:
            raise serializers.ValidationError(f"at most {self.max_length} addresses")
        errors: dict[int, list[str]] = {}
        addresses = []
        for index, item in enumerate(data):
            try:
                addresses.append(clean_address(item))
            except serializers.ValidationError as exc:
                errors[index] = [str(detail) for detail in exc.detail]
        if errors:
            # Keyed by list index, as DRF's own ListField does; the stubs only allow str keys.
            raise serializers.ValidationError(errors)  # type: ignore[arg-type]
        return addresses


class EmailParameters(serializers.Serializer):
    recipient = AddressListField(
        min_length=1, max_length=100, help_text='One address or a list; "Name <a@example.com>" works too.'
    )
    subject = serializers.CharField(
        max_length=998,
        validators=[_no_line_breaks, _template],
        help_text="One line; Django template syntax, e.g. \"{{ job.name }} for {{ run.scheduled_for|date:'Y-m-d' }}\".",
    )
    body = serializers.CharField(
        required=False,
        allow_blank=True,
        default="",
        trim_whitespace=False,
        max_length=100_000,
        validators=[_template],
        help_text="Plain-text body; Django template syntax with {{ job.* }} and {{ run.* }}.",
    )
    html_body = serializers.CharField(
        required=False,
        allow_blank=True,
        default="",
        trim_whitespace=False,
        max_length=500_000,
        validators=[_template],
        help_text="Optional HTML alternative (variables are HTML-escaped). The plain body defaults to its text.",
    )
    cc = AddressListField(required=False, default=list, max_length=100)
    bcc = AddressListField(required=False, default=list, max_length=100, help_text="Delivered, but not in headers.")
    reply_to = AddressListField(required=False, default=list, max_length=10)
    from_email = AddressField(required=False, default="", help_text="Defaults to DEFAULT_FROM_EMAIL.")


def template_context(run: JobRun) -> dict[str, Any]:
    """Return the variables templates see: plain copies of the job's and run's fields, no ORM access."""
    job = run.job
    return {
        "job": {
            "id": job.pk,
            "name": job.name,
            "description": job.description,
            "cron_expression": job.cron_expression,
            "timezone": job.timezone,
            "job_type": job.job_type,
            "next_run_at": job.next_run_at,
            "last_run_at": job.last_run_at,
            "last_run_status": job.last_run_status,
        },
        "run": {
            "id": run.pk,
            "scheduled_for": run.scheduled_for,
            "trigger": run.trigger,
            "attempt": run.attempt,
            "not_before": run.not_before,
            "started_at": run.started_at,
            "missed_fires": run.missed_fires,
        },
    }


def render(source: str, context: dict[str, Any], *, html: bool = False) -> str:
    return template_engine(autoescape=html).from_string(source).render(Context(context, autoescape=html))


class EmailNotificationExecutor(Executor):
    name = "email_notification"
    label = "Email notification"
    description = "Send an email (plain text, optional HTML) through Django's configured mail backend."
    parameters_serializer = EmailParameters
    safe_to_repeat = False  # a repeat after a crash could send the mail twice

    def execute(self, run: JobRun) -> dict[str, Any]:
        params = self.parameters_for(run)
        context = template_context(run)
        # Dates in templates read in the job's own time zone, as its schedule does.
        try:
            zone = zoneinfo.ZoneInfo(run.job.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            zone = timezone.get_default_timezone()
        with timezone.override(zone):
            # A job name with a line break must not break the Subject header.
            subject = " ".join(render(params["subject"], context).split())
            html = render(params["html_body"], context, html=True) if params["html_body"] else ""
            body = render(params["body"], context) if params["body"] else strip_tags(html).strip()
        message_id = f"<job{run.job_id}.run{run.pk}.{run.attempt}.{timezone.now():%Y%m%d%H%M%S%f}@{DNS_NAME}>"
        message = EmailMultiAlternatives(
            subject=subject,
            body=body,
            from_email=params["from_email"] or settings.DEFAULT_FROM_EMAIL,
            to=params["recipient"],
            cc=params["cc"],
            bcc=params["bcc"],
            reply_to=params["reply_to"],
            headers={"Message-ID": message_id, "X-Scheduler-Job": str(run.job_id), "X-Scheduler-Run": str(run.pk)},
        )
        if html:
            message.attach_alternative(html, "text/html")
        sent = message.send(fail_silently=False)
        return {
            "sent": sent,
            "message_id": message_id,
            "to": params["recipient"],
            "cc": params["cc"],
            "bcc_count": len(params["bcc"]),
            "subject": subject,
        }

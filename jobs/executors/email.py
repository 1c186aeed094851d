"""email_notification: send an email through Django's mail framework."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.core.mail import EmailMultiAlternatives
from django.template import Context, Template, TemplateSyntaxError
from rest_framework import serializers

from .base import Executor

if TYPE_CHECKING:
    from jobs.models import JobRun


def _no_newlines(value: str) -> str:
    if "\n" in value or "\r" in value:
        raise serializers.ValidationError("must not contain line breaks (header injection)")
    return value


def _template(value: str) -> str:
    try:
        Template(value)
    except TemplateSyntaxError as exc:
        raise serializers.ValidationError(f"template error: {exc}") from exc
    return value


class AddressListField(serializers.ListField):
    """One email address or a list of them; always a list once validated."""

    child = serializers.EmailField()

    def to_internal_value(self, data: Any) -> list[str]:
        if isinstance(data, str):
            data = [data]
        addresses = super().to_internal_value(data)
        for address in addresses:
            _no_newlines(address)
        return addresses


class EmailParameters(serializers.Serializer):
    recipient = AddressListField(min_length=1, max_length=100, help_text="One address or a list.")
    subject = serializers.CharField(
        max_length=998, validators=[_no_newlines, _template], help_text="Django template syntax allowed."
    )
    body = serializers.CharField(
        required=False,
        allow_blank=True,
        default="",
        validators=[_template],
        help_text="Plain-text body; Django template syntax with {{ job }} and {{ run }}.",
    )
    html_body = serializers.CharField(
        required=False, allow_blank=True, default="", validators=[_template], help_text="Optional HTML part."
    )
    cc = AddressListField(required=False, default=list, max_length=100)
    bcc = AddressListField(required=False, default=list, max_length=100)
    from_email = serializers.EmailField(
        required=False,
        allow_blank=True,
        default="",
        validators=[_no_newlines],
        help_text="Defaults to DEFAULT_FROM_EMAIL.",
    )


class EmailNotificationExecutor(Executor):
    name = "email_notification"
    label = "Email notification"
    description = "Send an email (plain text, optional HTML) through Django's configured mail backend."
    parameters_serializer = EmailParameters
    safe_to_repeat = False  # a repeat after a crash could send the mail twice

    def execute(self, run: JobRun) -> dict[str, Any]:
        params = self.parameters_for(run)
        context = Context({"job": run.job, "run": run})
        message = EmailMultiAlternatives(
            subject=Template(params["subject"]).render(context),
            body=Template(params["body"]).render(context),
            from_email=params["from_email"] or settings.DEFAULT_FROM_EMAIL,
            to=params["recipient"],
            cc=params["cc"],
            bcc=params["bcc"],
            headers={"X-Scheduler-Job": str(run.job_id), "X-Scheduler-Run": str(run.pk)},
        )
        if params["html_body"]:
            message.attach_alternative(Template(params["html_body"]).render(context), "text/html")
        sent = message.send(fail_silently=False)
        return {
            "sent": sent,
            "recipients": [*params["recipient"], *params["cc"], *params["bcc"]],
            "subject": message.subject,
        }

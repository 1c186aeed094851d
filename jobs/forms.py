"""The admin's job form: field widgets, and the service's validation mapped onto the fields concerned."""

from __future__ import annotations

import json
from typing import Any, cast

from django import forms
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from . import schedule, services
from .executors import Executor, all_executors
from .models import Job

# How a job fires, retries and times out: the same fields, in the same order, in the admin's form and the API.
POLICY_FIELDS = (
    "misfire_policy",
    "misfire_grace_seconds",
    "overlap_policy",
    "max_retries",
    "retry_backoff_seconds",
    "timeout_seconds",
)


class TimezoneInput(forms.TextInput):
    """A text input that suggests IANA zone names as one types, while still accepting any text.

    Free text rather than a select, so a mistyped zone is refused on the field by the same check
    the API uses, with the same message.
    """

    def __init__(self, attrs: dict[str, Any] | None = None) -> None:
        super().__init__({"list": "jobs-timezones", "autocomplete": "off", "spellcheck": "false", **(attrs or {})})

    def render(self, name: str, value: Any, attrs: dict[str, Any] | None = None, renderer: Any = None) -> SafeString:
        options = format_html_join("", '<option value="{}">', ((zone,) for zone in schedule.iana_zone_names()))
        return format_html('{}<datalist id="jobs-timezones">{}</datalist>', super().render(name, value, attrs), options)


class PrettyJSONField(forms.JSONField):
    """A JSON field shown indented, so nested parameters stay readable in the textarea."""

    def prepare_value(self, value: Any) -> Any:
        if isinstance(value, forms.fields.InvalidJSONInput):
            return value
        return json.dumps(value, ensure_ascii=False, indent=2, cls=self.encoder)


def error_messages(detail: Any, path: str = "") -> list[str]:
    """Flatten a (possibly nested) error detail into lines such as "recipient[0]: Enter a valid email address."."""
    if isinstance(detail, dict):
        messages: list[str] = []
        for key, value in detail.items():
            if key in ("non_field_errors", "__all__"):
                child = path
            elif isinstance(key, int) or str(key).isdigit():
                child = f"{path}[{key}]"
            else:
                child = f"{path}.{key}" if path else str(key)
            messages.extend(error_messages(value, child))
        return messages
    if isinstance(detail, list | tuple):
        messages = []
        for index, item in enumerate(detail):
            messages.extend(error_messages(item, path if isinstance(item, str) else f"{path}[{index}]"))
        return messages
    return [f"{path}: {detail}" if path else str(detail)]


def _parameters_help(executor: Executor) -> str:
    fields = executor.parameters_serializer().fields
    names = [f"{name}{'' if field.required else ' (optional)'}" for name, field in fields.items()]
    return f"{executor.name}: {', '.join(names) or 'no parameters'}"


class JobAdminForm(forms.ModelForm):
    # The person saving (set by JobAdmin.get_form): the job type checks what they may schedule.
    user: Any = None
    job_type = forms.ChoiceField(help_text=Job._meta.get_field("job_type").help_text)
    parameters = PrettyJSONField(
        required=False,
        initial=dict,
        widget=forms.Textarea(attrs={"rows": 8, "cols": 60, "class": "vLargeTextField jobs-json"}),
    )

    class Meta:
        model = Job
        fields = [
            "name",
            "description",
            "job_type",
            "parameters",
            "enabled",
            "cron_expression",
            "timezone",
            *POLICY_FIELDS,
        ]
        widgets = {
            "timezone": TimezoneInput(),
            "cron_expression": forms.TextInput(attrs={"class": "vTextField jobs-cron", "spellcheck": "false"}),
        }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        executors = all_executors()
        choices = [(name, executor.label or name) for name, executor in sorted(executors.items())]
        current = self.instance.job_type if self.instance.pk else ""
        if current and current not in executors:
            # Keep a job whose type was unregistered editable; saving it names the problem.
            choices.append((current, f"{current} (not registered)"))
        cast(forms.ChoiceField, self.fields["job_type"]).choices = [("", "---------"), *choices]
        # Read by job_form.js: an empty parameters box starts with the chosen type's example.
        examples = {name: executor.parameters_example for name, executor in executors.items()}
        self.fields["parameters"].widget.attrs["data-examples"] = json.dumps(examples)
        by_type = "; ".join(_parameters_help(executor) for _, executor in sorted(executors.items()))
        model_help = Job._meta.get_field("parameters").help_text
        self.fields["parameters"].help_text = f"{model_help} A JSON object. Fields by type: {by_type}."

    def clean(self) -> dict[str, Any]:
        super().clean()
        cleaned_data = self.cleaned_data  # what ModelForm.clean() returns; typed without the None
        try:
            values = services.job_clean(
                cron_expression=cleaned_data.get("cron_expression", ""),
                timezone=cleaned_data.get("timezone", ""),
                job_type=cleaned_data.get("job_type", ""),
                parameters=cleaned_data.get("parameters"),
                user=self.user,
            )
        except services.JobValidationError as exc:
            for name, detail in exc.errors.items():
                if name in self.errors:
                    continue  # the field's own check already said what is wrong
                field = name if name in self.fields else None
                for message in error_messages(detail):
                    self.add_error(field, message)
        else:
            for name, value in values.items():
                if name in cleaned_data:
                    cleaned_data[name] = value
        return cleaned_data

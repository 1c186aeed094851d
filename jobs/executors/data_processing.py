"""data_processing: run a registered data processor named by the `dataset` parameter."""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING, Any, ClassVar

from django.core.signals import setting_changed
from django.dispatch import receiver
from django.utils.module_loading import import_string
from rest_framework import serializers

from .base import Executor

if TYPE_CHECKING:
    from jobs.models import JobRun

BUILTIN_PROCESSORS: list[str] = []


class DataProcessor:
    """Work on data that an app registers under a dataset name.

    Subclasses set `name` (the `dataset` value), `description` and `parameters_serializer`
    (for the job's other parameters), and implement `process`, which returns a JSON result.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    parameters_serializer: ClassVar[type[serializers.Serializer]] = serializers.Serializer
    safe_to_repeat: ClassVar[bool] = True

    def process(self, run: JobRun, params: dict[str, Any]) -> Any:
        raise NotImplementedError


@cache
def all_processors() -> dict[str, DataProcessor]:
    """Return every registered data processor by dataset name."""
    from jobs.conf import get

    registry: dict[str, DataProcessor] = {}
    for path in [*BUILTIN_PROCESSORS, *get("DATA_PROCESSORS")]:
        cls = import_string(path)
        if not (isinstance(cls, type) and issubclass(cls, DataProcessor)) or not getattr(cls, "name", ""):
            raise TypeError(f"{path!r} is not a named subclass of DataProcessor")
        if cls.name in registry:
            raise TypeError(f"{path!r} reuses the dataset name {cls.name!r}")
        registry[cls.name] = cls()
    return registry


@receiver(setting_changed)
def _reset(setting: str, **kwargs: object) -> None:
    if setting == "JOBS":
        all_processors.cache_clear()


class DataProcessingParameters(serializers.Serializer):
    dataset = serializers.CharField(help_text="Name of a registered data processor.")

    def validate_dataset(self, value: str) -> str:
        known = sorted(all_processors())
        if value not in known:
            raise serializers.ValidationError(
                f"unknown dataset {value!r}; known datasets: {', '.join(known) or 'none registered'}"
            )
        return value


class DataProcessingExecutor(Executor):
    name = "data_processing"
    label = "Data processing"
    description = "Run a registered data processor (see `dataset`); each validates its own parameters."
    parameters_serializer = DataProcessingParameters
    safe_to_repeat = True

    def validate_parameters(self, parameters: Any) -> dict[str, Any]:
        cleaned = super().validate_parameters(parameters)
        processor = all_processors()[cleaned["dataset"]]
        extra = {key: value for key, value in parameters.items() if key != "dataset"}
        serializer = processor.parameters_serializer(data=extra)
        serializer.is_valid(raise_exception=True)
        unknown = sorted(set(extra) - set(serializer.fields))
        if unknown:
            raise serializers.ValidationError(dict.fromkeys(unknown, "unknown parameter for this dataset"))
        return {"dataset": cleaned["dataset"], **serializer.validated_data}

    def parameters_schema(self) -> dict[str, Any]:
        from jobs.json_schema import serializer_schema

        variants = []
        for name, processor in sorted(all_processors().items()):
            variant = serializer_schema(processor.parameters_serializer())
            variant["properties"] = {
                "dataset": {"const": name, "description": processor.description},
                **variant["properties"],
            }
            variant["required"] = ["dataset", *variant.get("required", [])]
            variants.append(variant)
        return (
            {"type": "object", "required": ["dataset"], "oneOf": variants} if variants else super().parameters_schema()
        )

    def execute(self, run: JobRun) -> Any:
        params = self.parameters_for(run)
        processor = all_processors()[params.pop("dataset")]
        return processor.process(run, params)

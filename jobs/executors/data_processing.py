"""data_processing: run a registered data processor named by the `dataset` parameter."""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING, Any, ClassVar

from django.core.signals import setting_changed
from django.dispatch import receiver
from rest_framework import serializers

from .base import Executor, RegistryError

if TYPE_CHECKING:
    from jobs.models import Job, JobRun

# The processors this project ships; apps add theirs with JOBS["DATA_PROCESSORS"].
BUILTIN_PROCESSORS: list[str] = [
    "jobs.processors.database_backup.DatabaseBackup",
    "jobs.processors.model_export.ModelExport",
]


class DataProcessor:
    """Work on data that an app registers under a dataset name.

    Subclasses set `name` (the `dataset` value), `description` and `parameters_serializer`
    (for the job's other parameters), and implement `process(run, params)`, which gets the
    validated parameters (without `dataset`) and returns a JSON-serialisable result. Raise
    ExecutorError for failures people should read. Set `safe_to_repeat = False` when running
    twice for one fire would do harm.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    parameters_serializer: ClassVar[type[serializers.Serializer]] = serializers.Serializer
    safe_to_repeat: ClassVar[bool] = True

    def process(self, run: JobRun, params: dict[str, Any]) -> Any:
        raise NotImplementedError


@cache
def all_processors() -> dict[str, DataProcessor]:
    """Return every registered data processor by dataset name; raise RegistryError when one is broken."""
    from jobs.conf import get

    from . import _instantiate, load_class

    paths = get("DATA_PROCESSORS")
    if isinstance(paths, str) or not isinstance(paths, (list, tuple)):
        raise RegistryError("JOBS['DATA_PROCESSORS'] must be a list of dotted paths")
    registry: dict[str, DataProcessor] = {}
    for path in [*BUILTIN_PROCESSORS, *paths]:
        cls = load_class(path, DataProcessor, "process", "data processor")
        if cls.name in registry:
            raise RegistryError(f"{path!r} reuses the dataset name {cls.name!r}")
        registry[cls.name] = _instantiate(cls, path)
    return registry


@receiver(setting_changed)
def _reset(setting: str, **kwargs: object) -> None:
    if setting == "JOBS":
        all_processors.cache_clear()


class DataProcessingParameters(serializers.Serializer):
    dataset = serializers.CharField(help_text="Name of a registered data processor; see GET /job-types.")

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
    description = (
        "Run a registered data processor (see `dataset`): database backups, model exports, or your own; "
        "each validates its own parameters."
    )
    parameters_serializer = DataProcessingParameters
    safe_to_repeat = True

    def validate_parameters(self, parameters: Any) -> dict[str, Any]:
        if parameters is None:
            parameters = {}
        if not isinstance(parameters, dict):
            raise serializers.ValidationError("must be a JSON object")
        chooser = DataProcessingParameters(data={key: parameters[key] for key in ("dataset",) if key in parameters})
        chooser.is_valid(raise_exception=True)
        dataset = chooser.validated_data["dataset"]
        processor = all_processors()[dataset]
        extra = {key: value for key, value in parameters.items() if key != "dataset"}
        serializer = processor.parameters_serializer(data=extra)
        serializer.is_valid(raise_exception=True)
        unknown = sorted(set(extra) - set(serializer.fields))
        if unknown:
            raise serializers.ValidationError(dict.fromkeys(unknown, f"unknown parameter for dataset {dataset!r}"))
        return {"dataset": dataset, **serializer.validated_data}

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

    def is_safe_to_repeat(self, job: Job) -> bool:
        dataset = job.parameters.get("dataset") if isinstance(job.parameters, dict) else None
        processor = all_processors().get(dataset) if isinstance(dataset, str) else None
        return processor.safe_to_repeat if processor is not None else False

    def execute(self, run: JobRun) -> Any:
        params = self.parameters_for(run)
        processor = all_processors()[params.pop("dataset")]
        return processor.process(run, params)

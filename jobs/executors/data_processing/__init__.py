"""data_processing: run a registered data processor named by the `dataset` parameter.

The processors this project ships are the other modules of this package, one each
(`outputs` is what they share); apps add theirs with JOBS["DATA_PROCESSORS"].
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from rest_framework import serializers

from ..base import Executor, ExecutorError
from ..registry import Registry

if TYPE_CHECKING:
    from jobs.models import Job, JobRun

BUILTIN_PROCESSORS: list[str] = [
    "jobs.executors.data_processing.database_backup.DatabaseBackup",
    "jobs.executors.data_processing.model_export.ModelExport",
]


class DataProcessor:
    """Work on data that an app registers under a dataset name.

    Subclasses set `name` (the `dataset` value), `description` and `parameters_serializer`
    (for the job's other parameters), and implement `process(run, params)`, which gets the
    validated parameters (without `dataset`) and returns a JSON-serialisable result. Raise
    ExecutorError for failures people should read. Bound every wait and every long loop by
    `jobs.executors.base.seconds_left(run)`, which raises RunTimedOut at the run's deadline.
    Set `safe_to_repeat = False` when running twice for one fire would do harm. Override
    `check_permission(user, params)` when scheduling it needs more than the right to add jobs.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    parameters_serializer: ClassVar[type[serializers.Serializer]] = serializers.Serializer
    safe_to_repeat: ClassVar[bool] = True

    def check_permission(self, user: Any, params: dict[str, Any]) -> None:
        """Refuse (serializers.ValidationError) validated `params` that `user` may not schedule; default: allow.

        Called when a person creates or changes a job through the API or the admin, with the
        parameters as `process` gets them (without `dataset`).
        """

    def process(self, run: JobRun, params: dict[str, Any]) -> Any:
        raise NotImplementedError


PROCESSORS: Registry[DataProcessor] = Registry(
    DataProcessor, "process", "DATA_PROCESSORS", BUILTIN_PROCESSORS, kind="data processor", name_label="dataset name"
)


def all_processors() -> dict[str, DataProcessor]:
    """Return every registered data processor by dataset name; raise RegistryError when one is broken."""
    return PROCESSORS.all()


def _known_datasets() -> str:
    return ", ".join(sorted(all_processors())) or "none registered"


class DataProcessingParameters(serializers.Serializer):
    dataset = serializers.CharField(
        max_length=100, help_text="Name of a registered data processor; see GET /job-types."
    )

    def validate_dataset(self, value: str) -> str:
        if value not in all_processors():
            raise serializers.ValidationError(f"unknown dataset {value!r}; known datasets: {_known_datasets()}")
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
    # An export rather than a backup: backups need a permission of their own.
    parameters_example = {
        "dataset": "model_export",
        "model": "jobs.JobRun",
        "fields": ["id", "job", "status", "scheduled_for", "error"],
        "time_field": "scheduled_for",
        "window_seconds": 86400,
        "compress": True,
        "keep": 30,
    }

    def validate_parameters(self, parameters: Any) -> dict[str, Any]:
        return self._validate(parameters, context={})

    def parameters_for(self, run: JobRun) -> dict[str, Any]:
        # A processor may skip checks that the run itself is about to make (model_export's EXPLAIN).
        return self._validate(run.job.parameters, context={"run": run})

    def _validate(self, parameters: Any, *, context: dict[str, Any]) -> dict[str, Any]:
        if parameters is None:
            parameters = {}
        if not isinstance(parameters, dict):
            raise serializers.ValidationError("must be a JSON object")
        chooser = DataProcessingParameters(data={key: parameters[key] for key in ("dataset",) if key in parameters})
        if not chooser.is_valid():
            # Missing, null or not text: answer as for an unknown name, with the names that work.
            messages = [str(message) for message in chooser.errors.get("dataset", [])]
            raise serializers.ValidationError(
                {
                    "dataset": [
                        message
                        if "known datasets:" in message
                        else f"{message[:1].lower()}{message[1:].rstrip('.')}; known datasets: {_known_datasets()}"
                        for message in messages
                    ]
                }
            )
        dataset = chooser.validated_data["dataset"]
        processor = all_processors()[dataset]
        extra = {key: value for key, value in parameters.items() if key != "dataset"}
        serializer = processor.parameters_serializer(data=extra, context=context)
        serializer.is_valid(raise_exception=True)
        unknown = sorted(set(extra) - set(serializer.fields))
        if unknown:
            raise serializers.ValidationError(dict.fromkeys(unknown, f"unknown parameter for dataset {dataset!r}"))
        return {"dataset": dataset, **serializer.validated_data}

    def check_permission(self, user: Any, parameters: dict[str, Any]) -> None:
        """Ask the chosen processor whether `user` may schedule it with these (cleaned) parameters."""
        processor = all_processors().get(parameters.get("dataset", ""))
        if processor is not None:
            processor.check_permission(user, {key: value for key, value in parameters.items() if key != "dataset"})

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
        try:
            params = self.parameters_for(run)
        except serializers.ValidationError as exc:
            # Settings or files changed since the job was saved (a directory now a symlink out, say).
            raise ExecutorError(f"the job's parameters are no longer accepted: {_messages(exc.detail)}") from exc
        processor = all_processors()[params.pop("dataset")]
        return processor.process(run, params)


def _messages(detail: Any) -> str:
    """Join a DRF error detail into one line: "field: message; field: message"."""
    if isinstance(detail, dict):
        return "; ".join(f"{key}: {_messages(value)}" for key, value in detail.items())
    if isinstance(detail, list):
        return "; ".join(_messages(value) for value in detail)
    return str(detail)

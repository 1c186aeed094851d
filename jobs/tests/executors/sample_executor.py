"""A job type from another app: write a message to the log (the worked example in the README)."""

from __future__ import annotations

import logging
from typing import Any

from rest_framework import serializers

from jobs.executors import Executor

logger = logging.getLogger("jobs.sample")


class LogMessageParameters(serializers.Serializer):
    message = serializers.CharField(max_length=500, help_text="Django template syntax is not applied here.")
    level = serializers.ChoiceField(choices=["debug", "info", "warning", "error"], default="info")


class LogMessageExecutor(Executor):
    name = "log_message"
    label = "Log a message"
    description = "Write a line to the scheduler's log, e.g. as a heartbeat that log alerts watch for."
    parameters_serializer = LogMessageParameters
    safe_to_repeat = True  # a second log line harms nobody

    def execute(self, run: Any) -> dict[str, Any]:
        params = self.parameters_for(run)
        logger.log(logging.getLevelName(params["level"].upper()), "%s (job %s)", params["message"], run.job_id)
        return {"logged": params["message"], "level": params["level"]}

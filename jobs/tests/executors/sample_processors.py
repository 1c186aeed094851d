"""A data processor from another app: the commonest words in job names (the example in the README)."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from rest_framework import serializers

from jobs.executors.data_processing import DataProcessor
from jobs.models import Job


class WordCountParameters(serializers.Serializer):
    field = serializers.ChoiceField(choices=["name", "description"], default="name")
    top = serializers.IntegerField(min_value=1, max_value=50, default=5)


class WordCount(DataProcessor):
    name = "word_count"
    description = "Count the words in every job's name or description; return the most common."
    parameters_serializer = WordCountParameters
    safe_to_repeat = True

    def process(self, run: Any, params: dict[str, Any]) -> dict[str, Any]:
        counts: Counter[str] = Counter()
        for text in Job.objects.values_list(params["field"], flat=True).iterator():
            counts.update(re.findall(r"\w+", text.lower()))
        return {"words": sum(counts.values()), "top": counts.most_common(params["top"])}

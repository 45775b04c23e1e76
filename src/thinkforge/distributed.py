"""What the one-pod launcher (:mod:`thinkforge.launch`) and the multi-node job (:mod:`thinkforge.trainjob`)
share: the training stages' names, the shipped DeepSpeed config names and the JSON form of a
:class:`~thinkforge.stages.train.TrainResult`.

Imports point one way: ``launch`` -> ``trainjob`` -> ``distributed`` (and ``launch`` -> ``distributed``);
neither this module nor ``trainjob`` imports ``launch``.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from thinkforge.stages.train import TrainResult

STAGES = ("midtrain", "sft", "dpo", "rl")
DEEPSPEED_NAMES = ("zero2", "zero3")
IMAGE_RECIPES = "/app/recipes"  # the image's WORKDIR /app holds the recipes (docker/)


def result_to_json(result: TrainResult) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(result), default=str))


def result_from_json(data: dict[str, Any]) -> TrainResult:
    return TrainResult(**data)


def image_deepspeed_config(spec: str) -> str:
    """The DeepSpeed config a job's pods use, as a path inside the image: ``""`` for none,
    ``/app/recipes/deepspeed/<name>.json`` for a shipped name, else the path as given."""
    if not spec or spec == "none":
        return ""
    if spec in DEEPSPEED_NAMES:
        return f"{IMAGE_RECIPES}/deepspeed/{spec}.json"
    return spec

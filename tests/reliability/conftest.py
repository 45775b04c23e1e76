"""Shared setup of the reliability suite: a tiny student and its data, recipes for the real stage
functions, object-storage credentials in the environment.

The student is ``tests/tiny_models.py``'s random Llama with a 400-token tokenizer trained on the
word problems, so a real SFT step costs milliseconds and a stage run a few seconds on 2 cores.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from reliability_helpers import MAX_STEPS, ROOT, SAVE_STEPS


@dataclass
class Tiny:
    """A tiny student, its SFT data and a recipe whose SFT stage trains it for MAX_STEPS steps."""

    model: Path
    data: Path
    recipe: Any
    problems: list[dict[str, Any]]
    root: Path


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    from thinkforge.config import load_recipe
    from thinkforge.records import write_jsonl
    from thinkforge.sources import load_problems
    from thinkforge.templates import system_message
    from tiny_models import tiny_model_dir, word_problem_texts

    d = tmp_path_factory.mktemp("tiny")
    problems = load_problems("builtin:word-problems?split=train&n=16&solutions=1")
    test = load_problems("builtin:word-problems?split=test&n=12")
    recipe = load_recipe(ROOT / "recipes" / "smoke.yaml", {
        "sft.max_steps": MAX_STEPS, "sft.batch_size": 4, "sft.learning_rate": 3e-3, "sft.warmup_ratio": 0.0,
        "sft.save_steps": SAVE_STEPS, "sft.keep_checkpoints": 2, "sft.logging_steps": 1,
        "storage.secure": False,
    })
    texts = word_problem_texts(problems + test, system_message(recipe.template))
    model = tiny_model_dir(d / "student", texts, vocab_size=400)
    data = d / "sft.jsonl"
    write_jsonl(data, [{"problem_id": p["id"], "problem": p["problem"], "completion": p["completion"]}
                       for p in problems])
    return Tiny(model=model, data=data, recipe=recipe, problems=problems, root=d)


@pytest.fixture
def s3_credentials(s3_server: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The fixture server's credentials in the environment, as a stage pod gets them from its Secret;
    the endpoint comes from each test's recipe (``THINKFORGE_S3_ENDPOINT`` unset), with short backoff."""
    monkeypatch.delenv("THINKFORGE_S3_ENDPOINT", raising=False)
    monkeypatch.delenv("THINKFORGE_CHECKPOINT_PREFIX", raising=False)
    monkeypatch.setenv("THINKFORGE_S3_ACCESS_KEY", s3_server.access_key)
    monkeypatch.setenv("THINKFORGE_S3_SECRET_KEY", s3_server.secret_key)
    monkeypatch.setenv("THINKFORGE_S3_SECURE", "false")
    monkeypatch.setenv("THINKFORGE_S3_RETRIES", "4")
    monkeypatch.setenv("THINKFORGE_S3_BACKOFF", "0.05")
    return s3_server


@pytest.fixture
def bucket(object_store: Any) -> Any:
    """A fresh bucket on the fixture server (the s3 plugin's ObjectStore, talking to the server directly)."""
    return object_store

"""The model folder a user downloads (issue 16): Hugging Face tools understand it as it is.

- its chat template adds the recipe's system message, so a server prompting ``[user]`` prompts exactly as
  training did;
- its ``generation_config.json`` samples the way it was evaluated and stops at the end of turn;
- it holds only the model (no Trainer checkpoints, optimizer states, ``training_args.bin``, pickles);
- published, it carries ``README.md``, a model card ``huggingface_hub`` parses, with every result and
  its protocol in the ``model-index``; it loads with plain transformers and samples with that config.
"""

from __future__ import annotations

import json
from fnmatch import fnmatch
from pathlib import Path

import pytest

from thinkforge.config import load_recipe
from thinkforge.records import write_jsonl
from thinkforge.sources import load_problems
from thinkforge.templates import end_of_turn, render_prompt, system_message, with_default_system
from tiny_models import small_tokenizer, tiny_model_dir, word_problem_texts

SMOKE = Path(__file__).resolve().parents[1] / "recipes" / "smoke.yaml"
#: what a downloaded model folder may hold
MODEL_FILES = ("*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "README.md")
PROBLEM = "Tom has 3 apples and buys 4 more. How many apples does he have?"


def recipe(**overrides):
    return load_recipe(SMOKE, overrides)


def listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.name != "_MANIFEST.json")


def assert_only_the_model(folder: Path) -> None:
    names = listing(folder)
    assert names and "model.safetensors" in names, names
    stray = [n for n in names if "/" in n or not any(fnmatch(n, pat) for pat in MODEL_FILES)]
    assert not stray, f"not the model: {stray}"


def load_saved_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


# ------------------------------------------------------------------------------- template, protocol


def test_saved_chat_template_prompts_a_user_only_conversation_exactly_as_training(tmp_path):
    cfg = recipe(**{"template.system_prompt": 'Solve it. Say "done" \\boxed{x} — café'})
    texts = word_problem_texts([{"problem": PROBLEM}], system_message(cfg.template))
    tok = small_tokenizer(texts)
    folder = tiny_model_dir(tmp_path / "plain", texts)
    from thinkforge.models import load_model, save_model

    save_model(load_model(folder), tok, tmp_path / "saved", cfg=cfg)
    saved = load_saved_tokenizer(tmp_path / "saved")
    training = render_prompt(tok, PROBLEM, cfg.template)
    assert saved.apply_chat_template([{"role": "user", "content": PROBLEM}], tokenize=False,
                                     add_generation_prompt=True) == training
    assert system_message(cfg.template) in training
    # a caller that brings the system message (every thinkforge stage) renders as before
    assert render_prompt(saved, PROBLEM, cfg.template) == training
    other = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": PROBLEM}]
    assert saved.apply_chat_template(other, tokenize=False) == tok.apply_chat_template(other, tokenize=False)
    # the end of turn the targets close with is unchanged, and wrapping twice is wrapping once
    assert end_of_turn(saved) == end_of_turn(tok) == "<|im_end|>"
    assert with_default_system(saved.chat_template, cfg.template) == saved.chat_template


def test_generation_config_carries_the_evaluation_protocol_and_the_end_of_turn(tmp_path):
    from transformers import GenerationConfig

    from thinkforge.models import load_model, save_model

    cfg = recipe(**{"evaluate.temperature": 0.7, "evaluate.top_p": 0.9, "evaluate.max_new_tokens": 77})
    texts = word_problem_texts([{"problem": PROBLEM}], system_message(cfg.template))
    folder = tiny_model_dir(tmp_path / "plain", texts)
    tok = small_tokenizer(texts)
    tok.eos_token = "<|pad|>"  # an eos the chat template never writes after a turn (Phi-4-mini's shape)
    save_model(load_model(folder), tok, tmp_path / "saved", cfg=cfg)
    gen = GenerationConfig.from_pretrained(str(tmp_path / "saved"))
    assert gen.do_sample is True and gen.temperature == 0.7 and gen.top_p == 0.9 and gen.max_new_tokens == 77
    eot, eos = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|pad|>")
    assert gen.eos_token_id[0] == eot and eos in gen.eos_token_id

    greedy = recipe(**{"evaluate.temperature": 0.0})
    save_model(load_model(folder), tok, tmp_path / "greedy", cfg=greedy)
    raw = json.loads((tmp_path / "greedy" / "generation_config.json").read_text())
    assert raw["do_sample"] is False and "temperature" not in raw and "top_p" not in raw


# --------------------------------------------------------------------- a trained stage, then publish


@pytest.fixture(scope="module")
def s3_env(s3_server):
    with s3_server.environment():
        yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory, s3_server, s3_env):
    """A tiny model after SFT with periodic checkpoints (saved under <out>/trainer, uploaded to S3)."""
    from thinkforge.stages.sft import sft

    d = tmp_path_factory.mktemp("folder")
    store = s3_server.store()
    problems = load_problems("builtin:word-problems?split=train&n=8&solutions=1")
    cfg = recipe(**{"sft.max_steps": 4, "sft.batch_size": 4, "sft.save_steps": 2, "sft.keep_checkpoints": 2,
                    "storage.endpoint": s3_server.endpoint, "storage.secure": False, "storage.bucket": store.bucket})
    base = tiny_model_dir(d / "tiny", word_problem_texts(problems, system_message(cfg.template)), vocab_size=400)
    write_jsonl(d / "sft.jsonl", [{"problem_id": p["id"], "problem": p["problem"], "completion": p["completion"]}
                                  for p in problems])
    saves = []
    import transformers

    real = transformers.Trainer._save_checkpoint

    def spy(self, *a, **kw):
        real(self, *a, **kw)
        saves.append(sorted(p.name for p in Path(self.args.output_dir).glob("checkpoint-*")))

    transformers.Trainer._save_checkpoint = spy
    try:
        result = sft(cfg, base, d / "sft.jsonl", d / "sft")
    finally:
        transformers.Trainer._save_checkpoint = real
    yield cfg, d / "sft", result, saves, problems
    s3_server.drop_bucket(store.bucket)


@pytest.mark.slow
def test_a_trained_stage_leaves_only_the_model(trained):
    cfg, out, result, saves, _ = trained
    assert saves and saves[-1], "the run saved no local checkpoint: the test would prove nothing"
    assert result.extra["checkpoint_prefix"]
    assert_only_the_model(out)
    assert not (out / "trainer").exists() and not (out / "training_args.bin").exists()
    gen = json.loads((out / "generation_config.json").read_text())  # the recipe reached finish() through fit()
    assert gen["max_new_tokens"] == cfg.evaluate.max_new_tokens and gen["temperature"] == cfg.evaluate.temperature


def _results(cfg, value):
    from thinkforge.stages.evaluate import protocol

    return {"label": "final", "model": "m", "protocol": protocol(cfg),
            "benchmark_specs": {"gsm8k": {"dataset": "gsm8k", "source": "hf:openai/gsm8k:test?config=main",
                                          "answer_type": "math", "k": 4, "limit": 8, "n_problems": 8}},
            "benchmarks": {"gsm8k": {"n_problems": 8, "k": 4, "pass@1": value, "pass@1_se": 0.05, "cons@4": value,
                                     "pass@4": min(1.0, value + 0.25), "mean_tokens": 40.0, "truncation_rate": 0.1,
                                     "per_problem": {f"p{i}": value for i in range(8)}}}}


@pytest.mark.slow
def test_the_published_folder_loads_samples_as_evaluated_and_its_card_lists_the_results(trained, tmp_path):
    import torch
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from thinkforge.cards import strip_metadata
    from thinkforge.registry import LocalBackend, Registry, publish

    cfg, out, _, _, problems = trained
    # leftovers a stage of another kind might still leave: the publish drops them too
    (out / "trainer" / "checkpoint-9").mkdir(parents=True)
    (out / "trainer" / "checkpoint-9" / "optimizer.pt").write_bytes(b"pickle")
    (out / "training_args.bin").write_bytes(b"pickle")
    try:
        backend = LocalBackend(tmp_path / "registry")
        cfg = cfg.model_copy(update={"registry": cfg.registry.model_copy(update={"name": "tiny-math"})})
        res = {"base": {**_results(cfg, 0.25), "label": "base"}, "final": _results(cfg, 0.5)}
        decision = publish(cfg, out, res, kfp_run="run-1", backend=backend)
    finally:
        import shutil

        shutil.rmtree(out / "trainer")
        (out / "training_args.bin").unlink()
    assert decision["published"]
    folder = Registry.for_recipe(cfg, backend).fetch_model(tmp_path / "download", decision["version"])
    assert_only_the_model(folder)
    assert (folder / "README.md").is_file() and (folder / "generation_config.json").is_file()

    # plain transformers: loads, prompts like training, samples with the recorded config
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    g = model.generation_config
    assert g.do_sample and g.temperature == cfg.evaluate.temperature and g.top_p == cfg.evaluate.top_p
    assert g.max_new_tokens == cfg.evaluate.max_new_tokens
    assert tok.convert_tokens_to_ids("<|im_end|>") in ([g.eos_token_id] if isinstance(g.eos_token_id, int)
                                                        else g.eos_token_id)
    problem = problems[0]["problem"]
    prompt = tok.apply_chat_template([{"role": "user", "content": problem}], tokenize=False, add_generation_prompt=True)
    assert prompt == render_prompt(tok, problem, cfg.template) and system_message(cfg.template) in prompt
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    outs = set()
    for seed in range(4):
        torch.manual_seed(seed)
        new = model.generate(**ids, max_new_tokens=8)[0, ids["input_ids"].shape[1]:]
        outs.add(tuple(new.tolist()))
    assert len(outs) > 1, "four seeds, one completion: the folder samples greedily"

    # the card: huggingface_hub parses it; every result with its protocol is in the model-index
    card = ModelCard.load(folder / "README.md")
    assert card.data.model_name == "tiny-math" and "thinkforge" in card.data.tags and "sft" in card.data.tags
    assert card.data.license
    by_metric = {r.metric_type: r for r in card.data.eval_results}
    assert set(by_metric) == {"pass@1", "cons@4", "pass@4"}
    r = by_metric["pass@1"]
    assert r.dataset_type == "openai/gsm8k" and r.dataset_split == "test" and r.dataset_config == "main"
    assert r.metric_value == 50.0
    assert r.metric_args == {"k": 4, "temperature": cfg.evaluate.temperature, "top_p": cfg.evaluate.top_p,
                             "max_new_tokens": cfg.evaluate.max_new_tokens, "extraction": cfg.evaluate.extraction,
                             "seed": cfg.run.seed, "n_problems": 8}
    assert "| gsm8k | 8 | 4 | 50.0% ± 5.0 |" in card.text and "| base | 25.0% |" in card.text

    # the registry's card is the same card with the model's digest; KFP's Markdown shows it without YAML
    entry = ModelCard(decision["card"])
    assert entry.data.eval_results and "digest `" in entry.text
    assert not strip_metadata(decision["card"]).startswith("---") and "# tiny-math" in strip_metadata(decision["card"])

    # a retry of the same KFP run finds the same complete folder: nothing uploaded twice
    again = publish(cfg, out, res, kfp_run="run-1", backend=backend)
    assert again["version"] == decision["version"]


# ------------------------------------------------------------------------ the filter's exported sets


def test_filter_exports_trl_formats_with_dataset_cards(tmp_path):
    from datasets import load_dataset
    from huggingface_hub import DatasetCard
    from trl.data_utils import is_conversational

    from test_filter import BENCH, EXTRA, rollouts
    from thinkforge.records import read_jsonl
    from thinkforge.stages.filter import filter_rollouts

    write_jsonl(tmp_path / "bench.jsonl", BENCH)
    write_jsonl(tmp_path / "extra.jsonl", EXTRA)
    write_jsonl(tmp_path / "rollouts.jsonl", rollouts())
    bench = [{"name": "mini", "source": str(tmp_path / "bench.jsonl")}]
    cfg = recipe(**{"template.think": True, "evaluate.benchmarks": bench,
                    "filter.decontaminate_extra": [str(tmp_path / "extra.jsonl")], "filter.max_completion_tokens": 100,
                    "filter.dpo_pairs_per_prompt": 2})
    result = filter_rollouts(cfg, tmp_path / "rollouts.jsonl", tmp_path / "out")
    hf = tmp_path / "out" / "hf"
    system = {"role": "system", "content": system_message(cfg.template)}
    for name, n, columns in (("sft", result.sft, {"problem_id", "messages"}),
                             ("dpo", result.dpo_pairs, {"problem_id", "prompt", "chosen", "rejected"}),
                             ("rl", result.rl_prompts, {"problem_id", "prompt", "answer", "answer_type", "pass_rate"})):
        ds = load_dataset("json", data_files=str(hf / name / "data.jsonl"), split="train")
        assert len(ds) == n > 0 and set(ds.column_names) == columns, (name, ds.column_names)
        assert is_conversational(ds[0])
        first = ds[0]["messages" if name == "sft" else "prompt"]
        assert first[0] == system and first[1]["role"] == "user"
        card = DatasetCard.load(hf / name / "README.md")
        meta = card.data.to_dict()["thinkforge"]
        assert meta["counts"][name] == n and meta["counts"]["rollouts"] == result.rollouts
        assert meta["decontamination"]["contaminated_problems"] == result.contamination and result.contamination
        assert meta["decontamination"]["contaminated_rollouts"] == result.counts["contaminated"]
    # the flat files the stages read keep their fields
    assert set(read_jsonl(tmp_path / "out" / "sft.jsonl")[0]) - {"v"} == {"problem_id", "problem", "completion"}

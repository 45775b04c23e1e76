"""Model and dataset cards in the Hugging Face format (`huggingface_hub`'s ModelCard / ModelCardData /
EvalResult, DatasetCard): YAML metadata a hub, `huggingface_hub.ModelCard.load` or a model browser reads
(`base_model`, `datasets`, `tags`, `license`, `model-index` with every benchmark result and the protocol
it was measured under), then the Markdown a person reads.

The registry writes the card twice: `MODEL_CARD.md` beside the entry (with the model's file digest) and
`model/README.md` inside the published model folder (without it: a folder cannot hold its own digest).
"""

from __future__ import annotations

from typing import Any

from huggingface_hub import DatasetCard, DatasetCardData, EvalResult, ModelCard, ModelCardData

from thinkforge.scoring import metrics_only

STAGES = (("mid-train", "midtrain"), ("SFT", "sft"), ("DPO", "dpo"), ("RL", "rl"))
STAGE_LABELS = ("base", "midtrain", "sft", "dpo", "final")
#: the hub names of the models thinkforge builds in, and their licenses
BUILTIN_BASES = {"builtin:smollm2-135m-instruct": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def hub_dataset(source: str) -> tuple[str, str | None, str | None] | None:
    """(repo id, split, config) of an `hf:owner/name:split?config=c` source; None for anything else."""
    if not source.startswith("hf:"):
        return None
    body, _, query = source.removeprefix("hf:").partition("?")
    repo, _, split = body.partition(":")
    config = dict(p.partition("=")[::2] for p in query.split("&") if p).get("config") or None
    return repo, split or None, config


def base_model(student: str) -> tuple[str | None, str]:
    """(hub id or None, license) of the model training started from."""
    if student in BUILTIN_BASES:
        return BUILTIN_BASES[student]
    if student.startswith("random:"):
        return None, "apache-2.0"  # random weights; the SmolLM2 tokenizer (Apache-2.0)
    if student.startswith(("s3://", "minio://", "/", ".", "~")) or student.count("/") != 1:
        return None, "other"
    return student, "other"


def eval_results(cfg: Any, final: dict[str, Any] | None) -> list[EvalResult]:
    """One EvalResult per benchmark and metric of the final evaluation, each with its protocol
    (k, temperature, top_p, max new tokens, extraction, seed) in `metric_args`. Values in percent."""
    final = final or {}
    proto = final.get("protocol") or {}
    specs = final.get("benchmark_specs") or {}
    out: list[EvalResult] = []
    for bench, m in metrics_only(final).items():
        spec = specs.get(bench, {})
        hub = hub_dataset(str(spec.get("source") or ""))
        args = {"k": m.get("k"), "temperature": proto.get("temperature", cfg.evaluate.temperature),
                "top_p": proto.get("top_p", cfg.evaluate.top_p),
                "max_new_tokens": proto.get("max_new_tokens", cfg.evaluate.max_new_tokens),
                "extraction": proto.get("extraction", cfg.evaluate.extraction),
                "seed": proto.get("seed", cfg.run.seed), "n_problems": m.get("n_problems")}
        metric_names = ["pass@1", f"cons@{m.get('k')}"] + sorted(
            k for k in m if k.startswith("pass@") and k[5:].isdigit() and k != "pass@1")
        for metric in metric_names:
            value = m.get(metric)
            if not isinstance(value, (int, float)):
                continue
            out.append(EvalResult(
                task_type="text-generation", task_name="math reasoning",
                dataset_type=hub[0] if hub else bench, dataset_name=bench,
                dataset_split=hub[1] if hub else None, dataset_config=hub[2] if hub else None,
                dataset_args={"source": spec["source"]} if spec.get("source") else None,
                metric_type=metric, metric_name=f"{metric} (%)", metric_value=round(100 * float(value), 2),
                metric_args=dict(args)))
    return out


def card_data(cfg: Any, name: str, results: dict[str, dict[str, Any]]) -> ModelCardData:
    base, license_ = base_model(cfg.model.student)
    datasets = [h[0] for h in (hub_dataset(cfg.data.train),) if h]
    stages = [label for label, key in STAGES if getattr(cfg, key).enabled]
    return ModelCardData(
        model_name=name, base_model=base, datasets=datasets or None, license=license_,
        license_name="same-as-base-model" if license_ == "other" else None,
        library_name="transformers", pipeline_tag="text-generation", language=["en"],
        tags=["thinkforge", "math", "reasoning", "distillation", *(s.lower() for s in stages)],
        eval_results=eval_results(cfg, results.get("final")) or None,
    )


def card_body(cfg: Any, name: str, version: str, results: dict[str, dict[str, Any]],
              model_info: dict[str, Any] | None, lin: dict[str, Any], in_model_folder: bool = False) -> str:
    e = cfg.evaluate
    final = results.get("final") or {}
    lines = [f"# {name} {version}", "",
             f"A math reasoning model trained by thinkforge (recipe `{cfg.run.name}`, config {cfg.digest()}) from "
             f"`{cfg.model.student}` with the Phi-4-Mini-Reasoning recipe: "
             + ", ".join(label for label, key in STAGES if getattr(cfg, key).enabled) + ".", "",
             "## Evaluation", "",
             f"Protocol: temperature {e.temperature}, top_p {e.top_p}, max {e.max_new_tokens} new tokens, seed "
             f"{cfg.run.seed}, answer extraction {e.extraction}; pass@1 is the mean over k samples per problem "
             "(± standard error over problems).", "",
             "| benchmark | problems | k | pass@1 | cons@k | mean tokens | truncated |", "|---|---|---|---|---|---|---|"]
    for bench, m in metrics_only(final).items():
        cons = m.get(f"cons@{m.get('k')}")
        lines.append(f"| {bench} | {m.get('n_problems')} | {m.get('k')} | {_pct(m.get('pass@1'))} ± "
                     f"{100 * m.get('pass@1_se', 0):.1f} | {_pct(cons)} | "
                     f"{m.get('mean_tokens', 0):.0f} | {_pct(m.get('truncation_rate'))} |")
    stages = [(lbl, results[lbl]) for lbl in STAGE_LABELS if results.get(lbl)]
    if len(stages) > 1:
        benches = list(metrics_only(final))
        lines += ["", "By stage (pass@1):", "", "| model | " + " | ".join(benches) + " |",
                  "|---|" + "---|" * len(benches)]
        for lbl, res in stages:
            ms = metrics_only(res)
            lines.append(f"| {lbl} | " + " | ".join(_pct(ms.get(b, {}).get("pass@1")) for b in benches) + " |")
    lines += ["", "## Lineage", "",
              f"- config digest: `{lin['config_digest']}`" + (f"; KFP run `{lin['kfp_run']}`" if lin.get("kfp_run") else ""),
              f"- student: `{lin['sources']['student']}`; teacher: `{lin['sources']['teacher'] or '-'}`",
              f"- training prompts: `{lin['sources']['train']}`"]
    if model_info is not None:
        lines.append(f"- model: {model_info['files']} files, {model_info['total_bytes']} bytes, "
                     f"digest `{model_info['digest']}`")
    where = "this folder" if in_model_folder else "the `model/` directory of this entry"
    lines += ["", "## Use", "",
              f"Load {where} with `transformers.AutoModelForCausalLM.from_pretrained` (or serve it with vLLM). "
              "Its `generation_config.json` samples the way it was evaluated (temperature, top_p, max new "
              "tokens, stopping at the chat template's end of turn) and its chat template adds the recipe's "
              "system message to a conversation that has none, so `[{\"role\": \"user\", \"content\": problem}]` "
              "is prompted exactly as in training (the recipe's `template` section).", ""]
    return "\n".join(lines)


def model_card(cfg: Any, name: str, version: str, results: dict[str, dict[str, Any]],
               model_info: dict[str, Any] | None, lin: dict[str, Any], in_model_folder: bool = False) -> str:
    """The model card's text: YAML metadata (ModelCardData, with a model-index of the final results)
    and the Markdown body. ``model_info`` None leaves the model's digest out (the card inside the folder)."""
    data = card_data(cfg, name, results)
    body = card_body(cfg, name, version, results, model_info, lin, in_model_folder)
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


def strip_metadata(card: str) -> str:
    """The Markdown of a card without its YAML header (for viewers that show Markdown only: KFP's)."""
    if card.startswith("---\n"):
        end = card.find("\n---\n", 4)
        if end >= 0:
            return card[end + 5:].lstrip("\n")
    return card


def dataset_card(title: str, description: str, fmt: str, counts: dict[str, Any],
                 decontamination: dict[str, Any] | None = None, source: str = "", tags: list[str] | None = None) -> str:
    """A dataset card (DatasetCard) for one exported data set: its TRL format, counts and decontamination."""
    data = DatasetCardData(language=["en"], task_categories=["text-generation"], pretty_name=title,
                           tags=["thinkforge", "math", *(tags or [])],
                           thinkforge={"format": fmt, "counts": counts, "decontamination": decontamination or {}})
    lines = [f"# {title}", "", description, "", f"Format: {fmt}.", "", "| count | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in counts.items()]
    if decontamination:
        lines += ["", "## Decontamination", ""] + [f"- {k}: {v}" for k, v in decontamination.items()]
    if source:
        lines += ["", f"Source prompts: `{source}`."]
    return str(DatasetCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"))

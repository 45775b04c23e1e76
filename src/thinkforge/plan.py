"""Preflight: what a recipe books and needs, per stage, before a pod starts (`thinkforge plan`).

:func:`make_plan` reads only the config (no torch, no network): pods, GPUs per pod and processes of each
stage, the memory one GPU needs, the tokens the stage processes and its GPU-hours at a given MFU; and the
contradictions that make a recipe fail on a cluster, each naming the recipe fields to change.
``compile``, ``upload``, ``submit`` and ``schedule`` run it (:func:`preflight`) and refuse such a recipe.

Sizes come from a table of known models (:data:`MODELS`), ``random:<size>`` students, or a local model
directory's ``config.json``. Parameters of a dense decoder (untied head adds ``vocab x hidden``)::

    P = vocab*h + L*(h*(q + 2*kv + q) + 3*h*i + 2*h) + h        q = heads*head_dim, kv = kv_heads*head_dim

Memory per GPU (GiB; N = num_processes x nodes data-parallel ranks, bytes per parameter):

- no DeepSpeed: weights, gradients and AdamW's two moments in model.dtype (fp32: 4 + 4 + 8; the fp32
  weights are the master weights), nothing sharded;
- DeepSpeed with bf16: bf16 weights (2) and gradients (2), fp32 master weights (4) and moments (8). ZeRO-1
  shards the 12 optimizer bytes over N, ZeRO-2 also the gradients, ZeRO-3 also the weights (plus the
  gathered layers it keeps live: ``stage3_max_live_parameters`` x 2 bytes). ZeRO-2 adds its all-gather
  bucket (``allgather_bucket_size`` x 2 bytes x 2);
- activations of one micro-batch (batch_size x max_length tokens; DPO twice that, chosen and rejected; RL
  batch_size x the rollout window): with gradient checkpointing one bf16 hidden state per layer boundary
  plus ~16 for the layer being recomputed, ``tokens x h x 2 x (L + 16)``; without, ``tokens x h x 2 x 16L``.
  The trainers' tiled LM head (TRL) never holds the (tokens x vocab) logits, so they are not counted;
- 2 GiB per GPU for the CUDA context, NCCL and the allocator;
- vLLM (RL colocated with the trainer, and evaluation): ``gpu_memory_utilization`` x the GPU's memory, of
  which its bf16 weights (2 x P / tensor_parallel_size) and ~1 GiB of activations; the rest is KV cache,
  ``2 (K, V) x L x kv_heads x head_dim x 2 bytes`` per token, which must hold one whole window.

Tokens and GPU-hours rest on stated assumptions (printed with the plan, flags to change them): the number
of training prompts (from the source when it says: builtin ``n``, ``?limit=``, data.train_limit, a local
file's lines; else ``--prompts``), a rendered prompt of 256 tokens, generated sequences that fill
``--fill`` of their cap on average, and an accept rate of the filter (``--accept-rate``). FLOPs are
``6 x P`` per trained token and ``2 x P`` per generated or scored token; GPU-hours = FLOPs / (the
accelerator's dense bf16 peak x MFU). The accelerator comes from the stage's node_selector label
``nvidia.com/gpu.product`` (:data:`GPUS`) or ``--gpu-product``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from thinkforge.config import ConfigError, Recipe

GIB = 1024 ** 3
TRAIN_STAGES = ("midtrain", "sft", "dpo", "rl")
PRODUCT_LABEL = "nvidia.com/gpu.product"
PROMPT_TOKENS = 256      # a rendered prompt (system prompt, chat template, problem) on average: token counts
PROMPT_BUDGET = 1024     # the longest rendered prompt: context-window checks of the student's engines
RUNTIME_GIB = 2.0        # CUDA context, NCCL buffers, allocator slack per GPU
VLLM_ACTIVATION_GIB = 1.0
VLLM_DEFAULT_UTILIZATION = 0.9   # evaluation's vLLM engine takes vLLM's default share
DEFAULT_PROMPTS = 1_000_000      # a training set whose size the source does not say (the paper's ~1M)

#: GPUs by their ``nvidia.com/gpu.product`` label (GPU feature discovery): memory (GiB) and dense bf16 peak
#: (TFLOP/s, the vendors' data sheets without sparsity).
GPUS: dict[str, tuple[float, float]] = {
    "NVIDIA-H100-80GB-HBM3": (80, 989),
    "NVIDIA-H100-SXM5-80GB": (80, 989),
    "NVIDIA-H100-NVL": (94, 835),
    "NVIDIA-H100-PCIe": (80, 756),
    "NVIDIA-H200": (141, 989),
    "NVIDIA-H200-141GB-HBM3e": (141, 989),
    "NVIDIA-B200": (180, 2250),
    "NVIDIA-A100-SXM4-80GB": (80, 312),
    "NVIDIA-A100-80GB-PCIe": (80, 312),
    "NVIDIA-A100-SXM4-40GB": (40, 312),
    "NVIDIA-L40S": (48, 362),
    "NVIDIA-L4": (24, 121),
}

#: Known students and teachers: parameters, layers, hidden, intermediate, heads, KV heads, head dim, vocab,
#: context (max_position_embeddings), from their config.json.
MODELS: dict[str, dict[str, Any]] = {
    "microsoft/Phi-4-mini-instruct": dict(params=3.836e9, layers=32, hidden=3072, intermediate=8192, heads=24,
                                          kv_heads=8, head_dim=128, vocab=200_064, context=131_072),
    "microsoft/Phi-4-mini-reasoning": dict(params=3.836e9, layers=32, hidden=3072, intermediate=8192, heads=24,
                                           kv_heads=8, head_dim=128, vocab=200_064, context=131_072),
    "builtin:smollm2-135m-instruct": dict(params=134.5e6, layers=30, hidden=576, intermediate=1536, heads=9,
                                          kv_heads=3, head_dim=64, vocab=49_152, context=8192),
    "HuggingFaceTB/SmolLM2-135M-Instruct": dict(params=134.5e6, layers=30, hidden=576, intermediate=1536, heads=9,
                                                kv_heads=3, head_dim=64, vocab=49_152, context=8192),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": dict(params=7.62e9, layers=28, hidden=3584, intermediate=18944,
                                                    heads=28, kv_heads=4, head_dim=128, vocab=152_064,
                                                    context=131_072),
    # a mixture of experts: 671B parameters, 37B active per token (the FLOPs count the active ones)
    "deepseek-ai/DeepSeek-R1": dict(params=37e9, layers=61, hidden=7168, intermediate=18432, heads=128,
                                    kv_heads=128, head_dim=128, vocab=129_280, context=163_840),
}
#: `random:<size>` students (thinkforge.models.RANDOM_SIZES, SmolLM2's tokenizer, 4096 positions, tied head).
RANDOM = {
    "llama-tiny": dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2),
    "llama-small": dict(hidden=256, intermediate=768, layers=4, heads=4, kv_heads=2),
}
#: Catalog benchmarks (thinkforge.evalsets): problems and default samples per problem.
BENCHMARKS = {"math500": (500, 4), "aime24": (30, 16), "amc23": (40, 8), "gsm8k": (1319, 1),
              "gpqa-diamond": (198, 8)}

#: What the Helm chart assumes (helm/thinkforge; tests/test_plan.py checks these against it): the MinIO
#: volume it creates for each shipped recipe when minio.persistence.size is empty, and its teacher server.
CHART_STORE_GIB = {"cpu-demo.yaml": 10, "smoke.yaml": 1, "phi4-mini-reasoning.yaml": 500}
CHART_TEACHER_SERVICE = "thinkforge-teacher"
CHART_TEACHER_MAX_MODEL_LEN = 36864
CHART_TEACHER_MAX_PROMPT_TOKENS = 4096
ENV_STORE_SIZE = "THINKFORGE_STORE_SIZE"  # the object store's size where no --store-size flag reaches (the chart's Job)


class PlanError(ConfigError):
    """A recipe that cannot work as placed; the message names the fields."""


@dataclass
class Assumptions:
    mfu: float = 0.35
    prompts: int | None = None
    fill: float = 0.5
    accept_rate: float = 0.5
    gpu_product: str = ""
    store_gib: float | None = None
    teacher_max_model_len: int | None = None


@dataclass
class StagePlan:
    stage: str
    pods: int = 1
    gpus: int = 0
    processes: int = 1
    precision: str = ""
    memory: dict[str, float] = field(default_factory=dict)  # GiB per GPU by part
    gpu_gib: float = 0.0
    tokens: str = ""
    gpu_hours: float | None = None
    where: str = ""  # "cpu", "gpu", "endpoint"
    notes: list[str] = field(default_factory=list)

    @property
    def total_gib(self) -> float:
        return sum(self.memory.values())


@dataclass
class Plan:
    source: str
    digest: str
    model_line: str
    accelerator_line: str
    stages: list[StagePlan]
    store_line: str
    assumptions: list[str]
    errors: list[str]

    @property
    def ok(self) -> bool:
        return not self.errors

    def text(self) -> str:
        out = [f"plan for {self.source}", self.model_line, self.accelerator_line, "",
               "| stage | pods x GPUs | processes | precision | memory per GPU, GiB | tokens | GPU-hours |",
               "|---|---|---|---|---|---|---|"]
        for s in self.stages:
            if s.where == "cpu":
                place, mem = f"{s.pods} x CPU", f"{s.total_gib:.2f} (host; no GPU)" if s.memory else "-"
            elif s.where == "endpoint":
                place, mem = "endpoint", "-"
            else:
                parts = " + ".join(f"{k} {v:.1f}" for k, v in s.memory.items())
                place, mem = f"{s.pods} x {s.gpus}", f"**{s.total_gib:.1f}** of {s.gpu_gib:.0f} ({parts})"
            hours = "-" if s.gpu_hours is None else f"{s.gpu_hours:,.0f}" if s.gpu_hours >= 10 else f"{s.gpu_hours:.2f}"
            out.append(f"| {s.stage} | {place} | {s.processes} | {s.precision} | {mem} | {s.tokens} | {hours} |")
        notes = [f"- {s.stage}: {n}" for s in self.stages for n in s.notes]
        if notes:
            out += ["", *notes]
        out += ["", self.store_line, "", "assumptions:", *[f"- {a}" for a in self.assumptions], ""]
        total = sum(s.gpu_hours or 0 for s in self.stages)
        if total:
            out.append(f"total: {total:,.0f} GPU-hours")
        if self.errors:
            out += [f"REFUSED: {len(self.errors)} contradiction(s):", *[f"- {e}" for e in self.errors]]
        else:
            out.append("OK: every stage fits where it is placed")
        return "\n".join(out)


# --- sizes ----------------------------------------------------------------------------------------


def _from_config_json(cfg: dict[str, Any]) -> dict[str, Any]:
    text = cfg.get("text_config", cfg)
    h, layers = int(text["hidden_size"]), int(text["num_hidden_layers"])
    heads = int(text.get("num_attention_heads", 1))
    kv = int(text.get("num_key_value_heads") or heads)
    hd = int(text.get("head_dim") or h // heads)
    inter = int(text.get("intermediate_size", 4 * h))
    vocab = int(text.get("vocab_size", 32000))
    return _with_params(dict(hidden=h, layers=layers, heads=heads, kv_heads=kv, head_dim=hd, intermediate=inter,
                             vocab=vocab, context=int(text.get("max_position_embeddings", 4096))),
                        tied=bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", True))))


def _with_params(m: dict[str, Any], tied: bool = True) -> dict[str, Any]:
    h, q, kv = m["hidden"], m["heads"] * m["head_dim"], m["kv_heads"] * m["head_dim"]
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * m["intermediate"] + 2 * h
    m["params"] = m["vocab"] * h * (1 if tied else 2) + m["layers"] * per_layer + h
    return m


def model_size(spec: str) -> tuple[dict[str, Any] | None, str]:
    """(sizes, where they came from) of a model spec; (None, why) when unknown."""
    if spec in MODELS:
        return dict(MODELS[spec]), "known models table"
    if spec.startswith("random:") and spec[7:] in RANDOM:
        r = RANDOM[spec[7:]]
        return _with_params(dict(r, head_dim=r["hidden"] // r["heads"], vocab=49_152, context=4096)), "random: sizes"
    p = Path(spec) / "config.json"
    if "://" not in spec and p.is_file():
        try:
            return _from_config_json(json.loads(p.read_text())), str(p)
        except (ValueError, KeyError, TypeError) as e:
            return None, f"{p}: unreadable ({e})"
    return None, "not in the known models table and no local config.json"


def _tokens(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:,.3g}{unit}"
    return f"{n:,.0f}"


def _gib(n_bytes: float) -> float:
    return n_bytes / GIB


def _prompts(recipe: Recipe, a: Assumptions) -> tuple[int, str]:
    if a.prompts:
        return a.prompts, "--prompts"
    src = recipe.data.train
    n = None
    how = ""
    query = dict(parse_qsl(urlsplit(src).query)) if "?" in src else {}
    if src.startswith("builtin:word-problems"):
        n, how = int(query.get("n", 400 if query.get("split", "train") == "train" else 60)), "the builtin source's n"
    if "limit" in query:
        n, how = int(query["limit"]) if n is None else min(n, int(query["limit"])), "the source's ?limit="
    path = Path(src.split("?", 1)[0])
    if n is None and "://" not in src and ":" not in src.split("/", 1)[0] and path.is_file() and path.suffix == ".jsonl":
        with path.open("rb") as f:
            n, how = sum(1 for line in f if line.strip()), f"the lines of {path}"
    if n is None:
        n, how = DEFAULT_PROMPTS, f"assumed: {src} does not say (--prompts N)"
    if recipe.data.train_limit and recipe.data.train_limit < n:
        n, how = recipe.data.train_limit, "data.train_limit"
    return n, how


def _ds_config(spec: str) -> dict[str, Any]:
    if not spec or spec == "none":
        return {}
    path = None
    if spec in ("zero2", "zero3"):
        here = Path(__file__).resolve().parents[2] / "recipes" / "deepspeed" / f"{spec}.json"
        for p in (here, Path.cwd() / "recipes" / "deepspeed" / f"{spec}.json"):
            if p.is_file():
                path = p
                break
        if path is None:
            return {"zero_optimization": {"stage": int(spec[-1])}}
    else:
        path = Path(spec)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {"zero_optimization": {"stage": 3}}  # unreadable here: the pod's launcher says why


def _num(value: Any, default: float) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


# --- the plan -------------------------------------------------------------------------------------


def _field(recipe: Recipe, stage: str, name: str) -> str:
    """The cluster field a stage's placement takes `name` from: its own entry, else the defaults."""
    own = recipe.cluster.stages.get(stage)
    if own is not None and name in own.model_fields_set:
        return f"cluster.stages.{stage}.{name}"
    return f"cluster.defaults.{name}"


def _engine_uses_its_gpus(recipe: Recipe, stage: str, engine: str, tensor_parallel: int, gpus: int,
                          errors: list[str]) -> None:
    """A sampling engine uses tensor_parallel_size GPUs (vllm) or one (hf): booking another count wastes them."""
    want = tensor_parallel if engine == "vllm" else 1
    if gpus != want:
        errors.append(f"{_field(recipe, stage, 'gpus')}: {gpus} GPUs booked, but {stage}.engine {engine} uses "
                      f"{want} ({stage}.tensor_parallel_size): make them equal")


def _accelerator(recipe: Recipe, stage: str, a: Assumptions, errors: list[str]) -> tuple[str, float, float]:
    product = a.gpu_product or recipe.cluster.placement(stage).node_selector.get(PRODUCT_LABEL, "")
    if product in GPUS:
        mem, peak = GPUS[product]
        return product, mem, peak
    where = "--gpu-product" if a.gpu_product else f"{_field(recipe, stage, 'node_selector')} {PRODUCT_LABEL}"
    errors.append(f"{stage}: {where}: {product or 'not set'}: the plan does not know this accelerator's memory "
                  f"(known: {', '.join(GPUS)}); set the label or pass --gpu-product")
    return product or "unknown", 0.0, 0.0


def make_plan(recipe: Recipe, source: str = "recipe", assumptions: Assumptions | None = None) -> Plan:
    a = assumptions or Assumptions()
    errors: list[str] = []
    m, m_from = model_size(recipe.model.student)
    gpu_stages = [s for s in ("generate", *TRAIN_STAGES, "evaluate") if recipe.cluster.placement(s).gpus > 0]
    if m is None:
        model_line = f"student {recipe.model.student}: size unknown ({m_from}); memory and FLOPs not estimated"
        if gpu_stages:
            errors.append(f"model.student: {recipe.model.student}: {m_from}, so the memory of GPU stages "
                          f"{', '.join(gpu_stages)} cannot be checked: use a local model directory or a known model")
    else:
        model_line = (f"student {recipe.model.student}: {m['params'] / 1e9:.3g}B parameters ({m_from}), "
                      f"{m['layers']} layers, hidden {m['hidden']:,}, vocab {m['vocab']:,}, context {m['context']:,}")
    products = {_accelerator(recipe, s, a, []) [0] for s in gpu_stages}
    if not gpu_stages:
        acc_line = "no stage books a GPU: the recipe runs on CPU (every pod, or this machine with `thinkforge run`)"
    else:
        mems = [GPUS[p] for p in products if p in GPUS]
        acc_line = (f"accelerator {', '.join(sorted(products))}"
                    + (f": {mems[0][0]:.0f} GiB, {mems[0][1]:.0f} dense bf16 TFLOP/s" if len(mems) == 1 else "")
                    + f"; MFU {a.mfu}")
    n_prompts, prompts_how = _prompts(recipe, a)
    g = recipe.generate
    gen_len = a.fill * g.max_new_tokens
    if recipe.filter.max_completion_tokens:
        kept_len = min(gen_len, recipe.filter.max_completion_tokens)
    else:
        kept_len = gen_len
    rollouts = n_prompts * g.samples_per_prompt
    accepted = rollouts * a.accept_rate
    P = m["params"] if m else 0.0
    stages: list[StagePlan] = []

    def hours(flops: float, peak: float) -> float | None:
        return flops / (peak * 1e12 * a.mfu) / 3600 if peak else None

    # generate
    sp = StagePlan("generate")
    pg = recipe.cluster.placement("generate")
    gen_tokens = rollouts * gen_len
    sp.tokens = f"{_tokens(gen_tokens)} generated ({n_prompts:,} prompts x {g.samples_per_prompt})"
    if g.engine == "openai":
        sp.where, sp.precision, sp.processes = "endpoint", "teacher server", 0
        limit = a.teacher_max_model_len
        limit_field = "--teacher-max-model-len"
        if limit is None and CHART_TEACHER_SERVICE in g.endpoint:
            limit, limit_field = CHART_TEACHER_MAX_MODEL_LEN, "the chart's teacher.maxModelLen"
        if limit is not None:
            need = CHART_TEACHER_MAX_PROMPT_TOKENS + g.max_new_tokens
            if need > limit:
                errors.append(f"generate.max_new_tokens: {g.max_new_tokens:,} plus a {CHART_TEACHER_MAX_PROMPT_TOKENS:,}"
                              f"-token prompt needs {need:,} tokens of context, over {limit_field} {limit:,}: lower "
                              "generate.max_new_tokens or raise the teacher's max model length")
            sp.notes.append(f"teacher context {limit:,} ({limit_field}) holds a {CHART_TEACHER_MAX_PROMPT_TOKENS:,}-token "
                            f"prompt + generate.max_new_tokens {g.max_new_tokens:,}" + (" (too small)" if need > limit else ""))
        if pg.gpus:
            errors.append(f"{_field(recipe, 'generate', 'gpus')}: {pg.gpus} GPUs booked, but generate.engine openai "
                          "samples on the endpoint: set it to 0")
    else:
        tm, _ = model_size(g.teacher or recipe.model.student)
        sp.processes = 1
        if pg.gpus == 0:
            sp.where, sp.precision = "cpu", g.dtype
        else:
            sp.where, sp.gpus, sp.precision = "gpu", pg.gpus, g.dtype
            product, mem, peak = _accelerator(recipe, "generate", a, errors)
            sp.gpu_gib = mem
            _engine_uses_its_gpus(recipe, "generate", g.engine, g.tensor_parallel_size, pg.gpus, errors)
            if tm:
                sp.gpu_hours = hours(2 * tm["params"] * (gen_tokens + n_prompts * PROMPT_TOKENS), peak)
                if g.engine == "vllm":
                    sp.memory = {"vLLM": VLLM_DEFAULT_UTILIZATION * mem}
        if tm and PROMPT_BUDGET + g.max_new_tokens > tm["context"]:
            errors.append(f"generate.max_new_tokens: {g.max_new_tokens:,} plus a {PROMPT_BUDGET}-token prompt is over "
                          f"the teacher's context {tm['context']:,}")
    stages.append(sp)

    # training stages
    ckpt_bytes_total = 0.0
    ckpt_stages: list[str] = []
    models_bytes = 0.0
    w = 2 if recipe.model.dtype in ("bfloat16", "float16") else 4
    for name in TRAIN_STAGES:
        t = getattr(recipe, name)
        if not t.enabled:
            continue
        p = recipe.cluster.placement(name)
        s = StagePlan(name, pods=t.nodes, gpus=p.gpus, processes=t.num_processes)
        world = t.num_processes * t.nodes
        ds = _ds_config(t.deepspeed)
        zero = int(_num(ds.get("zero_optimization", {}).get("stage"), 0)) if ds else None
        mixed = t.bf16
        s.precision = (("bf16 over fp32" if w == 4 and mixed else recipe.model.dtype if not mixed else f"bf16 over {recipe.model.dtype}")
                       + (f", ZeRO-{zero}" if ds else ", DDP" if world > 1 else ""))
        mem: dict[str, float] = {}
        if m:
            if ds:
                wb, gb, ob = (2, 2, 12) if mixed else (4, 4, 8)
                shard_w = world if zero >= 3 else 1
                shard_g = world if zero >= 2 else 1
                shard_o = world if zero >= 1 else 1
                mem["weights"] = _gib(wb * P / shard_w)
                mem["grads"] = _gib(gb * P / shard_g)
                mem["optimizer"] = _gib(ob * P / shard_o)
                zo = ds.get("zero_optimization", {})
                if zero >= 3:
                    mem["live params"] = _gib(2 * min(P, _num(zo.get("stage3_max_live_parameters"), 1e9)))
                elif zero == 2:
                    mem["buckets"] = _gib(2 * 2 * _num(zo.get("allgather_bucket_size"), 5e8))
                ckpt = (2 + 12) * P if mixed else 16 * P
            else:
                mem["weights"] = _gib(w * P)
                mem["grads"] = _gib(w * P)
                mem["optimizer"] = _gib(2 * w * P)
                ckpt = 3 * w * P
            ref = (name == "dpo" and not recipe.dpo.precompute_ref_log_probs) or (name == "rl" and recipe.rl.beta > 0)
            if ref:
                mem["ref model"] = _gib((2 if mixed else w) * P / (world if ds and zero >= 3 else 1))
            if name == "rl":
                r = recipe.rl
                window = r.vllm_max_model_length or PROMPT_BUDGET + r.max_completion_tokens
                seq = t.batch_size * window
            elif name == "dpo":
                seq = 2 * t.batch_size * t.max_length
            else:
                seq = t.batch_size * t.max_length
            per_tok = m["hidden"] * 2 * ((m["layers"] + 16) if t.gradient_checkpointing else 16 * m["layers"])
            mem["activations"] = _gib(seq * per_tok)
            models_bytes += w * P
        else:
            ckpt = 0.0
        # steps and tokens
        gbatch = t.batch_size * t.grad_accum * world
        if name == "rl":
            r = recipe.rl
            comp = a.fill * r.max_completion_tokens
            n_rl = n_prompts * (r.hard_oversample if r.reward_rebalancing else 1)
            steps = t.max_steps if t.max_steps > 0 else math.ceil(t.epochs * n_rl * r.num_generations / gbatch)
            gen = steps * gbatch * comp
            trained = steps * gbatch * (PROMPT_TOKENS + comp)
            flops = 6 * P * trained + 2 * P * gen
            s.tokens = f"{_tokens(gen)} generated, {_tokens(trained)} trained ({steps:,} steps x {gbatch} rollouts)"
            if r.prompt_optimization:
                cand = r.prompt_opt_max_candidates or n_prompts
                po = cand * r.prompt_opt_samples * r.prompt_opt_rounds * comp
                flops += 2 * P * po
                s.tokens += f"; prompt optimization {_tokens(po)} generated"
        else:
            per_ex = PROMPT_TOKENS + kept_len
            if name == "midtrain":
                examples = accepted
            elif name == "sft":
                examples = min(accepted, n_prompts * recipe.filter.sft_per_prompt)
                if recipe.filter.sft_max_examples:
                    examples = min(examples, recipe.filter.sft_max_examples)
            else:
                examples = n_prompts * recipe.filter.dpo_pairs_per_prompt * a.accept_rate
                per_ex = 2 * per_ex  # chosen and rejected
            seq_tokens = min(per_ex, t.max_length * (2 if name == "dpo" else 1))
            if name == "midtrain" and recipe.midtrain.packing:
                per_step = gbatch * t.max_length
                steps = t.max_steps if t.max_steps > 0 else math.ceil(t.epochs * examples * seq_tokens / per_step)
            else:
                per_step = gbatch * seq_tokens
                steps = t.max_steps if t.max_steps > 0 else math.ceil(t.epochs * examples / gbatch)
            trained = steps * per_step
            flops = 6 * P * trained + (2 * P * trained / max(t.epochs, 1) if name == "dpo" else 0)
            s.tokens = f"{_tokens(trained)} trained ({steps:,} steps x {gbatch} sequences)"
        n_ckpt = min(t.keep_checkpoints, steps // t.save_steps) if t.save_steps else 0
        ckpt_bytes_total += n_ckpt * ckpt
        if n_ckpt:
            ckpt_stages.append(name)
            s.notes.append(f"{n_ckpt} checkpoint(s) of {_gib(ckpt):.1f} GiB kept ({name}.keep_checkpoints "
                           f"{t.keep_checkpoints}, {name}.save_steps {t.save_steps})")
        # placement checks
        if p.gpus == 0:
            s.where = "cpu"
            s.memory = mem
            if name == "rl" and recipe.rl.use_vllm:
                errors.append(f"rl.use_vllm needs GPUs, but {_field(recipe, 'rl', 'gpus')} is 0: book GPUs or set "
                              "rl.use_vllm: false")
        else:
            s.where = "gpu"
            product, gmem, peak = _accelerator(recipe, name, a, errors)
            s.gpu_gib = gmem
            s.gpu_hours = hours(flops, peak) if m else None
            if p.gpus != t.num_processes:
                idle = f": {p.gpus - t.num_processes} of {p.gpus} GPUs idle in each pod" if p.gpus > t.num_processes else ""
                errors.append(
                    f"{_field(recipe, name, 'gpus')}: {p.gpus} GPUs per pod x {name}.nodes {t.nodes} = "
                    f"{p.gpus * t.nodes} booked, but {name}.num_processes {t.num_processes} x {name}.nodes "
                    f"{t.nodes} = {world} process{'es' if world != 1 else ''}{idle}; set {name}.num_processes: {p.gpus}"
                    + (f" (with {name}.deepspeed: zero2 or zero3)" if t.deepspeed == "none" and p.gpus > 1 else ""))
            if name == "rl" and recipe.rl.use_vllm and m and gmem:
                r = recipe.rl
                window = r.vllm_max_model_length or PROMPT_BUDGET + r.max_completion_tokens
                budget = r.vllm_gpu_memory_utilization * gmem
                kv_tok = 2 * m["layers"] * m["kv_heads"] * m["head_dim"] * 2
                kv = budget - _gib(2 * P) - VLLM_ACTIVATION_GIB
                mem["vLLM"] = budget
                cap = int(kv * GIB / kv_tok) if kv > 0 else 0
                s.notes.append(f"colocated vLLM: {budget:.1f} GiB (rl.vllm_gpu_memory_utilization "
                               f"{r.vllm_gpu_memory_utilization}): weights {_gib(2 * P):.1f} + KV cache {max(kv, 0):.1f} "
                               f"= {cap:,} tokens at {kv_tok // 1024} KiB/token, window {window:,}")
                if cap < window:
                    errors.append(f"rl.vllm_gpu_memory_utilization: {r.vllm_gpu_memory_utilization} x {gmem:.0f} GiB "
                                  f"leaves vLLM a KV cache of {cap:,} tokens, less than one rl.vllm_max_model_length "
                                  f"window of {window:,}: raise the utilization or lower rl.vllm_max_model_length / "
                                  "rl.max_completion_tokens")
            if m:
                mem["runtime"] = RUNTIME_GIB
            s.memory = mem
            if m and gmem and s.total_gib > gmem:
                errors.append(
                    f"{name}: {s.total_gib:.1f} GiB per GPU needed, over the {gmem:.0f} GiB of {product} "
                    f"({_field(recipe, name, 'node_selector')} {PRODUCT_LABEL}): set {name}.deepspeed: zero3, "
                    f"{name}.gradient_checkpointing: true, or lower {name}.batch_size / {name}.max_length"
                    + (" / rl.vllm_gpu_memory_utilization" if name == "rl" and recipe.rl.use_vllm else ""))
        if m:
            window = (recipe.rl.vllm_max_model_length or PROMPT_BUDGET + recipe.rl.max_completion_tokens) if name == "rl" \
                else t.max_length
            what = "rl.vllm_max_model_length / rl.max_completion_tokens" if name == "rl" else f"{name}.max_length"
            if window > m["context"]:
                errors.append(f"{what}: {window:,} tokens, over model.student's context of {m['context']:,}")
        stages.append(s)

    # evaluate
    e = recipe.evaluate
    if e.enabled:
        pe = recipe.cluster.placement("evaluate")
        trained = [x for x in ("midtrain", "sft", "dpo") if getattr(recipe, x).enabled]
        runs = int(e.evaluate_base) + (len(trained) if e.per_stage else 0) + 1
        samples = 0
        for b in e.benchmarks:
            size, k_cat = BENCHMARKS.get(b.dataset or b.name, (0, 4))
            src = b.source
            if src.startswith("builtin:"):
                q = dict(parse_qsl(urlsplit(src).query))
                size = int(q.get("n", 400 if q.get("split", "train") == "train" else 60))
            if b.limit:
                size = min(size, b.limit) if size else b.limit
            samples += size * (b.k or e.k or k_cat)
        ev_tokens = runs * samples * a.fill * e.max_new_tokens
        s = StagePlan("evaluate", gpus=pe.gpus, processes=1, precision=e.dtype)
        s.tokens = f"{_tokens(ev_tokens)} generated ({runs} evaluations x {samples:,} samples)"
        if e.engine == "openai":
            s.where, s.processes = "endpoint", 0
        elif pe.gpus == 0:
            s.where = "cpu"
            if e.engine == "vllm":
                errors.append(f"evaluate.engine vllm needs a GPU, but {_field(recipe, 'evaluate', 'gpus')} is 0")
        else:
            s.where = "gpu"
            product, gmem, peak = _accelerator(recipe, "evaluate", a, errors)
            s.gpu_gib = gmem
            _engine_uses_its_gpus(recipe, "evaluate", e.engine, e.tensor_parallel_size, pe.gpus, errors)
            if m:
                s.gpu_hours = hours(2 * P * ev_tokens, peak)
                if e.engine == "vllm" and gmem:
                    budget = VLLM_DEFAULT_UTILIZATION * gmem
                    wgt = _gib(2 * P / e.tensor_parallel_size)
                    kv_tok = 2 * m["layers"] * m["kv_heads"] * m["head_dim"] * 2 / e.tensor_parallel_size
                    kv = budget - wgt - VLLM_ACTIVATION_GIB
                    window = PROMPT_BUDGET + e.max_new_tokens
                    cap = int(kv * GIB / kv_tok) if kv > 0 else 0
                    s.memory = {"vLLM weights": wgt, "KV cache": max(kv, 0.0), "activations": VLLM_ACTIVATION_GIB}
                    s.notes.append(f"vLLM takes {VLLM_DEFAULT_UTILIZATION} of the GPU: KV cache {cap:,} tokens, "
                                   f"{cap // window:,} concurrent {window:,}-token sequences")
                    if cap < window:
                        errors.append(f"evaluate.max_new_tokens: {e.max_new_tokens:,} + a {PROMPT_BUDGET}-token prompt "
                                      f"does not fit the KV cache of {cap:,} tokens on {product}: raise "
                                      "evaluate.tensor_parallel_size (and the GPUs) or lower evaluate.max_new_tokens")
                else:
                    s.memory = {"weights": _gib(2 * P)}
        if m and PROMPT_BUDGET + e.max_new_tokens > m["context"]:
            errors.append(f"evaluate.max_new_tokens: {e.max_new_tokens:,} plus a {PROMPT_BUDGET}-token prompt is over "
                          f"model.student's context of {m['context']:,}")
        stages.append(s)

    # the object store
    models_total = models_bytes + (2 * w * P if m else 0)  # stage outputs, the base student and the registry copy
    need = _gib(ckpt_bytes_total + models_total)
    store = a.store_gib
    store_from = "--store-size"
    if store is None and os.environ.get(ENV_STORE_SIZE):
        try:
            store, store_from = parse_size_gib(os.environ[ENV_STORE_SIZE]), f"${ENV_STORE_SIZE}"
        except ValueError:
            errors.append(f"${ENV_STORE_SIZE}: {os.environ[ENV_STORE_SIZE]!r}: expected a size such as 500Gi")
    if store is None and source:
        store_gib = CHART_STORE_GIB.get(Path(source).name)
        if store_gib is not None and Path(source).parent.name == "recipes":
            store, store_from = store_gib, "the chart's default MinIO volume for this recipe"
    line = (f"object store: checkpoints {_gib(ckpt_bytes_total):,.1f} GiB + models {_gib(models_total):,.1f} GiB "
            f"= {need:,.1f} GiB (rollouts and evaluation samples not counted)")
    if store is not None:
        line += f", of {store:,.0f} GiB ({store_from})"
        if need > store:
            errors.append(f"{', '.join(f'{x}.keep_checkpoints' for x in ckpt_stages) or 'model.student'}: the kept checkpoints and models "
                          f"need {need:,.1f} GiB, over the object store's {store:,.0f} GiB ({store_from}): lower "
                          "keep_checkpoints, raise save_steps, or give the store's real size (--store-size, "
                          f"${ENV_STORE_SIZE}) after raising minio.persistence.size")
    else:
        line += " (store size not checked: pass --store-size)"
    assumptions = [
        f"{n_prompts:,} training prompts ({prompts_how})",
        f"prompts of {PROMPT_TOKENS} tokens on average ({PROMPT_BUDGET} at most, for context checks); generated "
        f"sequences fill {a.fill:.0%} of their cap on average (--fill)",
        f"the filter accepts {a.accept_rate:.0%} of rollouts (--accept-rate): mid-train trains on all accepted, SFT "
        "on filter.sft_per_prompt per prompt, DPO on the prompts with a right and a wrong rollout",
        f"FLOPs 6P per trained token, 2P per generated or scored token; GPU-hours at MFU {a.mfu} (--mfu) of the "
        "dense bf16 peak, the same for decoding (optimistic: decoding is bound by memory bandwidth)",
        "memory: the formulas in thinkforge.plan's docstring; ZeRO from each stage's deepspeed config",
    ]
    return Plan(source=source, digest=recipe.digest(), model_line=model_line, accelerator_line=acc_line,
                stages=stages, store_line=line, assumptions=assumptions, errors=errors)


def preflight(recipe: Recipe, source: str = "recipe", assumptions: Assumptions | None = None) -> Plan:
    """The plan, or :class:`PlanError` listing every contradiction (compile, upload, submit run this)."""
    plan = make_plan(recipe, source, assumptions)
    if plan.errors:
        raise PlanError(f"{source}: the plan refuses this recipe (thinkforge plan --recipe {source} shows it):\n"
                        + "\n".join(f"  {e}" for e in plan.errors))
    return plan


def parse_size_gib(text: str) -> float:
    """`500Gi`, `0.5Ti`, `800G`, `1T`, a bare number of GiB -> GiB."""
    units = {"Ki": 1 / 1024 ** 2, "Mi": 1 / 1024, "Gi": 1, "Ti": 1024, "Pi": 1024 ** 2,
             "K": 1e3 / GIB, "M": 1e6 / GIB, "G": 1e9 / GIB, "T": 1e12 / GIB, "": 1}
    t = text.strip()
    for u in sorted(units, key=len, reverse=True):
        if u and t.endswith(u):
            return float(t[: -len(u)]) * units[u]
    return float(t)

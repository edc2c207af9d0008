"""White-box PGD on image pixels toward an affirmative target (the paper's multimodal attack, method.md 9).

The circuit-breakers paper attacked LLaVA-NeXT-Mistral-7B with L-infinity PGD on the image, eps 32/255,
1000 steps, toward an affirmative target: `ImagePGDConfig(preset="paper")`. The default is a small
budget (100 steps of 2/255) for quick runs.

Pixel space. The attack works on the processor's output tensor (after resizing, cropping, tiling)
mapped back to [0, 1] image space: for every family the processor computes
`pixel = (value * 255 * rescale_factor - mean) / std` per channel (CLIP's mean/std for LLaVA(-NeXT)
and Qwen2-VL, 0.5/0.5 for Idefics3), so `value = (pixel * std + mean) / (255 * rescale_factor)`
inverts it exactly. The perturbation `delta` lives in that [0, 1] space: `|delta| <= eps` per value,
`value + delta` clipped to [0, 1], and the model gets the re-normalised tensor. Channel layout:
(..., C, H, W) for LLaVA, LLaVA-NeXT and Idefics3; Qwen2-VL's flattened patches
(N, C * T * P * P) are channel-first per row. Why the processed tensor and not the original image:
resizing and tiling differ per family, and attacking the tensor the vision tower sees is the white-box
threat model of the paper (and at least as strong as an image-space attack). Where a processor shows
one pixel more than once (LLaVA-NeXT's base view and its high-resolution patches, Qwen2-VL's two
temporal copies) each copy is perturbed on its own. Idefics3's padding images (all zeros) stay zero.

Loss: mean cross-entropy of the target tokens after the assistant header (`_common.target_loss`).
Update: `delta -= step_size * sign(grad)`, then projection. As the improved embedding attack does,
`n_snapshots` generations are taken from best-so-far perturbations (the lowest loss seen up to evenly
spaced steps; repeated ones generated once) and the behaviour counts as broken if any is harmful.
A behaviour without images gets a plain grey image (`blank_size` pixels) to attack.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Sequence

import inspect

import torch

from ..models import unwrap
from ._common import DEFAULT_TARGET, conversation, frozen, target_loss, target_of
from .base import AttackOutput, Behavior, budget_of
from .embedding import snapshot_steps

PRESETS: dict[str, dict] = {
    # Zou et al. 2024, section 4.2: eps 32/255, 1000 steps. The step size is not stated; 1/255 covers eps 32x.
    "paper": dict(eps=32 / 255, step_size=1 / 255, num_steps=1000, n_snapshots=10),
}


@dataclass
class ImagePGDConfig:
    """L-infinity PGD in [0, 1] pixel space toward the target (default: a small budget; preset="paper")."""

    eps: float = 32 / 255  # L-infinity radius in [0, 1] pixel space
    step_size: float = 2 / 255  # per signed-gradient step
    num_steps: int = 100
    random_start: bool = False  # start from uniform noise in [-eps, eps] instead of the clean image
    n_snapshots: int = 5  # generations from best-so-far perturbations at evenly spaced steps
    early_stop_loss: float | None = None  # stop once the target loss is below this
    max_new_tokens: int = 256
    fallback_target: str = DEFAULT_TARGET  # used (and recorded) for a behaviour without a target
    system_prompt: str | None = None
    blank_size: int = 336  # side of the grey image given to a behaviour without images
    seed: int = 0  # random start
    preset: str | None = None  # "paper": its values replace those fields still at their defaults

    def __post_init__(self) -> None:
        if self.preset is not None:
            if self.preset not in PRESETS:
                raise ValueError(f"preset: expected one of {', '.join(PRESETS)}, got {self.preset!r}")
            defaults = {f.name: f.default for f in fields(ImagePGDConfig)}
            for key, value in PRESETS[self.preset].items():
                if getattr(self, key) == defaults[key]:  # an explicit other value wins over the preset
                    setattr(self, key, value)
        if not 0 < self.eps <= 1 or self.step_size <= 0 or self.num_steps < 0:
            raise ValueError(f"image_pgd: need 0 < eps <= 1, step_size > 0, num_steps >= 0 (got eps={self.eps}, "
                             f"step_size={self.step_size}, num_steps={self.num_steps})")


@dataclass
class PixelSpace:
    """The processor's normalisation of one pixel tensor: model input <-> [0, 1] values (module docstring)."""

    scale: float  # 255 * rescale_factor (1.0 for the usual 1/255)
    mean: torch.Tensor  # shaped to broadcast against `view(pixel_values)`
    std: torch.Tensor
    flat_channels: bool  # Qwen2-VL: (N, C * T * P * P) rows, viewed as (N, C, -1)
    padding: torch.Tensor | None = None  # True for Idefics3's all-zero padding images (kept at zero)

    def _view(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.view(pixels.shape[0], self.mean.shape[1], -1) if self.flat_channels else pixels

    def to_unit(self, pixels: torch.Tensor) -> torch.Tensor:
        values = (self._view(pixels.float()) * self.std + self.mean) / self.scale
        return values.reshape(pixels.shape).clamp(0, 1)

    def to_model(self, values: torch.Tensor) -> torch.Tensor:
        pixels = ((self._view(values) * self.scale - self.mean) / self.std).reshape(values.shape)
        if self.padding is not None:
            pixels = pixels.masked_fill(self.padding, 0.0)
        return pixels


def pixel_space(processor, inputs: dict) -> PixelSpace:
    """How `inputs["pixel_values"]` (made by `processor`, a processor or ProcessorTokenizer) was normalised."""
    from ..multimodal.processing import processor_of

    images = processor_of(processor).image_processor
    pixels = inputs["pixel_values"]
    mean, std = images.image_mean, images.image_std
    if not getattr(images, "do_normalize", True):
        mean, std = 0.0, 1.0
    mean = torch.tensor(mean if isinstance(mean, (list, tuple)) else [mean] * 3, dtype=torch.float32)
    std = torch.tensor(std if isinstance(std, (list, tuple)) else [std] * 3, dtype=torch.float32)
    channels = mean.numel()
    rescale = images.rescale_factor if getattr(images, "do_rescale", True) else 1.0
    device = pixels.device
    if "image_grid_thw" in inputs and pixels.dim() == 2:  # Qwen2-VL: channel-first flattened patches
        if pixels.shape[1] % channels:
            raise ValueError(f"image_pgd: Qwen2-VL patches of width {pixels.shape[1]} do not split into "
                             f"{channels} channels")
        shape = (1, channels, 1)
        return PixelSpace(255.0 * rescale, mean.view(shape).to(device), std.view(shape).to(device), True)
    if pixels.dim() >= 4 and pixels.shape[-3] == channels:  # (..., C, H, W)
        padding = None
        if pixels.dim() == 5:  # Idefics3 pads each item's image list with all-zero images
            padding = (pixels == 0).flatten(2).all(dim=-1)[..., None, None, None].to(device)
            padding = padding if padding.any() else None
        shape = (channels, 1, 1)
        return PixelSpace(255.0 * rescale, mean.view(shape).to(device), std.view(shape).to(device), False, padding)
    raise ValueError(f"image_pgd: unknown pixel layout {tuple(pixels.shape)} (supported: (..., C, H, W) as "
                     "LLaVA, LLaVA-NeXT and Idefics3 make it, and Qwen2-VL's flattened patches)")


@dataclass
class PGDResult:
    """One behaviour's run: clean values, the perturbation that reached the lowest loss, and the trace."""

    clean: torch.Tensor  # [0, 1] values of the processed image tensor
    best_delta: torch.Tensor
    best_loss: float
    best_step: int  # updates applied when the best perturbation was reached
    losses: list[float]  # losses[i]: the loss after i updates
    snapshots: list[tuple[int, int]] = field(default_factory=list)  # (step, best step at that step)
    snapshot_deltas: dict[int, torch.Tensor] = field(default_factory=dict)  # best step -> perturbation
    steps: int = 0
    stopped_early: bool = False


def _to_model_device(inputs: dict, model) -> dict:
    parameter = next(model.parameters())
    return {k: v.to(parameter.device) for k, v in inputs.items()}


def pgd(model, processor, inputs: dict, target_ids: torch.Tensor, config: ImagePGDConfig) -> PGDResult:
    """PGD on `inputs["pixel_values"]` (model inputs with the target appended; `target_ids` its last tokens)
    toward the target. The model must be frozen (see `frozen`)."""
    cfg = config
    space = pixel_space(processor, inputs)
    dtype = next(model.parameters()).dtype
    clean = space.to_unit(inputs["pixel_values"])
    rest = {k: v for k, v in inputs.items() if k != "pixel_values"}
    # Logits of the target positions only (all four families take logits_to_keep; a model that does not
    # returns them all, and target_loss reads the last ones either way).
    keep = {"logits_to_keep": target_ids.numel() + 1} if "logits_to_keep" in inspect.signature(
        unwrap(model).forward).parameters else {}
    generator = torch.Generator().manual_seed(cfg.seed)
    delta = torch.zeros_like(clean)
    if cfg.random_start:
        delta = ((torch.rand(clean.shape, generator=generator) * 2 - 1) * cfg.eps).to(clean.device)
        delta = (clean + delta).clamp(0, 1) - clean

    def loss_of(d: torch.Tensor) -> torch.Tensor:
        pixels = space.to_model(clean + d).to(dtype)
        logits = model(**rest, pixel_values=pixels, **keep).logits
        return target_loss(logits, target_ids)[0]

    wanted = set(snapshot_steps(cfg.num_steps, cfg.n_snapshots))
    result = PGDResult(clean=clean, best_delta=delta.clone(), best_loss=float("inf"), best_step=0, losses=[])
    for step in range(cfg.num_steps + 1):  # step = updates applied so far
        last = step == cfg.num_steps
        d = delta.clone().requires_grad_(not last)
        with torch.set_grad_enabled(not last):
            loss = loss_of(d)
        result.losses.append(loss.item())
        if result.losses[-1] < result.best_loss:
            result.best_loss, result.best_step, result.best_delta = result.losses[-1], step, delta.clone()
        stop = cfg.early_stop_loss is not None and result.losses[-1] < cfg.early_stop_loss
        if step in wanted or stop or last:
            if result.best_step not in result.snapshot_deltas:
                result.snapshot_deltas[result.best_step] = result.best_delta
            if not result.snapshots or result.snapshots[-1][0] != step:
                result.snapshots.append((step, result.best_step))
        result.steps = step
        if stop:
            result.stopped_early = True
            break
        if last:
            break
        (grad,) = torch.autograd.grad(loss, d)
        with torch.no_grad():
            delta = (delta - cfg.step_size * grad.sign()).clamp(-cfg.eps, cfg.eps)
            delta = (clean + delta).clamp(0, 1) - clean
    return result


class ImagePGD:
    name = "image_pgd"
    config_class = ImagePGDConfig

    def __init__(self, config: ImagePGDConfig | None = None):
        self.config = config or ImagePGDConfig()

    def run(self, model, tokenizer, behaviors: Sequence[Behavior]) -> list[AttackOutput]:
        from ..multimodal.processing import is_processor

        if not is_processor(tokenizer):
            raise ValueError("image_pgd attacks a vision-language model: pass its processor (or the "
                             "ProcessorTokenizer models.load_model returns) as the tokenizer")
        with frozen(model):
            return [self._attack_one(model, tokenizer, b) for b in behaviors]

    def _attack_one(self, model, processor, behavior: Behavior) -> AttackOutput:
        from ..multimodal.images import blank, png_bytes
        from ..multimodal.processing import processor_of, render_multimodal, render_text

        cfg = self.config
        if behavior.tools:
            raise ValueError(f"image_pgd: behaviour {behavior.id} has tool definitions; image attacks do not "
                             "render tools")
        images = list(behavior.images) or [png_bytes(blank(cfg.blank_size))]
        chat = conversation(behavior.user_message(), cfg.system_prompt)
        target, fallback = target_of(behavior, cfg.fallback_target)
        inputs = render_multimodal(processor, chat, images, add_generation_prompt=True, response=target)
        mask = inputs.pop("response_mask")[0]
        inputs = _to_model_device(inputs, model)
        target_ids = inputs["input_ids"][0, mask.to(inputs["input_ids"].device)]
        result = pgd(model, processor, inputs, target_ids, cfg)

        prompt = render_multimodal(processor, chat, images, add_generation_prompt=True)
        prompt.pop("response_mask")
        prompt = _to_model_device(prompt, model)
        space = pixel_space(processor, inputs)
        tokenizer = processor_of(processor).tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        dtype = next(model.parameters()).dtype
        generations, generated_steps = [], []
        with torch.no_grad():
            for best_step, delta in sorted(result.snapshot_deltas.items()):
                pixels = space.to_model(result.clean + delta).to(dtype)
                out = model.generate(**{**prompt, "pixel_values": pixels}, max_new_tokens=cfg.max_new_tokens,
                                     do_sample=False, pad_token_id=pad)
                generations.append(tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True))
                generated_steps.append(best_step)
        slot = f" [{len(images)} image(s), PGD eps={cfg.eps:.4f}, {result.steps} steps]"
        return AttackOutput(
            behavior_id=behavior.id, attack=self.name, prompt=behavior.user_message() + slot,
            generations=generations, budget=budget_of(cfg),
            extra={
                "losses": result.losses,
                "final_loss": result.losses[-1],
                "best_loss": result.best_loss,
                "best_step": result.best_step,
                "steps": result.steps,
                "stopped_early": result.stopped_early,
                "snapshot_steps": [s for s, _ in result.snapshots],
                "generated_from_steps": generated_steps,  # the best-so-far perturbation each generation used
                "max_abs_delta": float(result.best_delta.abs().max()),
                "pixel_shape": list(result.clean.shape),
                "blank_image": not behavior.images,
                "target": target,
                "target_fallback": fallback,
                "prompt_text": render_text(processor, chat, len(images), add_generation_prompt=True) + slot,
            },
        )

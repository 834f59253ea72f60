"""The project's reference models, trained offline by ``benchmarks/models/`` scripts.

Weights live in the repository under ``benchmarks/models/<name>/`` (safetensors + JSON); the
loaders take that folder (or another one) and never reach a model hub.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

__all__ = ["MODELS_DIR", "FashionClassifier", "load_fashion28", "load_fashion_classifier"]

MODELS_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "models"


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
    unet = UNet2DModel.from_pretrained(str(folder), local_files_only=True)
    scheduler = DDPMScheduler.from_pretrained(str(folder / "scheduler"), local_files_only=True)
    return unet.eval(), scheduler

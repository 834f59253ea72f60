"""Train the Fashion-MNIST domain classifier used by the quality benchmark.

    python benchmarks/models/train_fashion_classifier.py [--epochs 4]

One CPU thread, a few minutes. Writes benchmarks/models/fashion_classifier/ (model.safetensors,
config.json, training.json with the test accuracy, seed and the exact command).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from dmq_fx_bench.datasets import load_fashion_mnist
from dmq_fx_bench.reference_models import FashionClassifier
from safetensors.torch import save_file
from tqdm.auto import tqdm


def to_input(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).float().div(127.5).sub(1.0).unsqueeze(1)


@torch.no_grad()
def accuracy(model: FashionClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    pred = torch.cat([model(x[i : i + 1000]).argmax(1) for i in range(0, len(x), 1000)])
    return (pred == y).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/models/fashion_classifier")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    xtr, ytr = load_fashion_mnist("train")
    xte, yte = load_fashion_mnist("test")
    xtr, ytr = to_input(xtr), torch.from_numpy(ytr).long()
    xte, yte = to_input(xte), torch.from_numpy(yte).long()
    config = {"width": 32, "feature_dim": 128, "num_classes": 10}
    model = FashionClassifier(**config)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps = args.epochs * (len(xtr) // args.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    g = torch.Generator().manual_seed(args.seed)
    start = time.time()
    bar = tqdm(total=steps, desc="train classifier")
    for _ in range(args.epochs):
        model.train()
        order = torch.randperm(len(xtr), generator=g)
        for i in range(len(xtr) // args.batch):
            idx = order[i * args.batch : (i + 1) * args.batch]
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    acc = accuracy(model, xte, yte)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors")
    )
    (out / "config.json").write_text(json.dumps(config))
    (out / "training.json").write_text(
        json.dumps(
            {
                "command": " ".join([Path(sys.executable).name] + sys.argv),
                "seed": args.seed,
                "epochs": args.epochs,
                "batch": args.batch,
                "threads": args.threads,
                "torch": torch.__version__,
                "test_accuracy": round(acc, 4),
                "train_seconds": round(time.time() - start),
            },
            indent=1,
        )
    )
    print(f"test accuracy {acc:.4f}; saved {out}")


if __name__ == "__main__":
    main()

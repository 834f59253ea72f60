import torch
from diffusers import DDIMScheduler

from dmq_fx.reference_models import load_fashion28, load_fashion_classifier


def test_fashion28_generates_recognisable_fashion_mnist():
    """20-step DDIM samples of the committed DDPM are classified confidently, across classes."""
    unet, train_scheduler = load_fashion28()
    assert 1e6 <= sum(p.numel() for p in unet.parameters()) <= 2e6
    assert any("attentions" in n for n, _ in unet.named_modules())
    scheduler = DDIMScheduler.from_config(train_scheduler.config)
    scheduler.set_timesteps(20)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 28, 28, generator=g)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x, eta=1.0, generator=g).prev_sample
        probs = load_fashion_classifier()(x.clamp(-1, 1)).softmax(1)
    confident = probs.max(1).values > 0.8
    assert confident.float().mean() >= 0.6
    assert len(set(probs.argmax(1)[confident].tolist())) >= 6
    # for contrast: the classifier is overconfident on pure noise too, but calls nearly all of
    # it one class ("bag"); the samples spread over the classes
    with torch.no_grad():
        noise_pred = load_fashion_classifier()(torch.randn(64, 1, 28, 28, generator=g)).argmax(1)
    assert torch.bincount(noise_pred).max() >= 48
    assert torch.bincount(probs.argmax(1)).max() <= 24

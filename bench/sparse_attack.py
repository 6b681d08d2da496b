"""An L0 (few-pixel) white-box attack: greedy, one pixel per step, chosen by the loss gradient.

At each step, for every example not yet misclassified, the attack takes the
cross-entropy gradient g (C, H, W) at its current image x and, for every pixel
(h, w) it has not changed yet, the extreme value v_c in {0, 1} of each channel
in the ascent direction (1 where g_c > 0, else 0). The first-order loss gain of
setting the pixel is sum_c g_c (v_c - x_c); the pixel with the largest gain is
set to v. A pixel is all channels at one position, so the budget k counts
pixels, as Sparse-RS and the one-pixel attack do.

One run to `max_pixels` gives the whole accuracy-vs-k curve: an example stops
changing once it is misclassified, so `fooled_at[i]` (the first k at which it
was misclassified, 0 for clean mistakes) settles every budget at once.

This is a JSMA-style greedy baseline: cheap (one forward-backward pass per
pixel) and deterministic, but weaker than search-based attacks such as Sparse-RS,
so its curve is an upper bound on the model's L0 robust accuracy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def greedy_pixel_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                        max_pixels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_adv, fooled_at): images with up to `max_pixels` pixels changed, and per example the first budget
    that fooled the model (max_pixels + 1 when none did). x: (N, C, H, W) in [0, 1]."""
    n, c, h, w = x.shape
    if max_pixels < 0 or max_pixels > h * w:
        raise ValueError(f"greedy_pixel_attack: max_pixels must be in 0..{h * w}, got {max_pixels}")
    model.eval()
    x_adv = x.detach().clone()
    changed = torch.zeros(n, h * w, dtype=torch.bool, device=x.device)
    fooled_at = torch.full((n,), max_pixels + 1, dtype=torch.long, device=x.device)
    with torch.no_grad():
        fooled_at[model(x_adv).argmax(1) != y] = 0
    for k in range(1, max_pixels + 1):
        active = (fooled_at > k - 1).nonzero().flatten()
        if active.numel() == 0:
            break
        xa = x_adv[active].clone().requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(model(xa), y[active], reduction="sum")
            (grad,) = torch.autograd.grad(loss, xa)  # (A, C, H, W)
        target = (grad > 0).to(x.dtype)  # the extreme of each channel in the ascent direction
        gain = (grad * (target - xa.detach())).sum(1).flatten(1)  # (A, H*W)
        gain[changed[active]] = -float("inf")
        pixel = gain.argmax(1)  # (A,)
        rows, cols = pixel // w, pixel % w
        x_adv[active, :, rows, cols] = target[torch.arange(active.numel()), :, rows, cols]
        changed[active, pixel] = True
        with torch.no_grad():
            now_fooled = model(x_adv[active]).argmax(1) != y[active]
        fooled_at[active[now_fooled]] = k
    return x_adv, fooled_at


def accuracy_by_budget(fooled_at: torch.Tensor, budgets: list[int]) -> list[float]:
    """Accuracy at each pixel budget k: the share of examples not fooled with k pixels."""
    return [float((fooled_at > k).double().mean()) for k in budgets]

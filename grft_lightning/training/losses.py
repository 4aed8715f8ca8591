"""The losses of training and of the selection pass, on a timm model's pooled features and logits.

The selection pass uses cross-entropy through the head or the head-free supervised contrastive
loss on pooled features (GPS's choice; the views are the data module's), :func:`selection_loss_fn`.
Training reads the features (for the feature regulariser) and the logits from one pass
(:func:`features_and_logits`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from grft_lightning.core.heads import HeadGroup, classifier


def supcon_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al., 2020), as GPS uses it for selection.

    Computed in fp32 outside any autocast region, whatever the precision of the features: under
    ``bf16-mixed`` the similarity product would otherwise run in bf16 (logits of up to
    ``1 / temperature`` = 14.3 rounded to 8 bits of mantissa). The model's forward pass keeps the
    trainer's precision (GPS runs it under fp16 autocast).

    Args:
        features: ``(B, V, D)`` features of ``V`` views per image (L2-normalised here).
        labels: ``(B,)`` integer labels; positives are the other views of any same-label image.
        temperature: softmax temperature (0.07 in GPS).
    """
    with torch.autocast(device_type=features.device.type, enabled=False):
        b, v, _ = features.shape
        z = F.normalize(features.float().reshape(b * v, -1), dim=-1)
        y = labels.repeat_interleave(v)
        logits = z @ z.t() / temperature
        self_mask = torch.eye(b * v, dtype=torch.bool, device=z.device)
        logits = logits.masked_fill(self_mask, float("-inf"))
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        positives = (y[:, None] == y[None, :]) & ~self_mask
        count = positives.sum(1)
        has = count > 0
        mean_log_prob = log_prob.masked_fill(~positives, 0.0).sum(1)[has] / count[has]
        return -mean_log_prob.mean()


def pre_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The pooled features the head reads (after the final norm for ViTs)."""
    return model.forward_head(model.forward_features(images), pre_logits=True)


def features_and_logits(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A timm model's pooled features (:func:`pre_logits`, what a regulariser reads) and the
    logits its own forward gives, from one pass through the backbone.

    The logits are the head applied to the features, except for a model with several heads
    (:class:`~grft_lightning.core.heads.HeadGroup`): DeiT's distilled ViTs pool two tokens, and their
    forward applies each head to its own token and averages the logits, where the pooled features
    average the tokens first. The logits then come from the model's ``forward_head``, so that
    training optimises the function evaluation measures.
    """
    tokens = model.forward_features(images)
    features = model.forward_head(tokens, pre_logits=True)
    head = classifier(model)
    if not isinstance(head, HeadGroup):
        return features, head(features)
    logits = model.forward_head(tokens)
    if isinstance(logits, (tuple, list)):  # timm's distillation mode returns the heads apart
        logits = torch.stack(list(logits)).mean(0)
    return features, logits


def selection_loss_fn(kind: str, temperature: float = 0.07):
    """``loss_fn(model, batch)`` for ``accumulate_gradients``: ``supcon`` (head-free, two views)
    or ``ce`` (cross-entropy through the new head, one deterministic view)."""
    if kind == "supcon":
        def loss_fn(model: nn.Module, batch) -> torch.Tensor:
            views, labels = batch
            b, v = views.shape[:2]
            feats = pre_logits(model, views.flatten(0, 1))
            return supcon_loss(feats.view(b, v, -1), labels, temperature)
    elif kind == "ce":
        def loss_fn(model: nn.Module, batch) -> torch.Tensor:
            images, labels = batch
            return F.cross_entropy(model(images).float(), labels)
    else:
        raise ValueError(f"selection.loss must be 'supcon' or 'ce', got {kind!r}")
    return loss_fn

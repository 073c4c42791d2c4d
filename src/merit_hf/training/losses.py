"""The pretraining objective on the training side: MERIT's contrastive term over the records of every process, added
to the model's own reconstruction term.

`MeritForPreTraining` is Hub remote code and computes both terms over the batch it is given, like transformers'
`CLIPModel`: it knows nothing of processes. InfoNCE compares every ECG with every report of the batch, so its batch
is what a distributed run must share: N processes of batch b should train like one process of batch N*b (the bound
`log(batch) - loss` grows with the batch). As in open_clip, where `ClipLoss(rank, world_size, ...)` lives in the
training code and not in the model, that sharing lives here: `ContrastiveLoss` gathers both embeddings from every
process **with gradient** and computes the logits once over the gathered batch; `PretrainingObjective` adds the
model's reconstruction term with the weights of the config (or the balanced reconstruction weight of the step).

Evaluation shards records over processes and pads the last batch with duplicates; the loop leaves those out of the
model's batch, so processes may then hold different numbers of records, which `ContrastiveLoss(...,
equal_batches=False)` gathers too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..models.merit.configuration_merit import MeritConfig
from ..models.merit.modeling_merit import contrastive_loss, similarity_logits

__all__ = ["ContrastiveLoss", "PretrainingLosses", "PretrainingObjective", "gather_with_grad"]


def gather_with_grad(features: torch.Tensor, equal_batches: bool = True) -> torch.Tensor:
    """`features` `(rows, ...)` of every process, concatenated in process order, with the autograd graph kept (the
    gradient of another process's rows flows back to that process: open_clip's `gather_with_grad`). `features` as
    they are outside `torch.distributed` or with one process.

    `equal_batches=False` allows a different number of rows per process (none included): the counts are exchanged
    first and every process's rows padded to the largest; it costs one more small collective, so training, whose
    batches are equal (`drop_last`), does not ask for it.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features
    from torch.distributed.nn.functional import all_gather

    if equal_batches:
        return torch.cat(all_gather(features.contiguous()), dim=0)
    counts = [torch.zeros(1, dtype=torch.long, device=features.device) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([features.shape[0]], device=features.device))
    counts = [int(count) for count in counts]
    padding = [0, 0] * (features.dim() - 1) + [0, max(counts) - features.shape[0]]
    gathered = all_gather(F.pad(features, padding).contiguous())
    return torch.cat([rows[:count] for rows, count in zip(gathered, counts)], dim=0)


class ContrastiveLoss(nn.Module):
    """Symmetric InfoNCE (CLIP) over the ECG-report pairs of every process.

    Args:
        gather (`bool`, defaults to `True`): gather the embeddings of all processes (`MeritConfig.
            gather_contrastive_features`); `False` gives each process the loss of its own batch.
        equal_batches (`bool`, defaults to `True`): every process holds the same number of pairs (training with
            `drop_last`); `False` for evaluation, whose padding the loop leaves out.

    Inputs are the L2-normalised `ecg_embeds` and `text_embeds` `(batch_size, projection_dim)` of this process (a
    `MeritForPreTraining` output holds them) and the inverse temperature `logit_scale` (`exp` of the parameter).
    Every process computes the same loss over the gathered batch; DDP's gradient averaging then makes N processes of
    batch b step exactly like one process of batch N*b.
    """

    def __init__(self, gather: bool = True, equal_batches: bool = True):
        super().__init__()
        self.gather = gather
        self.equal_batches = equal_batches

    def forward(self, ecg_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        if self.gather:
            ecg_embeds = gather_with_grad(ecg_embeds, self.equal_batches)
            text_embeds = gather_with_grad(text_embeds, self.equal_batches)
        return contrastive_loss(similarity_logits(ecg_embeds, text_embeds, logit_scale))


@dataclass
class PretrainingLosses:
    """The step's objective: `loss` (what is back-propagated) and its two terms (`None` when a weight of 0 switches
    that branch off)."""

    loss: torch.Tensor
    reconstruction_loss: torch.Tensor | None = None
    contrastive_loss: torch.Tensor | None = None


class PretrainingObjective(nn.Module):
    """`reconstruction_weight * reconstruction_loss + contrastive_weight * contrastive_loss` of a
    `MeritForPreTraining` output, with the contrastive term over every process's batch (`ContrastiveLoss`).

    The reconstruction term is the model's own (masked-patch MSE of this process's records: DDP averages it, as it
    averages the gradients); only the contrastive term needs the other processes. With one process the result is the
    model's own `loss`, term for term.

    Args:
        config (`MeritConfig`): the weights and `gather_contrastive_features`.
        equal_batches (`bool`, defaults to `True`): see `ContrastiveLoss`.
    """

    def __init__(self, config: MeritConfig, equal_batches: bool = True):
        super().__init__()
        self.reconstruction_weight = config.reconstruction_weight
        self.contrastive_weight = config.contrastive_weight
        self.contrastive = ContrastiveLoss(config.gather_contrastive_features, equal_batches)

    def forward(self, output, reconstruction_weight: float | None = None) -> PretrainingLosses:
        """`output`: a `MeritForPreTrainingOutput`. `reconstruction_weight`: this step's weight if not the config's
        (`config.loss_balancing="gradient_norm"`)."""
        if reconstruction_weight is None:
            reconstruction_weight = self.reconstruction_weight
        loss = 0.0
        if output.reconstruction_loss is not None:
            loss = loss + reconstruction_weight * output.reconstruction_loss
        contrastive = None
        if output.ecg_embeds is not None:
            contrastive = self.contrastive(output.ecg_embeds, output.text_embeds, output.logit_scale)
            loss = loss + self.contrastive_weight * contrastive
        return PretrainingLosses(loss, output.reconstruction_loss, contrastive)

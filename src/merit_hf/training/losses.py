"""The pretraining objective on the training side: MERIT's contrastive term over the records of every process, added
to the model's own reconstruction term, so that in training N processes of batch b compute the loss and gradient of
one process of batch N*b.

`MeritForPreTraining` is Hub remote code and computes both terms over the batch it is given, like transformers'
`CLIPModel`: it knows nothing of processes. InfoNCE compares every ECG with every report of the batch, so its batch
is what a distributed run must share: N processes of batch b should train like one process of batch N*b (the bound
`log(batch) - loss` grows with the batch). As in open_clip, where `ClipLoss(rank, world_size, ...)` lives in the
training code and not in the model, that sharing lives here: `ContrastiveLoss` gathers both embeddings from every
process **with gradient** and computes the logits once over the gathered batch. `PretrainingObjective` adds the
model's reconstruction term with the weights of the config (or the balanced reconstruction weight of the step). That
term is a mean over the hidden patches that hold signal, whose number differs between processes when records miss
leads (`lead_mask`) or are padded; in training each process's term is weighted by its share of those patches, so that
DDP's mean over processes is the mean over all of them, as with one process.

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

__all__ = ["ContrastiveLoss", "PretrainingLosses", "PretrainingObjective", "gather_with_grad", "several_processes"]


def gather_with_grad(features: torch.Tensor, equal_batches: bool = True) -> torch.Tensor:
    """`features` `(rows, ...)` of every process, concatenated in process order, with the autograd graph kept
    (open_clip's `gather_with_grad`): the backward of the gather is a reduce-scatter, so each process's rows receive
    the sum over processes of the gradient with respect to them, which DDP's mean over processes turns into the
    gradient one process of the whole batch would compute. `features` as they are outside `torch.distributed` or with
    one process.

    `equal_batches=False` allows a different number of rows per process (none included): the counts are exchanged
    first and every process's rows padded to the largest; it costs one more small collective, so training, whose
    batches are equal (`drop_last`), does not ask for it.

    The gather is `torch.distributed._functional_collectives.all_gather_single_autograd` (gloo, NCCL), the successor
    torch names for `torch.distributed.nn.functional.all_gather`, which warns that it is deprecated.
    """
    if not several_processes():
        return features
    if equal_batches:
        return _all_gather_rows(features)
    counts = [torch.zeros(1, dtype=torch.long, device=features.device) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([features.shape[0]], device=features.device))
    counts = [int(count) for count in counts]
    rows = max(counts)
    padding = [0, 0] * (features.dim() - 1) + [0, rows - features.shape[0]]
    gathered = _all_gather_rows(F.pad(features, padding))
    return torch.cat([gathered[rank * rows : rank * rows + count] for rank, count in enumerate(counts)], dim=0)


def several_processes() -> bool:
    """Whether `torch.distributed` runs more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_gather_rows(features: torch.Tensor) -> torch.Tensor:
    """Every process's `features` (the same shape on each) stacked along dim 0; backward: reduce-scatter (sum).

    `all_gather_single_autograd` is torch 2.13's name; the torch floor (2.6) has the same collective as
    `all_gather_tensor_autograd`, which 2.13 keeps as a deprecated alias."""
    from torch.distributed import _functional_collectives as collectives

    gather = getattr(collectives, "all_gather_single_autograd", None) or collectives.all_gather_tensor_autograd
    return gather(features.contiguous(), 0, dist.group.WORLD)


class ContrastiveLoss(nn.Module):
    """Symmetric InfoNCE (CLIP) over the ECG-report pairs of every process.

    Args:
        gather (`bool`, defaults to `True`): gather the embeddings of all processes (`MeritConfig.
            gather_contrastive_features`); `False` gives each process the loss of its own batch.
        equal_batches (`bool`, defaults to `True`): every process holds the same number of pairs (training with
            `drop_last`); `False` for evaluation, whose padding the loop leaves out.

    Inputs are the L2-normalised `ecg_embeds` and `text_embeds` `(batch_size, projection_dim)` of this process (a
    `MeritForPreTraining` output holds them) and the inverse temperature `logit_scale` (`exp` of the parameter).
    Every process computes the same loss over the gathered batch, the loss one process of the whole batch computes;
    each process's rows receive the sum over processes of the gradient with respect to them, so DDP's gradient
    averaging gives the gradient of one process of batch N*b (up to floating-point rounding).
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
    that branch off). On several processes in training, `reconstruction_loss` is this process's weighted share of
    the term (`PretrainingObjective`), whose mean over processes is the term of the whole batch."""

    loss: torch.Tensor
    reconstruction_loss: torch.Tensor | None = None
    contrastive_loss: torch.Tensor | None = None


class PretrainingObjective(nn.Module):
    """`reconstruction_weight * reconstruction_loss + contrastive_weight * contrastive_loss` of a
    `MeritForPreTrainingOutput`, with the contrastive term over every process's batch (`ContrastiveLoss`).

    The reconstruction term is the model's own: the masked-patch MSE averaged over the hidden patches that hold signal
    in this process's batch (`reconstruction_patch_count` of them). DDP averages the processes' losses (and
    gradients), which would weight every process alike however many such patches it holds: records with missing leads
    (`lead_mask`) or padding hold fewer. So in training (`equal_batches=True`) with N > 1 processes, each process's term
    is multiplied by `N * count / (sum of count over processes)` (the counts all-reduced, no gradient; the sum at
    least 1): its mean over processes, which is what pretraining logs and what DDP's averaged gradient is the gradient
    of, is then the pooled mean over the hidden patches of all processes' batches, what one process of batch N*b
    computes. With the contrastive term's gather (`gather_contrastive_features`), N processes of batch b thus give
    the loss and gradient of one process of batch N*b (up to floating-point rounding; dropout masks are drawn per
    process). With one process, or outside `torch.distributed`, the result is the model's own `loss`, term for term.

    Evaluation (`equal_batches=False`) leaves the term as each process computes it: its loop counts losses per
    record, each record carrying its process's batch mean.

    Args:
        config (`MeritConfig`): the weights and `gather_contrastive_features`.
        equal_batches (`bool`, defaults to `True`): every process holds the same number of records (training with
            `drop_last`), and the reconstruction term is weighted as above. `False` (evaluation): batches of different
            sizes are gathered (`ContrastiveLoss`) and the reconstruction term is left as each process computes it.
    """

    def __init__(self, config: MeritConfig, equal_batches: bool = True):
        super().__init__()
        self.reconstruction_weight = config.reconstruction_weight
        self.contrastive_weight = config.contrastive_weight
        self.equal_batches = equal_batches
        self.contrastive = ContrastiveLoss(config.gather_contrastive_features, equal_batches)

    def forward(self, output, reconstruction_weight: float | None = None) -> PretrainingLosses:
        """`output`: a `MeritForPreTrainingOutput`. `reconstruction_weight`: this step's weight if not the config's
        (`config.loss_balancing="gradient_norm"`)."""
        if reconstruction_weight is None:
            reconstruction_weight = self.reconstruction_weight
        loss = 0.0
        reconstruction = output.reconstruction_loss
        if reconstruction is not None:
            if self.equal_batches and several_processes():
                reconstruction = reconstruction * self._share_of_reconstruction_patches(output)
            loss = loss + reconstruction_weight * reconstruction
        contrastive = None
        if output.ecg_embeds is not None:
            contrastive = self.contrastive(output.ecg_embeds, output.text_embeds, output.logit_scale)
            loss = loss + self.contrastive_weight * contrastive
        return PretrainingLosses(loss, reconstruction, contrastive)

    @staticmethod
    def _share_of_reconstruction_patches(output) -> torch.Tensor:
        """`N * count / max(sum of count over the N processes, 1)` for this process's reconstruction term."""
        count = getattr(output, "reconstruction_patch_count", None)
        if count is None:
            raise ValueError(
                "PretrainingObjective on several processes needs the output's reconstruction_patch_count (the "
                "reconstruction loss's denominator) to weight each process's term; this MeritForPreTraining output "
                "has none (remote code from before merit_hf added it?)"
            )
        count = count.detach().float().reshape(())
        total = count.clone()
        dist.all_reduce(total)
        return count * dist.get_world_size() / total.clamp(min=1.0)

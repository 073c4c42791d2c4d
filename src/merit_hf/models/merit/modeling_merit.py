"""MERIT models: the lead-wise ECG Transformer, its masked-modelling decoder, the ECG-report two-tower model, the
pretraining objective and the classification head.

This file is Hub remote code: it imports only torch, transformers, huggingface_hub and its sibling files.

The objective (MERIT, arXiv 2605.27583) is one information-theoretic target split into two tractable bounds on the
same encoder: a Gaussian decoder turns the bound on I(Z; X) into the MSE of masked patches (structure), and InfoNCE
bounds I(Z; T) with the clinical report (semantics). Layout, masking and decoder follow ST-MEM (ICLR 2024); the
contrastive branch follows CLIP / MERL. See `MeritEcgConfig` and `MeritConfig` for every default and its source.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import os
import platform
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling, SequenceClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput, PushToHubMixin, can_return_tuple, logging
from transformers.utils.output_capturing import capture_outputs

from .configuration_merit import PROBLEM_TYPES, MeritConfig, MeritEcgConfig, MeritReportConfig
from .pipeline_merit import (  # pool_window_embeddings lives there, where the pipelines can use it
    check_token_ids,
    custom_pipelines_for,
    ecg_encoder_of,
    pool_window_embeddings,
    save_zero_shot_prompts,
)

logger = logging.get_logger(__name__)

# ----------------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class MeritEcgModelOutput(ModelOutput):
    r"""
    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`):
        Encoder output tokens, lead after lead; each lead holds `[SEP] patches... [SEP]` (visible patches only when
        masking was applied).
    pooler_output (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
        LayerNorm of the mean over the (visible, non-padding) patch tokens of all leads (ST-MEM's feature).
    mask (`torch.FloatTensor` of shape `(batch_size, num_leads, num_patches_per_lead)`, *optional*):
        1 for a hidden patch, 0 for a visible one; only when masking was applied.
    ids_restore (`torch.LongTensor` of shape `(batch_size, num_leads, num_patches_per_lead)`, *optional*):
        Indices that undo the per-lead shuffle; only when masking was applied.
    patch_attention_mask (`torch.FloatTensor` of shape `(batch_size, num_leads, num_patches_per_lead)`, *optional*):
        1 for a patch that holds signal, 0 for a patch made only of padding or of a lead missing from the record;
        only when `ecg_attention_mask` or `lead_mask` is given.
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    mask: torch.FloatTensor | None = None
    ids_restore: torch.LongTensor | None = None
    patch_attention_mask: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class MeritOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`, *optional*): symmetric InfoNCE, when `return_loss=True`.
    logits_per_ecg (`torch.FloatTensor` of shape `(ecg_batch_size, text_batch_size)`): scaled cosine similarities.
    logits_per_text (`torch.FloatTensor` of shape `(text_batch_size, ecg_batch_size)`): the transpose.
    ecg_embeds, text_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`): L2-normalised embeddings.
    ecg_model_output, text_model_output (`BaseModelOutputWithPooling`): each tower's `get_*_features` output.
    """

    loss: torch.FloatTensor | None = None
    logits_per_ecg: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    ecg_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    ecg_model_output: BaseModelOutputWithPooling | None = None
    text_model_output: BaseModelOutputWithPooling | None = None

    def to_tuple(self) -> tuple:
        return tuple(v.to_tuple() if isinstance(v, ModelOutput) else v for v in super().to_tuple())


@dataclass
class MeritForPreTrainingOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`):
        `reconstruction_weight * reconstruction_loss + contrastive_weight * contrastive_loss`.
    reconstruction_loss (`torch.FloatTensor` of shape `()`, *optional*): MSE over hidden patches only.
    contrastive_loss (`torch.FloatTensor` of shape `()`, *optional*): symmetric InfoNCE over this batch (pretraining
        on several processes computes it over all their batches: `merit_hf.training.losses`).
    logits (`torch.FloatTensor` of shape `(batch_size, num_leads, num_patches_per_lead, patch_size)`, *optional*):
        Reconstructed patches (in normalised-patch units when `norm_pix_loss=True`).
    mask (`torch.FloatTensor` of shape `(batch_size, num_leads, num_patches_per_lead)`, *optional*):
        1 for a hidden patch, 0 for a visible one.
    ids_restore (`torch.LongTensor`, *optional*): undoes the per-lead shuffle.
    logits_per_ecg, logits_per_text (`torch.FloatTensor`, *optional*): local scaled similarities.
    ecg_embeds, text_embeds (`torch.FloatTensor`, *optional*): L2-normalised local embeddings.
    logit_scale (`torch.FloatTensor` of shape `()`, *optional*): the inverse temperature used, `exp(logit_scale)` of
        the parameter as it is (not clamped here: `clamp_logit_scale_()` keeps the parameter in range after each
        optimizer step).
    reconstruction_patch_count (`torch.FloatTensor` of shape `()`, *optional*): how many patches
        `reconstruction_loss` averages over: the hidden patches that hold signal (not padding, not a missing lead) in
        this batch; `reconstruction_loss` is their summed MSE over `max(count, 1)`. Pretraining on several processes
        weights each process's term by it, so that the term is the mean over the hidden patches of all their batches
        (`merit_hf.training.losses.PretrainingObjective`).
    """

    loss: torch.FloatTensor | None = None
    reconstruction_loss: torch.FloatTensor | None = None
    contrastive_loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    mask: torch.FloatTensor | None = None
    ids_restore: torch.LongTensor | None = None
    logits_per_ecg: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    ecg_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    logit_scale: torch.FloatTensor | None = None
    reconstruction_patch_count: torch.FloatTensor | None = None


# ----------------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------------


def sincos_position_table(num_positions: int, dim: int) -> torch.Tensor:
    """Fixed 1-D sine-cosine table `(num_positions, dim)` (Transformer / ViT-MAE), shared by all leads (ST-MEM)."""
    if dim % 2:
        raise ValueError(f"sin-cos position embeddings need an even size, got {dim}")
    positions = torch.arange(num_positions, dtype=torch.float64)[:, None]
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions * omega[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1).float()


def patchify(ecg_values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """`(batch, num_leads, num_samples)` -> `(batch, num_leads, num_patches, patch_size)`."""
    batch_size, num_leads, num_samples = ecg_values.shape
    if num_samples % patch_size:
        raise ValueError(f"ecg_values has {num_samples} samples per lead, not a multiple of patch_size {patch_size}")
    return ecg_values.reshape(batch_size, num_leads, num_samples // patch_size, patch_size)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    upcast_softmax: bool = True,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain matmul-softmax-matmul attention; the reference that the fused kernels are checked against.

    `upcast_softmax=False` keeps the softmax in the input dtype (PyTorch's CPU softmax still accumulates bf16/fp16
    in fp32): the path SDPA may take for bf16/fp16 on CPU, see `_attention_function`."""
    attn_weights = torch.matmul(query, key.transpose(2, 3)).mul_(scaling)
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    if upcast_softmax:
        attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    else:
        attn_weights = attn_weights.softmax(dim=-1)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


def matmul_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Two matmuls and a softmax in the input dtype: the alternative to PyTorch's fused SDPA kernel for bf16/fp16 on
    CPU. It stands in for SDPA, so it takes SDPA's boolean mask (`True`: attend) and, like SDPA, returns no weights."""
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=query.dtype, device=query.device)
        attention_mask = torch.where(attention_mask, zero, torch.finfo(query.dtype).min)
    attn_output, _ = eager_attention_forward(
        module, query, key, value, attention_mask, scaling, dropout, upcast_softmax=False
    )
    return attn_output, None


# bf16/fp16 attention on CPU: the fused SDPA kernel or `matmul_attention_forward`, whichever this CPU runs faster.
# The winner depends on the CPU (AMX, AVX512-BF16), its load, oneDNN and torch: two matmuls were 1.6x faster on one
# AMD EPYC VM, the fused kernel 1.6x faster on a loaded one of the same kind (benchmarks/README.md). So it is timed
# once per machine at first use for each (dtype, heads, tokens, head size, threads), never fixed from one machine
# (`cached_cpu_choice`).
# `MERIT_CPU_ATTENTION=sdpa` or `=matmul` fixes it (benchmarks, runs that must be reproducible bit for bit).
CPU_ATTENTION_ENV = "MERIT_CPU_ATTENTION"
_cpu_attention_choice: dict[tuple, str] = {}


def time_cpu_attention_kernels(
    dtype: torch.dtype, batch_size: int, num_heads: int, num_tokens: int, head_dim: int, repeats: int = 3
) -> dict[str, float]:
    """Best-of-`repeats` seconds of one attention call per kernel (`"sdpa"`, `"matmul"`) on random q, k, v laid out
    as `MeritEcgAttention` makes them (views into one projection), interleaved so that machine drift hits both."""
    qkv = torch.randn(batch_size, num_tokens, 3, num_heads, head_dim, dtype=dtype)
    query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    module = nn.Module().eval()
    scaling = head_dim**-0.5
    kernels = {
        "sdpa": lambda: F.scaled_dot_product_attention(query, key, value, scale=scaling),
        "matmul": lambda: matmul_attention_forward(module, query, key, value, None, scaling),
    }
    return best_interleaved_seconds(kernels, repeats)


def best_interleaved_seconds(runs: dict[str, Callable[[], object]], repeats: int = 3) -> dict[str, float]:
    """Best-of-`repeats` seconds of each of `runs` (no arguments, run without autograd) after one warm-up call each
    (oneDNN reorders weights and builds its kernels on the first call), interleaved round by round so that drift of a
    shared machine hits every run alike: how merit_hf times the kernels it chooses between on a CPU."""
    best = dict.fromkeys(runs, float("inf"))
    with torch.inference_mode():
        for run in runs.values():
            run()
        for _ in range(repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                best[name] = min(best[name], time.perf_counter() - start)
    return best


# Kernel choices timed on a CPU are kept per machine: in the process (the dictionaries beside each choice) and in a
# JSON file shared by every process on the machine (`MERIT_CPU_CHOICES`: a path, or "off"; default
# `$HF_HOME/merit_hf/cpu_choices.json`), keyed by the CPU (model name and flags), PyTorch's version, the CPU-dispatch
# settings that change which kernels run (`ONEDNN_MAX_CPU_ISA`, `DNNL_MAX_CPU_ISA`, `ATEN_CPU_CAPABILITY`) and each
# choice's own key (shape, dtype, threads). So eight processes of one `accelerate launch` do not each time the kernels
# while the others load the CPU (they take turns through a lock file beside it, `cpu_choices.json.lock`: one times, the
# others read), and a new process starts without timing. Delete the file (or one machine's entry) to time again, for
# example after a choice was made on a busy machine; every entry keeps its timings and date.
CPU_CHOICES_ENV = "MERIT_CPU_CHOICES"
CPU_DISPATCH_ENVS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")


def read_cpuinfo(path: Path = Path("/proc/cpuinfo")) -> tuple[str, frozenset[str]] | None:
    """The first CPU's model name and feature flags from `/proc/cpuinfo` (None where there is no such file). On ARM
    Linux, which names neither, its implementer, part and variant and its "Features"."""
    try:
        text = path.read_text()
    except OSError:
        return None
    fields: dict[str, str] = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        fields.setdefault(name.strip(), value.strip())  # the first CPU's
    model_name = fields.get("model name", "")
    if not model_name and "CPU part" in fields:
        model_name = " ".join(
            f"{name} {fields[name]}" for name in ("CPU implementer", "CPU part", "CPU variant") if name in fields
        )
    return model_name, frozenset(fields.get("flags", fields.get("Features", "")).split())


@functools.cache
def cpu_machine_key() -> str:
    """What a CPU kernel choice depends on besides its own key: the CPU (model name and a digest of its flags),
    PyTorch (its version, which fixes its oneDNN) and the settings that cap the instruction set its kernels use
    (`CPU_DISPATCH_ENVS`, where set). Read once per process, as oneDNN and PyTorch read those settings."""
    read = read_cpuinfo()
    model_name, flags = read if read is not None else (platform.processor() or platform.machine(), frozenset())
    digest = hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest()[:12]
    dispatch = "".join(
        f" | {name}={os.environ[name]}" for name in CPU_DISPATCH_ENVS if os.environ.get(name)
    )  # settings that change which kernels run (AMX off, AVX2 only, ...)
    return f"{model_name or platform.machine()} | flags {digest} | torch {torch.__version__}{dispatch}"


def cpu_choices_file() -> Path | None:
    """The file kernel choices are kept in across processes, or None when `MERIT_CPU_CHOICES=off`."""
    setting = os.environ.get(CPU_CHOICES_ENV, "")
    if setting.lower() == "off":
        return None
    if setting:
        return Path(setting).expanduser()
    from huggingface_hub.constants import HF_HOME

    return Path(HF_HOME) / "merit_hf" / "cpu_choices.json"


def _read_cpu_choices(path: Path) -> dict:
    try:
        stored = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        logger.debug("CPU kernel choices: %s unreadable (%s); timing again", path, error)
        return {}
    return stored if isinstance(stored, dict) else {}


_cpu_choices_lock = threading.RLock()
_cpu_choices_lock_held = threading.local()


@contextlib.contextmanager
def _cpu_choices_locked(path: Path):
    """Every thread of this process, and every process that can lock `<path>.lock`, one at a time. Where the lock
    file cannot be made (a read-only folder) or locked, only the threads of this process."""
    with _cpu_choices_lock:
        if getattr(_cpu_choices_lock_held, "value", False):  # this thread already holds the file's lock
            yield
            return
        handle = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(path.with_name(f"{path.name}.lock"), "a+b")  # noqa: SIM115
            if os.name == "nt":
                import msvcrt

                handle.seek(0)
                msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK, 1)  # retries for 10 s, then OSError
            else:
                import fcntl

                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        except OSError as error:
            logger.debug("CPU kernel choices: could not lock %s (%s)", path, error)
            if handle is not None:
                handle.close()
                handle = None
        _cpu_choices_lock_held.value = True
        try:
            yield
        finally:
            _cpu_choices_lock_held.value = False
            if handle is not None:
                handle.close()  # releases the lock


def _write_cpu_choices(path: Path, stored: dict) -> None:
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            "w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
        ) as file:
            temporary = file.name
            file.write(json.dumps(stored, indent=1, sort_keys=True))
        os.replace(temporary, path)  # atomic: a reader sees the old file or the new one
        temporary = None
    except OSError as error:
        logger.debug("CPU kernel choices: could not write %s (%s)", path, error)
    finally:
        if temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(temporary)


def cached_cpu_choice(
    kind: str, key: tuple, choices: tuple[str, ...], time_choices: Callable[[], dict[str, float]]
) -> tuple[str, str]:
    """`(choice, how)`: the fastest of `choices` for `kind` and `key` on this machine, from `cpu_choices_file()` when
    an earlier process timed it (a stored value outside `choices` is timed again), else timed now by `time_choices`
    (seconds per choice) and stored. `how` says which, for the caller's debug line. Processes that reach the file at
    once take turns (a lock file beside it): one times, the others then read its choice. A file that cannot be read,
    written or locked only costs the timing."""
    path = cpu_choices_file()
    if path is None:
        seconds = time_choices()
        return min(seconds, key=seconds.get), _timed(seconds)
    entry_key = f"{kind} {key}"
    machine = cpu_machine_key()
    with _cpu_choices_locked(path):
        entries = _read_cpu_choices(path).get(machine)
        entry = entries.get(entry_key) if isinstance(entries, dict) else None
        if isinstance(entry, dict) and entry.get("choice") in choices:
            return entry["choice"], f"kept in {path}, timed {entry.get('timed_at', '?')}: {entry.get('seconds')} s"
        seconds = time_choices()
        choice = min(seconds, key=seconds.get)
        stored = _read_cpu_choices(path)  # as it is now, where a process could not take the lock
        if not isinstance(stored.get(machine), dict):
            stored[machine] = {}
        stored[machine][entry_key] = {
            "choice": choice,
            "seconds": {name: round(value, 7) for name, value in seconds.items()},
            "timed_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        _write_cpu_choices(path, stored)
    return choice, _timed(seconds)


def _timed(seconds: dict[str, float]) -> str:
    return f"timed: { {name: f'{value * 1000:.2f} ms' for name, value in seconds.items()} }"


def cpu_reduced_precision_attention(query: torch.Tensor) -> str:
    """`"sdpa"` or `"matmul"`: the faster bf16/fp16 attention kernel on this CPU for `query`'s shape (see above)."""
    forced = os.environ.get(CPU_ATTENTION_ENV)
    if forced:
        if forced not in ("sdpa", "matmul"):
            raise ValueError(f"{CPU_ATTENTION_ENV}: must be 'sdpa' or 'matmul', got {forced!r}")
        return forced
    if torch.compiler.is_compiling():  # no timing inside a trace; inductor fuses around the kernel anyway
        return "sdpa"
    batch_size, num_heads, num_tokens, head_dim = query.shape
    key = (query.dtype, num_heads, num_tokens, head_dim, torch.get_num_threads())
    if key not in _cpu_attention_choice:
        _cpu_attention_choice[key], how = cached_cpu_choice(
            "attention",
            key,
            ("sdpa", "matmul"),
            lambda: time_cpu_attention_kernels(query.dtype, min(batch_size, 16), num_heads, num_tokens, head_dim),
        )
        logger.debug(
            "CPU %s attention for %d heads x %d tokens x %d, %d threads: %s (%s)",
            query.dtype, num_heads, num_tokens, head_dim, key[-1], _cpu_attention_choice[key], how,
        )  # fmt: skip
    return _cpu_attention_choice[key]


def _attention_function(config, query: torch.Tensor) -> Callable:
    """The kernel `config._attn_implementation` names, except that SDPA for bf16/fp16 on CPU runs whichever of the
    fused kernel and `matmul_attention_forward` is faster on this CPU (`cpu_reduced_precision_attention`); fp32 on
    CPU and every dtype on GPUs keep the fused kernel."""
    implementation = config._attn_implementation
    if (
        implementation == "sdpa"
        and query.device.type == "cpu"
        and query.dtype in (torch.bfloat16, torch.float16)
        and cpu_reduced_precision_attention(query) == "matmul"
    ):
        return matmul_attention_forward
    return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)


class MeritEcgAttention(nn.Module):
    """Multi-head self-attention; `config._attn_implementation` picks eager, SDPA or another registered kernel."""

    def __init__(self, config: MeritEcgConfig, hidden_size: int, num_heads: int):
        super().__init__()
        self.config = config
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.attention_dropout = config.attention_probs_dropout_prob
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=config.qkv_bias)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, seq_len, _ = hidden_states.shape
        qkv = self.qkv(hidden_states).view(batch_size, seq_len, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attention_interface = _attention_function(self.config, query)
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(batch_size, seq_len, -1)
        return self.proj(attn_output), attn_weights


class MeritEcgMLP(nn.Module):
    def __init__(self, config: MeritEcgConfig, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(intermediate_size, hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.dropout(self.act(self.fc1(hidden_states)))))


class MeritEcgLayer(GradientCheckpointingLayer):
    """Pre-norm Transformer block (ViT): `x + attn(LN(x))`, then `x + mlp(LN(x))`."""

    def __init__(self, config: MeritEcgConfig, hidden_size: int, num_heads: int, intermediate_size: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.attention = MeritEcgAttention(config, hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.mlp = MeritEcgMLP(config, hidden_size, intermediate_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        attn_output, _ = self.attention(self.norm1(hidden_states), attention_mask, **kwargs)
        hidden_states = hidden_states + self.dropout(attn_output)
        return hidden_states + self.mlp(self.norm2(hidden_states))


class MeritEcgEmbeddings(nn.Module):
    """Lead-wise patch embeddings (ST-MEM): every lead is cut into patches of `patch_size` samples, each patch is
    embedded by LayerNorm -> Linear -> LayerNorm, then gets the fixed sin-cos embedding of its time position (shared
    by all leads) and the learnable embedding of its lead. A learnable [SEP] token closes each lead at both ends."""

    def __init__(self, config: MeritEcgConfig):
        super().__init__()
        self.config = config
        self.patch_norm_in = nn.LayerNorm(config.patch_size, eps=config.layer_norm_eps)
        self.patch_projection = nn.Linear(config.patch_size, config.hidden_size)
        self.patch_norm_out = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.lead_embeddings = nn.Parameter(torch.zeros(config.num_leads, config.hidden_size))
        self.position_embeddings = nn.Parameter(
            torch.zeros(config.num_patches_per_lead + 2, config.hidden_size), requires_grad=False
        )
        self.separator_token = nn.Parameter(torch.zeros(config.hidden_size)) if config.use_separator_tokens else None

    def forward(
        self,
        ecg_values: torch.Tensor,
        patch_attention_mask: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        apply_masking: bool = False,
        lead_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Returns `(embeddings, mask, ids_restore, token_attention_mask)`; the last three may be `None`. A lead that
        `lead_mask` `(batch, num_leads)` marks missing has all its tokens, [SEP] included, invalid in the last."""
        config = self.config
        batch_size, num_leads, _ = ecg_values.shape
        num_patches = config.num_patches_per_lead
        patches = patchify(ecg_values, config.patch_size)
        embeddings = self.patch_norm_out(self.patch_projection(self.patch_norm_in(patches)))
        lead_embeddings = self.lead_embeddings[None, :, None, :]
        embeddings = embeddings + self.position_embeddings[1 : num_patches + 1] + lead_embeddings

        mask = ids_restore = None
        token_mask = patch_attention_mask
        if apply_masking:
            embeddings, mask, ids_restore, token_mask = self.random_masking(embeddings, patch_attention_mask, noise)

        if self.separator_token is not None:
            first = self.separator_token + self.position_embeddings[0] + lead_embeddings
            last = self.separator_token + self.position_embeddings[num_patches + 1] + lead_embeddings
            first = first.expand(batch_size, num_leads, 1, -1)
            last = last.expand(batch_size, num_leads, 1, -1)
            embeddings = torch.cat([first, embeddings, last], dim=2)
            if token_mask is not None:
                ones = token_mask.new_ones(batch_size, num_leads, 1)
                if lead_mask is not None:
                    ones = lead_mask.to(token_mask.dtype)[:, :, None]
                token_mask = torch.cat([ones, token_mask, ones], dim=2)
        tokens_per_lead = embeddings.shape[2]
        embeddings = embeddings.reshape(batch_size, num_leads * tokens_per_lead, -1)
        if token_mask is not None:
            token_mask = token_mask.reshape(batch_size, num_leads * tokens_per_lead)
        return embeddings, mask, ids_restore, token_mask

    def random_masking(
        self,
        embeddings: torch.Tensor,
        patch_attention_mask: torch.Tensor | None,
        noise: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Per-lead random masking (ST-MEM): every lead keeps `num_visible_patches` patches at its own random positions.

        `noise` of shape `(batch_size, num_leads, num_patches_per_lead)` fixes the choice (patches with the smallest
        noise stay visible), so tests are deterministic, as in ViT-MAE. Patches made only of padding
        (`patch_attention_mask` 0) come after every patch that holds signal, whatever their noise: a padded record
        keeps its visible patches on its signal as long as it has enough of them (otherwise a record two-thirds long
        kept 3-5 real visible patches of 7); a record without padding is masked as its noise says.
        """
        batch_size, num_leads, num_patches, hidden_size = embeddings.shape
        expected = (batch_size, num_leads, num_patches)
        if noise is None:
            noise = torch.rand(expected, device=embeddings.device)
        elif tuple(noise.shape) != expected:
            raise ValueError(f"noise must have shape {expected} (batch, leads, patches), got {tuple(noise.shape)}")
        num_visible = self.config.num_visible_patches
        ids_shuffle = torch.argsort(noise, dim=-1)
        if patch_attention_mask is not None:  # padding last, the noise's order kept within signal and within padding
            padding = torch.gather(patch_attention_mask == 0, 2, ids_shuffle).to(torch.uint8)
            ids_shuffle = torch.gather(ids_shuffle, 2, torch.argsort(padding, dim=-1, stable=True))
        ids_restore = torch.argsort(ids_shuffle, dim=-1)
        ids_keep = ids_shuffle[..., :num_visible]
        kept = torch.gather(embeddings, 2, ids_keep[..., None].expand(-1, -1, -1, hidden_size))
        mask = torch.ones(expected, device=embeddings.device)
        mask[..., :num_visible] = 0
        mask = torch.gather(mask, 2, ids_restore)
        kept_attention = None
        if patch_attention_mask is not None:
            kept_attention = torch.gather(patch_attention_mask, 2, ids_keep)
        return kept, mask, ids_restore, kept_attention


class MeritEcgDecoder(nn.Module):
    """Light decoder of masked ECG modelling (ST-MEM): encoder tokens are projected to `decoder_hidden_size`, hidden
    patches are filled with a learnable mask token, and the tokens are decoded into `patch_size` samples per patch.

    `decoder_attention="per_lead"` (ST-MEM): each lead is decoded on its own, its tokens attend only to each other.
    `"axial"`: even layers attend across the leads at one patch position, odd layers along one lead (axial attention,
    as in video and spatio-temporal transformers), and a learnable decoder lead embedding marks every token's lead.
    A hidden patch then reads the other leads' visible patches at the same moment directly, which is where most of
    what can be predicted about it is (benchmarks/README.md, "Masked ECG modelling").
    """

    def __init__(self, config: MeritEcgConfig):
        super().__init__()
        self.config = config
        self.decoder_embed = nn.Linear(config.hidden_size, config.decoder_hidden_size)
        self.mask_token = nn.Parameter(torch.zeros(config.decoder_hidden_size))
        self.decoder_position_embeddings = nn.Parameter(
            torch.zeros(config.num_patches_per_lead + 2, config.decoder_hidden_size), requires_grad=False
        )
        self.decoder_lead_embeddings = None
        if config.decoder_attention == "axial":
            self.decoder_lead_embeddings = nn.Parameter(torch.zeros(config.num_leads, config.decoder_hidden_size))
        self.layers = nn.ModuleList(
            [
                MeritEcgLayer(
                    config,
                    config.decoder_hidden_size,
                    config.decoder_num_attention_heads,
                    config.decoder_intermediate_size,
                )
                for _ in range(config.decoder_num_hidden_layers)
            ]
        )
        self.norm = nn.LayerNorm(config.decoder_hidden_size, eps=config.layer_norm_eps)
        self.head = nn.Linear(config.decoder_hidden_size, config.patch_size)
        self.gradient_checkpointing = False

    def forward(
        self,
        hidden_states: torch.Tensor,
        ids_restore: torch.Tensor,
        patch_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`hidden_states` `(batch, leads * tokens_per_visible_lead, hidden)` -> patches `(batch, leads, N, P)`."""
        config = self.config
        batch_size, num_leads, num_patches = ids_restore.shape
        separators = 2 if config.use_separator_tokens else 0
        x = self.decoder_embed(hidden_states).reshape(batch_size, num_leads, -1, config.decoder_hidden_size)
        body = x[:, :, 1:-1] if separators else x
        num_hidden = num_patches - body.shape[2]
        mask_tokens = self.mask_token.expand(batch_size, num_leads, num_hidden, -1)
        body = torch.cat([body, mask_tokens], dim=2)
        body = torch.gather(body, 2, ids_restore[..., None].expand(-1, -1, -1, config.decoder_hidden_size))
        body = body + self.decoder_position_embeddings[1 : num_patches + 1]
        key_valid = patch_attention_mask
        if separators:
            first = x[:, :, :1] + self.decoder_position_embeddings[0]
            last = x[:, :, -1:] + self.decoder_position_embeddings[num_patches + 1]
            body = torch.cat([first, body, last], dim=2)
            if key_valid is not None:
                ones = key_valid.new_ones(batch_size, num_leads, 1)
                key_valid = torch.cat([ones, key_valid, ones], dim=2)
        if self.decoder_lead_embeddings is None:
            tokens = self._decode_per_lead(body, key_valid)
        else:
            tokens = self._decode_axial(body + self.decoder_lead_embeddings[:, None, :], key_valid)
        patches = self.head(self.norm(tokens))
        return patches[:, :, 1:-1] if separators else patches

    def _decode_per_lead(self, tokens: torch.Tensor, key_valid: torch.Tensor | None) -> torch.Tensor:
        """`(batch, leads, T, D)` -> the same shape; every lead is one sequence."""
        batch_size, num_leads, length, width = tokens.shape
        sequences = tokens.reshape(batch_size * num_leads, length, width)
        if key_valid is not None:
            key_valid = key_valid.reshape(batch_size * num_leads, length)
        attention_mask = create_bidirectional_mask(
            config=self.config, inputs_embeds=sequences, attention_mask=key_valid
        )
        for layer in self.layers:
            sequences = layer(sequences, attention_mask)
        return sequences.reshape(batch_size, num_leads, length, width)

    def _decode_axial(self, tokens: torch.Tensor, key_valid: torch.Tensor | None) -> torch.Tensor:
        """`(batch, leads, T, D)` -> the same shape; even layers attend across leads, odd layers along a lead."""
        batch_size, num_leads, length, width = tokens.shape
        across_mask = along_mask = None
        if key_valid is not None:
            across_mask = self._attention_mask(
                key_valid.transpose(1, 2).reshape(batch_size * length, num_leads), tokens
            )
            along_mask = self._attention_mask(key_valid.reshape(batch_size * num_leads, length), tokens)
        for index, layer in enumerate(self.layers):
            if index % 2 == 0:  # across the leads, at one patch position
                sequences = tokens.transpose(1, 2).reshape(batch_size * length, num_leads, width)
                sequences = layer(sequences, across_mask)
                tokens = sequences.reshape(batch_size, length, num_leads, width).transpose(1, 2)
            else:  # along one lead
                sequences = layer(tokens.reshape(batch_size * num_leads, length, width), along_mask)
                tokens = sequences.reshape(batch_size, num_leads, length, width)
        return tokens

    def _attention_mask(self, key_valid: torch.Tensor, like: torch.Tensor):
        """The attention implementation's mask for `(sequences, keys)` validity, in `like`'s dtype and device."""
        inputs_embeds = like.new_empty(*key_valid.shape, 1)  # only its batch, length, dtype and device are read
        return create_bidirectional_mask(config=self.config, inputs_embeds=inputs_embeds, attention_mask=key_valid)


class MeritProjectionHead(nn.Module):
    """Linear -> activation -> Linear into the shared ECG-report space (MERL's text head, used for both towers)."""

    def __init__(self, input_size: int, projection_dim: int, hidden_act: str):
        super().__init__()
        self.fc1 = nn.Linear(input_size, projection_dim)
        self.act = ACT2FN[hidden_act]
        self.fc2 = nn.Linear(projection_dim, projection_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(features)))


def masked_patch_reconstruction_loss(
    ecg_values: torch.Tensor,
    predicted_patches: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    norm_pix_loss: bool,
    patch_attention_mask: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Mean squared error over hidden patches only (ViT-MAE / ST-MEM).

    Per patch: the mean over its samples of `(prediction - target)^2`; then the mean over hidden patches that hold
    signal. With `norm_pix_loss`, each target patch is normalised by its own mean and standard deviation first. That
    standard deviation is the biased one (divided by `patch_size`; ViT-MAE divides by `patch_size - 1`): it only
    rescales the target by `sqrt(P / (P - 1))` (1.007 for P = 75). In these units a loss of 1.0 is what predicting each
    hidden patch's own mean scores, the baseline of `benchmarks/masked_modelling.py`.
    Visible patches contribute nothing, so changing their prediction leaves the loss unchanged.
    """
    target = patchify(ecg_values, patch_size)
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True, unbiased=False)
        target = (target - mean) / (var + eps) ** 0.5
    per_patch = ((predicted_patches.float() - target.float()) ** 2).mean(dim=-1)
    weights = reconstruction_patch_weights(mask, patch_attention_mask)
    return (per_patch * weights).sum() / weights.sum().clamp(min=1.0)


def reconstruction_patch_weights(mask: torch.Tensor, patch_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """1 for the patches `masked_patch_reconstruction_loss` averages over (hidden, and holding signal where
    `patch_attention_mask` is given), 0 elsewhere, as fp32 of `mask`'s shape: their sum is the loss's denominator."""
    weights = mask.float()
    if patch_attention_mask is not None:
        weights = weights * patch_attention_mask.float()
    return weights


def unit_vectors(embeddings: torch.Tensor) -> torch.Tensor:
    """`embeddings` L2-normalised along the last dimension, in fp32 whatever their dtype: bf16 unit vectors have norms
    off by up to 0.004 (CPU autocast keeps `normalize` in bf16), an error `similarity_logits` would scale by up to 100
    however precisely it multiplies them."""
    return F.normalize(embeddings.float(), dim=-1)


def similarity_logits(ecg_embeds: torch.Tensor, text_embeds: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`scale * ecg_embeds @ text_embeds.T`, in fp32 also under autocast. In bf16 a cosine keeps 8 bits (about 0.004
    at 1), which the scale (up to 100) turns into logit errors of about 0.4; the matmul is `batch x batch x
    projection_dim`, too small for its precision to cost time. The models pass fp32 unit vectors (`unit_vectors`):
    rounded to bf16 before this, they carry that error in already."""
    device_type = ecg_embeds.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            return similarity_logits(ecg_embeds, text_embeds, scale)
    return scale.float() * ecg_embeds.float() @ text_embeds.float().t()


def contrastive_loss(logits_per_ecg: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP): `(CE(L, I) + CE(L^T, I)) / 2` for the scaled similarities `L = s * E T^T` of
    L2-normalised embeddings, matching pairs on the diagonal.

    Over the batch it is given: a distributed run shares its batch across processes in the training code
    (`merit_hf.training.losses.ContrastiveLoss`, as open_clip's `ClipLoss`), never in the model.
    """
    labels = torch.arange(logits_per_ecg.shape[0], device=logits_per_ecg.device)
    return (F.cross_entropy(logits_per_ecg, labels) + F.cross_entropy(logits_per_ecg.t(), labels)) / 2


# ----------------------------------------------------------------------------------------------------------------------
# Pretrained-model bases: initialisation and strict, safetensors-only loading
# ----------------------------------------------------------------------------------------------------------------------


# The keyword arguments of transformers' `push_to_hub`, which `save_pretrained(push_to_hub=True, ...)` passes on to it;
# those that are also `save_pretrained`'s own stay for the save as well.
_SAVE_AND_PUSH_ARGUMENTS = ("token", "max_shard_size")
_PUSH_TO_HUB_ARGUMENTS = tuple(
    name
    for name, parameter in inspect.signature(PushToHubMixin.push_to_hub).parameters.items()
    if parameter.kind is inspect.Parameter.KEYWORD_ONLY and name not in _SAVE_AND_PUSH_ARGUMENTS
)


class _StrictLoadingMixin:
    """`from_pretrained` that never hands back silently random weights.

    Missing keys raise unless they belong to a head that a fine-tuning run is expected to create
    (`_heads_created_on_load`) and the folder was saved as another class (a classifier's own folder holds its trained
    head: one without it raises); so do weights of the wrong shape, unless they belong to such a head and
    `ignore_mismatched_sizes=True` asks for a new one (a new label set). Unexpected keys raise unless they belong to a
    MERIT part that this class drops on purpose (`_keys_to_ignore_on_load_unexpected`, e.g. the decoder when only the
    encoder is wanted). Checkpoints are read from safetensors only: pickled `.bin` files can run code and are refused.
    """

    _heads_created_on_load: tuple[str, ...] = ()
    _checkpoint_key_mapping: dict[str, str] | None = None
    _auto_map: dict[str, str] = {}
    _pipeline_auto_class: str | None = None  # the Auto class that the folder's ECG pipelines load it with

    def save_pretrained(self, save_directory, *args, **kwargs):
        # `auto_map` lists exactly the Auto classes that can load the folder being written (transformers would only
        # add the saved class to whatever a loaded config carried, e.g. a pretraining folder's `AutoModel` entry in a
        # classifier's folder, which then fails on the missing text tower).
        self.config.auto_map = dict(self._auto_map)
        if self._pipeline_auto_class is not None:  # pipeline_merit.py is copied with this file (a relative import)
            self.config.custom_pipelines = custom_pipelines_for(
                self._pipeline_auto_class,
                classifier=self._pipeline_auto_class != "AutoModel",
                two_tower=hasattr(self, "get_text_features")
                or hasattr(getattr(self, "merit", None), "get_text_features"),
            )
        # MERIT's weight names are its own: never write them back through a loading `key_mapping`.
        kwargs.setdefault("save_original_format", False)
        # transformers uploads inside `super().save_pretrained`, before the files written below exist; so the folder
        # is saved first and then pushed whole (`push_to_hub` saves it again into a temporary folder, through here).
        push_to_hub = kwargs.pop("push_to_hub", False)
        repo_id = kwargs.pop("repo_id", Path(save_directory).name)
        # every argument of `push_to_hub` (`revision`, `commit_description`, `tags`, ...) goes to it; `token` and
        # `max_shard_size` are also `save_pretrained`'s own
        hub_kwargs = {key: kwargs.pop(key) for key in _PUSH_TO_HUB_ARGUMENTS if key in kwargs}
        result = super().save_pretrained(save_directory, *args, **kwargs)
        is_main_process = kwargs.get("is_main_process", True)
        pipelines = getattr(self.config, "custom_pipelines", None) or {}
        if "zero-shot-ecg-classification" in pipelines and is_main_process:
            # the prompt file behind class_descriptions="superclass" in the folder's zero-shot pipeline
            save_zero_shot_prompts(save_directory, self.name_or_path)
        if push_to_hub and is_main_process:
            hub_kwargs.update({key: kwargs[key] for key in _SAVE_AND_PUSH_ARGUMENTS if key in kwargs})
            self.push_to_hub(repo_id, **hub_kwargs)
        return result

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        if cls._checkpoint_key_mapping is not None:
            kwargs.setdefault("key_mapping", cls._checkpoint_key_mapping)
        if kwargs.get("use_safetensors") is False:
            raise ValueError(
                f"{pretrained_model_name_or_path}: merit_hf loads safetensors checkpoints only "
                "(pickled .bin files can execute code); convert the checkpoint with save_pretrained first"
            )
        kwargs["use_safetensors"] = True
        wants_info = kwargs.pop("output_loading_info", False)
        local = Path(str(pretrained_model_name_or_path)) / kwargs.get("subfolder", "")
        name = str(pretrained_model_name_or_path)
        looks_local = Path(name).is_absolute() or name.startswith((".", "~")) or name.count("/") > 1 or "\\" in name
        if looks_local and not Path(name).expanduser().exists():  # else transformers says "Repo id must use ..."
            raise OSError(f"{name}: no such folder (a Hub id is 'owner/name')")
        if local.is_dir() and not any(local.glob("*.safetensors")):
            found = sorted(p.name for p in local.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".ckpt"})
            problem = f"pickled weights {found} are refused" if found else "no model.safetensors found"
            raise OSError(f"{local}: {problem}; merit_hf loads safetensors checkpoints only")
        if local.is_dir() and kwargs.get("config") is None and not (local / "config.json").is_file():
            raise OSError(
                f"{local}: no config.json; the weights cannot be read without the config they were saved with"
            )
        # transformers raises a bare "see the report above" for weights of the wrong shape; they are named below
        loading_kwargs = {**kwargs, "ignore_mismatched_sizes": True}
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *model_args, output_loading_info=True, **loading_kwargs
            )
        except Exception as error:  # the safetensors reader's own messages do not say which file broke
            if "safetensors" in type(error).__module__ or "deserializ" in str(error).lower():
                raise OSError(
                    f"{pretrained_model_name_or_path}: the safetensors checkpoint is corrupt or truncated ({error})"
                ) from error
            raise
        # A head is created only from a folder of another class (a pretraining or encoder folder); a folder saved as
        # this class has trained its head, and one whose checkpoint lacks it is incomplete.
        saved_as_this_class = cls.__name__ in (getattr(model.config, "architectures", None) or ())
        created_heads = () if saved_as_this_class else cls._heads_created_on_load
        missing = [k for k in info["missing_keys"] if not k.startswith(created_heads)]
        problems = []
        if missing:
            problems.append(f"missing weights {sorted(missing)[:8]}{' ...' if len(missing) > 8 else ''}")
            if saved_as_this_class and any(k.startswith(cls._heads_created_on_load) for k in missing):
                problems.append(f"the folder was saved as {cls.__name__}, so its head was trained and must be there")
        if info["unexpected_keys"]:
            unexpected = sorted(info["unexpected_keys"])
            problems.append(f"unexpected weights {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        mismatched = [
            key
            for key, *_ in info.get("mismatched_keys") or ()
            if not (kwargs.get("ignore_mismatched_sizes") and key.startswith(cls._heads_created_on_load))
        ]
        if mismatched:
            shapes = {key: (saved, built) for key, saved, built in info.get("mismatched_keys") or ()}
            named = [f"{key} {tuple(shapes[key][0])} in the file, {tuple(shapes[key][1])} in the model"
                     for key in sorted(mismatched)[:4]]  # fmt: skip
            hint = (
                "; a new head for another label set: ignore_mismatched_sizes=True"
                if any(key.startswith(cls._heads_created_on_load) for key in mismatched)
                else "; check that config.json is the one these weights were saved with"
            )
            more = f" and {len(mismatched) - 4} more" if len(mismatched) > 4 else ""
            problems.append(f"weights of the wrong shape: {'; '.join(named)}{more}{hint}")
        if problems:
            raise ValueError(
                f"{pretrained_model_name_or_path}: checkpoint does not match {cls.__name__}: "
                + "; ".join(problems)
                + ". Refusing to return a model with randomly initialised weights."
            )
        for module in model.modules():
            if isinstance(module, MeritModel):
                module.clamp_logit_scale_()
        # transformers puts every loaded weight into a new `nn.Parameter` that requires grad
        model._freeze_fixed_parameters()
        # A diverged run saves NaN weights without complaint; every output of the model would then be NaN.
        not_finite = [
            name
            for name, tensor in model.state_dict().items()
            if tensor.is_floating_point() and not tensor.is_meta and not torch.isfinite(tensor).all()
        ]
        if not_finite:
            raise ValueError(
                f"{pretrained_model_name_or_path}: weights {not_finite[:8]}{' ...' if len(not_finite) > 8 else ''} "
                "hold NaN or inf values (a diverged training run, or a corrupt file); refusing to load them"
            )
        return (model, info) if wants_info else model


def _frozen_parts_to_eval(module: nn.Module) -> None:
    for child in module.children():
        parameters = list(child.parameters())
        if parameters and not any(parameter.requires_grad for parameter in parameters):
            child.eval()
        else:
            _frozen_parts_to_eval(child)


class MeritBasePreTrainedModel(_StrictLoadingMixin, PreTrainedModel):
    """What every MERIT model shares: strict safetensors loading, the attention kernels it supports, gradient
    checkpointing of `MeritEcgLayer`, and the transformers-5 style init of MERIT's own modules."""

    main_input_name = "ecg_values"
    supports_gradient_checkpointing = True
    # The losses are means over the batch given and take no `num_items_in_batch`; without this, `Trainer` (seeing
    # `**kwargs` in `forward`) would skip its division by the accumulation steps and scale by the processes.
    accepts_loss_kwargs = False
    _no_split_modules = ["MeritEcgLayer"]
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    # Parameters that are embeddings rather than weights: no weight decay (ST-MEM's `no_weight_decay`, timm).
    _no_weight_decay_parameters = (
        "lead_embeddings",
        "decoder_lead_embeddings",
        "separator_token",
        "mask_token",
        "logit_scale",
    )

    # Parameters that never train: the fixed sin-cos position tables (MAE's, ST-MEM's).
    _fixed_parameter_names = ("position_embeddings", "decoder_position_embeddings")

    def _init_weights(self, module: nn.Module) -> None:
        _init_merit_module(self, module, self.config)

    def _freeze_fixed_parameters(self) -> None:
        """Sets `requires_grad=False` again where the model was built with it: the fixed position tables (and, in
        subclasses, what their config freezes). `from_pretrained` calls it after loading, since transformers puts
        every loaded weight into a new `nn.Parameter` that requires grad; without it fine-tuning a loaded model would
        train (and decay) the sin-cos tables."""
        for name, parameter in self.named_parameters():
            if name.rpartition(".")[2] in self._fixed_parameter_names:
                parameter.requires_grad_(False)

    def no_weight_decay(self) -> set[str]:
        """Names of the parameters an optimizer should not decay (timm's convention): biases, norms and every other
        1-D parameter, embedding tables (`nn.Embedding`, e.g. the text tower's), MERIT's lead / separator / mask
        token embeddings and the logit scale. Decaying an embedding pulls it towards zero for no regularising gain;
        ST-MEM and ViT-MAE exclude theirs."""
        names = set()
        for module_name, module in self.named_modules():
            for name, parameter in module.named_parameters(recurse=False):
                full_name = f"{module_name}.{name}" if module_name else name
                if (
                    parameter.ndim < 2
                    or isinstance(module, (nn.Embedding, nn.LayerNorm))
                    or name in self._no_weight_decay_parameters
                ):
                    names.add(full_name)
        return names

    def train(self, mode: bool = True):
        """`nn.Module.train`, except that a part whose parameters are all frozen stays in eval mode: a frozen text
        tower (LiT) then runs exactly as at inference, without dropout noise in the embeddings it is aligned to."""
        super().train(mode)
        if mode:
            _frozen_parts_to_eval(self)
        return self


class MeritEcgPreTrainedModel(MeritBasePreTrainedModel):
    config_class = MeritEcgConfig
    config: MeritEcgConfig
    base_model_prefix = "ecg_model"
    input_modalities = ("ecg",)
    # What `output_hidden_states` / `output_attentions` collect (transformers' `capture_outputs` hooks): each
    # encoder layer's output after the embeddings, and each attention's weights (eager attention only).
    _can_record_outputs = {"hidden_states": MeritEcgLayer, "attentions": MeritEcgAttention}
    _auto_map = {
        "AutoConfig": "configuration_merit.MeritEcgConfig",
        "AutoModel": "modeling_merit.MeritEcgModel",
        # a classifier starting from this encoder: a `MeritForEcgClassification` around it
        "AutoModelForSequenceClassification": "modeling_merit.MeritForEcgClassificationFromEncoder",
    }
    _pipeline_auto_class = "AutoModel"


class MeritPreTrainedModel(MeritBasePreTrainedModel):
    config_class = MeritConfig
    config: MeritConfig
    base_model_prefix = "merit"
    input_modalities = ("ecg", "text")
    _auto_map = {
        "AutoConfig": "configuration_merit.MeritConfig",
        "AutoModel": "modeling_merit.MeritModel",
        "AutoModelForSequenceClassification": "modeling_merit.MeritForEcgClassification",
    }
    _pipeline_auto_class = "AutoModel"
    _has_text_tower = True  # a classifier's folder holds no text tower to load

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        # A classifier's folder (what AutoModel, which maps a MeritConfig to MeritModel, is often pointed at for the
        # fine-tuned encoder) is refused before loading, instead of after a report of the missing text tower.
        if cls._has_text_tower:
            config = kwargs.get("config")
            if isinstance(config, PreTrainedConfig):
                architectures = config.architectures
            else:
                hub = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")
                try:
                    config_dict, _ = PreTrainedConfig.get_config_dict(
                        pretrained_model_name_or_path, **{k: kwargs[k] for k in hub if k in kwargs}
                    )
                except Exception:  # no folder, no config.json, ...: the loading below names the problem
                    config_dict = {}
                architectures = config_dict.get("architectures")
            if MeritForEcgClassification.__name__ in (architectures or ()):
                raise ValueError(_classifier_folder_message(pretrained_model_name_or_path, cls.__name__))
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    # The ECG encoder's patch projection (`MeritEcgModel.get_input_embeddings`) for every model that wraps it.
    def get_input_embeddings(self) -> nn.Module:
        return ecg_encoder_of(self).get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        ecg_encoder_of(self).set_input_embeddings(value)

    def resize_token_embeddings(self, new_num_tokens: int | None = None, *args, **kwargs) -> nn.Embedding:
        """The text tower's `resize_token_embeddings` (after tokens were added to the report tokenizer): the input
        embeddings of a MERIT model are the ECG patch projection, which has no vocabulary."""
        merit = self if hasattr(self, "text_model") else getattr(self, "merit", None)
        if merit is None:
            raise ValueError(
                f"{type(self).__name__} has no text tower, hence no token embeddings to resize (its input embeddings "
                "are the ECG patch projection)"
            )
        embeddings = merit.text_model.resize_token_embeddings(new_num_tokens, *args, **kwargs)
        merit.config.text_config.vocab_size = merit.text_model.config.vocab_size  # saved with the model
        self.config.text_config.vocab_size = merit.text_model.config.vocab_size
        return embeddings


def _init_merit_module(model: PreTrainedModel, module: nn.Module, config) -> None:
    """transformers-5 style init: every write goes through `transformers.initialization`, which skips tensors that a
    checkpoint already filled (so loading never re-initialises a trained weight).

    Linear layers of the ECG tower, the decoder and the projection heads follow `MeritEcgConfig.initializer_scheme`:
    `"xavier_uniform"` with zero bias by default, as ViT-MAE's and ST-MEM's code do. With the truncated normal of std
    0.02 that BERT/ViT use (`"trunc_normal"`, this project's scheme before it was measured) the masked-modelling
    gradient reaching the encoder was 1e-4 of the contrastive one on the quick-start model, and masked modelling did
    not train the encoder (benchmarks/README.md, "Masked ECG modelling"). Embedding vectors (lead, separator and
    mask tokens) keep a normal of std `initializer_range` (ViT-MAE's mask token); position tables are fixed sin-cos.
    The text tower is a sub-model and keeps its own `_init_weights`.
    """
    std = config.initializer_range
    ecg_config = getattr(config, "ecg_config", None) or config  # the ECG tower's config holds the scheme
    if isinstance(module, nn.Linear):
        if ecg_config.initializer_scheme == "xavier_uniform":
            init.xavier_uniform_(module.weight)
        else:
            init.trunc_normal_(module.weight, std=std)
        if module.bias is not None:
            init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        init.ones_(module.weight)
        init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        PreTrainedModel._init_weights(model, module)
    elif isinstance(module, MeritEcgEmbeddings):
        table = sincos_position_table(*module.position_embeddings.shape)
        init.copy_(module.position_embeddings, table)
        init.normal_(module.lead_embeddings, std=std)
        if module.separator_token is not None:
            init.normal_(module.separator_token, std=std)
    elif isinstance(module, MeritEcgDecoder):
        table = sincos_position_table(*module.decoder_position_embeddings.shape)
        init.copy_(module.decoder_position_embeddings, table)
        init.normal_(module.mask_token, std=std)
        if module.decoder_lead_embeddings is not None:
            init.normal_(module.decoder_lead_embeddings, std=std)
    elif isinstance(module, MeritModel):
        init.constant_(module.logit_scale, model.config.logit_scale_init_value)


# ----------------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------------


class MeritEcgModel(MeritEcgPreTrainedModel):
    r"""
    The MERIT ECG encoder: lead-wise patch tokens through a pre-norm Transformer; `pooler_output` is the LayerNorm of
    the mean patch token, the feature used for linear probing.

    Example:

    ```python
    >>> import torch
    >>> from merit_hf import MeritEcgConfig, MeritEcgModel
    >>> config = MeritEcgConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    >>> model = MeritEcgModel(config)
    >>> model(torch.randn(2, 12, 2250)).pooler_output.shape
    torch.Size([2, 64])
    ```"""

    # Loads the encoder out of any MERIT checkpoint (two-tower, pretraining, classification or report generation, whose
    # folders saved before the encoder was named `ecg_model` hold `ecg_encoder.*`) too.
    _checkpoint_key_mapping = {r"^merit\.ecg_model\.": "", r"^ecg_model\.": "", r"^ecg_encoder\.": ""}
    _keys_to_ignore_on_load_unexpected = [
        r"^(merit\.)?decoder\.",
        r"text_model\.",
        r"text_projection\.",
        r"ecg_projection\.",
        r"logit_scale",
        r"^classifier\.",
        r"^multi_modal_projector\.",
        r"^language_model\.",
    ]

    def __init__(self, config: MeritEcgConfig):
        super().__init__(config)
        self.embeddings = MeritEcgEmbeddings(config)
        self.layers = nn.ModuleList(
            [
                MeritEcgLayer(config, config.hidden_size, config.num_attention_heads, config.intermediate_size)
                for _ in range(config.num_hidden_layers)
            ]
        )
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.pooler_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        """The linear patch projection, whose output is the first tensor that depends on weights (ViT returns its
        patch embeddings the same way): `enable_input_require_grads()` hooks it, so that reentrant gradient
        checkpointing with a frozen encoder (PEFT LoRA) still passes gradients to the adapters."""
        return self.embeddings.patch_projection

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embeddings.patch_projection = value

    def _check_input(self, ecg_values: torch.Tensor) -> None:
        config = self.config
        expected = (config.num_leads, config.num_samples)
        if ecg_values.dim() != 3 or tuple(ecg_values.shape[1:]) != expected:
            raise ValueError(
                f"ecg_values must have shape (batch, {expected[0]} leads, {expected[1]} samples) at "
                f"{config.sampling_rate} Hz, got {tuple(ecg_values.shape)}; run the MeritFeatureExtractor first"
            )

    def _patch_attention_mask(self, ecg_attention_mask: torch.Tensor | None, batch_size: int) -> torch.Tensor | None:
        if ecg_attention_mask is None:
            return None
        config = self.config
        if tuple(ecg_attention_mask.shape) != (batch_size, config.num_samples):
            raise ValueError(
                f"ecg_attention_mask must have shape (batch, {config.num_samples}), got {tuple(ecg_attention_mask.shape)}"
            )
        valid = ecg_attention_mask.reshape(batch_size, config.num_patches_per_lead, config.patch_size).any(-1)
        if not torch.compiler.is_compiling():  # an all-padding record would give a constant embedding, not an error
            empty = torch.nonzero(~valid.any(dim=1)).flatten().tolist()
            if empty:
                raise ValueError(
                    f"ecg_attention_mask: records {empty} are all padding; an ECG needs at least one real sample "
                    "(1 in the mask)"
                )
        return valid.float()[:, None, :].expand(-1, config.num_leads, -1).contiguous()

    def _check_lead_mask(self, lead_mask: torch.Tensor | None, batch_size: int) -> torch.Tensor | None:
        """`lead_mask` as bool `(batch, num_leads)`, after checking its shape and that every record has a lead."""
        if lead_mask is None:
            return None
        num_leads = self.config.num_leads
        if tuple(lead_mask.shape) != (batch_size, num_leads):
            raise ValueError(
                f"lead_mask must have shape (batch, {num_leads}) (True for a recorded lead, in config.lead_names "
                f"order), got {tuple(lead_mask.shape)}"
            )
        lead_mask = lead_mask.bool()
        if not torch.compiler.is_compiling():
            empty = torch.nonzero(~lead_mask.any(dim=1)).flatten().tolist()
            if empty:
                raise ValueError(f"lead_mask: records {empty} have no lead; an ECG needs at least one recorded lead")
        return lead_mask

    def _token_validity(
        self, ecg_attention_mask: torch.Tensor | None, lead_mask: torch.Tensor | None, batch_size: int
    ) -> torch.Tensor | None:
        """`(batch, num_leads, num_patches_per_lead)` 1/0: a patch counts when it holds signal of a recorded lead.
        Invalid patches are left out as attention keys and of the pooling, so a missing lead's tokens take no part
        in any other token's representation (never fed as zeros)."""
        patch_attention_mask = self._patch_attention_mask(ecg_attention_mask, batch_size)
        if lead_mask is None:
            return patch_attention_mask
        leads = lead_mask.float()[:, :, None].expand(-1, -1, self.config.num_patches_per_lead)
        return leads.contiguous() if patch_attention_mask is None else patch_attention_mask * leads

    @capture_outputs(tie_last_hidden_states=False)  # hidden_states[-1] is the last layer's output, before `norm`
    def forward(
        self,
        ecg_values: torch.Tensor,
        ecg_attention_mask: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        apply_masking: bool = False,
        lead_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> MeritEcgModelOutput | tuple:
        r"""
        ecg_values (`torch.FloatTensor` of shape `(batch_size, num_leads, num_samples)`):
            Output of [`MeritFeatureExtractor`]: leads in `config.lead_names` order, `config.sampling_rate` Hz.
        ecg_attention_mask (`torch.LongTensor` of shape `(batch_size, num_samples)`, *optional*):
            1 for real samples, 0 for padding (from the feature extractor with `padding=True`). Patches made only of
            padding are ignored as attention keys and in pooling.
        noise (`torch.FloatTensor` of shape `(batch_size, num_leads, num_patches_per_lead)`, *optional*):
            Fixes which patches masking hides (the smallest noise stays visible). Only used with `apply_masking`.
        apply_masking (`bool`, defaults to `False`):
            Hide `config.mask_ratio` of each lead's patches (pretraining); embeddings for downstream use see all.
        lead_mask (`torch.BoolTensor` of shape `(batch_size, num_leads)`, *optional*):
            `True` for a lead the record has, `False` for a missing one (from the feature extractor with
            `missing_leads="mask"`). A missing lead's tokens are never attention keys and are left out of pooling,
            so the output is what the recorded leads alone give, whatever values the missing leads hold; its own
            positions in `last_hidden_state` carry no meaning.
        output_hidden_states, output_attentions, return_dict (`bool`, *optional*):
            transformers' output flags (defaults from the config). The hidden states are the embeddings and each
            layer's output; attention weights come with `attn_implementation="eager"` only.
        """
        self._check_input(ecg_values)
        # The feature extractor gives float32; a model loaded with `dtype=torch.bfloat16` (or half) computes in that.
        ecg_values = ecg_values.to(self.embeddings.patch_projection.weight.dtype)
        batch_size = ecg_values.shape[0]
        lead_mask = self._check_lead_mask(lead_mask, batch_size)
        patch_attention_mask = self._token_validity(ecg_attention_mask, lead_mask, batch_size)
        embeddings, mask, ids_restore, token_mask = self.embeddings(
            ecg_values, patch_attention_mask, noise=noise, apply_masking=apply_masking, lead_mask=lead_mask
        )
        # `None` when every token is valid (a check that reads the data, so it is skipped under `torch.compile`).
        attention_mask = create_bidirectional_mask(
            config=self.config, inputs_embeds=embeddings, attention_mask=token_mask
        )
        if (
            kwargs.get("output_attentions", self.config.output_attentions)
            and self.config._attn_implementation != "eager"
        ):
            logger.warning_once(
                f"attn_implementation={self.config._attn_implementation!r} does not return attention weights; load "
                "the model with attn_implementation='eager' (or call set_attn_implementation('eager')) to get them"
            )
        hidden_states = embeddings
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask)
        hidden_states = self.norm(hidden_states)
        pooled = self.pooler_norm(self._mean_patch_token(hidden_states, token_mask))
        return MeritEcgModelOutput(
            last_hidden_state=hidden_states,
            pooler_output=pooled,
            mask=mask,
            ids_restore=ids_restore,
            patch_attention_mask=patch_attention_mask,
        )

    def _mean_patch_token(self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
        batch_size, seq_len, hidden_size = hidden_states.shape
        per_lead = hidden_states.reshape(batch_size, self.config.num_leads, -1, hidden_size)
        weights = torch.ones(per_lead.shape[:3], device=hidden_states.device, dtype=hidden_states.dtype)
        if token_mask is not None:
            weights = token_mask.reshape(weights.shape).to(hidden_states.dtype)
        if self.config.use_separator_tokens:
            weights = weights.clone()
            weights[:, :, 0] = 0
            weights[:, :, -1] = 0
        total = (per_lead * weights[..., None]).sum(dim=(1, 2))
        return total / weights.sum(dim=(1, 2))[:, None].clamp(min=1.0)


class MeritModel(MeritPreTrainedModel):
    r"""
    MERIT's two towers: the ECG encoder and a text encoder, each followed by a projection into a shared space where
    scaled cosine similarity scores ECG-report pairs (CLIP-style).

    Example:

    ```python
    >>> import torch
    >>> from transformers import BertConfig
    >>> from merit_hf import MeritConfig, MeritEcgConfig, MeritModel
    >>> ecg = MeritEcgConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    >>> text = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    >>> model = MeritModel(MeritConfig(ecg_config=ecg, text_config=text, projection_dim=16))
    >>> model.get_ecg_features(torch.randn(2, 12, 2250)).pooler_output.shape
    torch.Size([2, 16])
    ```"""

    _keys_to_ignore_on_load_unexpected = [r"^decoder\.", r"^classifier\."]

    def __init__(self, config: MeritConfig):
        super().__init__(config)
        self.ecg_model = MeritEcgModel._from_config(config.ecg_config)
        self.text_model = _text_encoder_from_config(config)
        text_hidden = config.text_config.hidden_size
        self.ecg_projection = MeritProjectionHead(
            config.ecg_config.hidden_size, config.projection_dim, config.projection_hidden_act
        )
        self.text_projection = MeritProjectionHead(text_hidden, config.projection_dim, config.projection_hidden_act)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        self.post_init()

    def clamped_logit_scale(self) -> torch.Tensor:
        """The inverse temperature `exp(logit_scale)` with the log clamped at `config.logit_scale_max` (CLIP: 100).

        For inference only: in `forward` the scale is `exp(logit_scale)` unclamped, because a clamp there has zero
        gradient above the cap and a temperature that reached it could never come back. Training keeps the
        parameter in range instead with `clamp_logit_scale_()` after every optimizer step (open_clip's recipe)."""
        return self.logit_scale.clamp(max=self.config.logit_scale_max).exp()

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Clamp the `logit_scale` parameter in place to `[0, config.logit_scale_max]` (open_clip clamps to
        `[0, ln 100]` after each optimizer step). Also applied on load, so a checkpoint stored above the cap gives the
        logits it gave when the clamp was inside `forward`."""
        self.logit_scale.clamp_(0.0, self.config.logit_scale_max)

    @can_return_tuple
    def get_ecg_features(
        self,
        ecg_values: torch.Tensor,
        ecg_attention_mask: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        apply_masking: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        lead_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        r"""
        Returns a `BaseModelOutputWithPooling` whose `pooler_output` `(batch_size, projection_dim)` is the projected,
        not yet normalised, ECG embedding (as `CLIPModel.get_image_features` in transformers 5); `last_hidden_state`,
        `hidden_states` and `attentions` are the ECG encoder's. `lead_mask` `(batch_size, num_leads)`: see
        `MeritEcgModel.forward` (missing leads are left out). A tuple with `return_dict=False`.
        """
        ecg_output = self.ecg_model(
            ecg_values,
            ecg_attention_mask=ecg_attention_mask,
            noise=noise,
            apply_masking=apply_masking,
            lead_mask=lead_mask,
            return_dict=True,
            **_config_output_flags(self.config, output_attentions, output_hidden_states),
        )
        return BaseModelOutputWithPooling(
            last_hidden_state=ecg_output.last_hidden_state,
            pooler_output=self.ecg_projection(ecg_output.pooler_output),
            hidden_states=ecg_output.hidden_states,
            attentions=ecg_output.attentions,
        )

    @can_return_tuple
    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        r"""Returns a `BaseModelOutputWithPooling` whose `pooler_output` is the projected text embedding;
        `last_hidden_state`, `hidden_states` and `attentions` are the text encoder's. A tuple with
        `return_dict=False`."""
        text_inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            text_inputs["token_type_ids"] = token_type_ids
        text_inputs.update(_config_output_flags(self.config, output_attentions, output_hidden_states))
        if input_ids.device.type == "cpu" and not torch.compiler.is_compiling():  # free here; a sync on a GPU
            check_token_ids(input_ids, self.text_model.get_input_embeddings())
        text_output = self.text_model(**text_inputs, return_dict=True)
        pooled = _pool_text(text_output, attention_mask, self.config.text_pooling)
        return BaseModelOutputWithPooling(
            last_hidden_state=text_output.last_hidden_state,
            pooler_output=self.text_projection(pooled),
            hidden_states=text_output.hidden_states,
            attentions=text_output.attentions,
        )

    @can_return_tuple
    def forward(
        self,
        ecg_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        ecg_attention_mask: torch.Tensor | None = None,
        return_loss: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        lead_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> MeritOutput | tuple:
        r"""
        ecg_values (`torch.FloatTensor` of shape `(batch_size, num_leads, num_samples)`): from the feature extractor.
        input_ids, attention_mask, token_type_ids: the tokenised reports (or prompts).
        return_loss (`bool`): also return the symmetric InfoNCE loss over this batch (pairs on the diagonal).
        lead_mask (`torch.BoolTensor` of shape `(batch_size, num_leads)`, *optional*): recorded leads (the missing
            ones are left out, see `MeritEcgModel.forward`).

        `ecg_model_output` and `text_model_output` hold each tower's output (with `hidden_states` / `attentions` when
        asked), their `pooler_output` being the projected, not yet normalised, embedding.
        """
        flags = {
            "output_attentions": output_attentions,
            "output_hidden_states": output_hidden_states,
            "return_dict": True,
        }
        ecg_output = self.get_ecg_features(ecg_values, ecg_attention_mask, lead_mask=lead_mask, **flags)
        text_output = self.get_text_features(input_ids, attention_mask, token_type_ids, **flags)
        ecg_embeds = unit_vectors(ecg_output.pooler_output)
        text_embeds = unit_vectors(text_output.pooler_output)
        scale = self.logit_scale.exp()
        logits_per_ecg = similarity_logits(ecg_embeds, text_embeds, scale)
        loss = contrastive_loss(logits_per_ecg) if return_loss else None
        return MeritOutput(
            loss=loss,
            logits_per_ecg=logits_per_ecg,
            logits_per_text=logits_per_ecg.t(),
            ecg_embeds=ecg_embeds,
            text_embeds=text_embeds,
            ecg_model_output=ecg_output,
            text_model_output=text_output,
        )

    @classmethod
    def from_text_pretrained(
        cls, text_model_name_or_path: str, ecg_config: MeritEcgConfig | dict | None = None, **config_kwargs
    ) -> MeritPreTrainedModel:
        """Build a new MERIT model (random ECG tower) whose text tower starts from a pretrained encoder, as MERL starts
        from MedCPT. Works on `MeritModel` and `MeritForPreTraining`."""
        from transformers import AutoConfig

        text_config = AutoConfig.from_pretrained(text_model_name_or_path)
        config = MeritConfig(ecg_config=ecg_config, text_config=text_config, **config_kwargs)
        model = cls(config)
        pretrained_text = AutoModel.from_pretrained(text_model_name_or_path)
        merit = model if isinstance(model, MeritModel) else model.merit
        incompatible = merit.text_model.load_state_dict(pretrained_text.state_dict(), strict=False)
        if incompatible.missing_keys:
            raise ValueError(
                f"{text_model_name_or_path}: text encoder weights missing for {incompatible.missing_keys[:8]}"
            )
        return model


def _output_flags(output_attentions: bool | None, output_hidden_states: bool | None) -> dict[str, bool]:
    """The output flags a caller set; one left `None` is not passed on, so the tower falls back to its own config."""
    flags = {"output_attentions": output_attentions, "output_hidden_states": output_hidden_states}
    return {name: value for name, value in flags.items() if value is not None}


def _config_output_flags(
    config: PreTrainedConfig, output_attentions: bool | None, output_hidden_states: bool | None
) -> dict[str, bool]:
    """The output flags for a tower: the caller's, and where one is `None` the model's own config's, as in
    transformers (`from_pretrained(..., output_hidden_states=True)` and `model.config.output_hidden_states = True`
    set it there); the towers' configs are copies that these never reach."""
    return {
        "output_attentions": config.output_attentions if output_attentions is None else output_attentions,
        "output_hidden_states": config.output_hidden_states if output_hidden_states is None else output_hidden_states,
    }


def _text_encoder_from_config(config: MeritConfig) -> PreTrainedModel:
    """`AutoModel.from_config(text_config)`, without BERT's pooler layer when it would get no gradient (DDP refuses
    parameters that take no part in the loss)."""
    if config.text_pooling != "pooler":
        try:
            return AutoModel.from_config(config.text_config, add_pooling_layer=False)
        except TypeError:
            pass
    return AutoModel.from_config(config.text_config)


def _pool_text(text_output, attention_mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    hidden = text_output.last_hidden_state
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "pooler":
        if getattr(text_output, "pooler_output", None) is None:
            raise ValueError("text_pooling='pooler' but the text encoder returns no pooler_output")
        return text_output.pooler_output
    if attention_mask is None:
        return hidden.mean(dim=1)
    weights = attention_mask.to(hidden.dtype)[..., None]
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class MeritForPreTraining(MeritPreTrainedModel):
    r"""
    MERIT pretraining: masked ECG modelling (a light decoder, see `MeritEcgConfig.decoder_attention`; MSE on hidden
    patches) and ECG-report contrastive alignment (symmetric InfoNCE) on one ECG encoder.

    `loss = reconstruction_weight * reconstruction_loss + contrastive_weight * contrastive_loss`; a weight of 0 skips
    that branch, so "reconstruction only" needs no text and "contrastive only" runs no decoder.

    Example:

    ```python
    >>> import torch
    >>> from transformers import BertConfig
    >>> from merit_hf import MeritConfig, MeritEcgConfig, MeritForPreTraining
    >>> ecg = MeritEcgConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
    ...                      decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=2)
    >>> text = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
    ...                   intermediate_size=64)
    >>> model = MeritForPreTraining(MeritConfig(ecg_config=ecg, text_config=text, projection_dim=16))
    >>> out = model(torch.randn(2, 12, 2250), input_ids=torch.randint(0, 100, (2, 8)))
    >>> sorted(k for k in ("loss", "reconstruction_loss", "contrastive_loss") if out[k] is not None)
    ['contrastive_loss', 'loss', 'reconstruction_loss']
    ```"""

    _keys_to_ignore_on_load_unexpected = [r"^classifier\."]
    _auto_map = {
        **MeritPreTrainedModel._auto_map,
        "AutoModelForPreTraining": "modeling_merit.MeritForPreTraining",
    }

    def __init__(self, config: MeritConfig):
        super().__init__(config)
        self.merit = MeritModel(config)
        self.decoder = MeritEcgDecoder(config.ecg_config)
        self.post_init()

    from_text_pretrained = MeritModel.__dict__["from_text_pretrained"]

    def clamp_logit_scale_(self) -> None:
        """See `MeritModel.clamp_logit_scale_`: call it after every optimizer step."""
        self.merit.clamp_logit_scale_()

    def freeze_unused_parameters(self, freeze_text_model: bool = False) -> None:
        """Stop gradients to the parameters that no loss term reaches (a weight of 0 switches its branch off; DDP
        also refuses parameters that get no gradient) and, with `freeze_text_model`, to the text encoder (LiT).
        Frozen parts then stay in eval mode under `train()`."""
        config = self.config
        if config.contrastive_weight == 0:
            merit = self.merit
            for module in (merit.text_model, merit.text_projection, merit.ecg_projection):
                module.requires_grad_(False)
            merit.logit_scale.requires_grad_(False)
            merit.ecg_model.pooler_norm.requires_grad_(False)
        if config.reconstruction_weight == 0:
            self.decoder.requires_grad_(False)
        if freeze_text_model:
            self.merit.text_model.requires_grad_(False)
        self.train(self.training)

    @can_return_tuple
    def forward(
        self,
        ecg_values: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        ecg_attention_mask: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        return_loss: bool = True,
        lead_mask: torch.Tensor | None = None,
        reconstruction_weight: float | None = None,
        **kwargs,
    ) -> MeritForPreTrainingOutput | tuple:
        r"""
        ecg_values (`torch.FloatTensor` of shape `(batch_size, num_leads, num_samples)`): from the feature extractor.
        input_ids, attention_mask, token_type_ids: the tokenised reports; required when `contrastive_weight > 0`.
        reconstruction_weight (`float`, *optional*): this call's weight of the reconstruction term instead of
            `config.reconstruction_weight` (the weight `config.loss_balancing="gradient_norm"` adapts in training).
        ecg_attention_mask (`torch.LongTensor` of shape `(batch_size, num_samples)`, *optional*): 1 real, 0 padding.
        noise (`torch.FloatTensor` of shape `(batch_size, num_leads, num_patches_per_lead)`, *optional*): fixes the
            masking (the smallest noise stays visible).
        return_loss (`bool`, defaults to `True`): the losses need no labels, so they are always computed; the
            argument tells `Trainer` so (it then reports `eval_loss`). `False` leaves `loss` out of the output.
        lead_mask (`torch.BoolTensor` of shape `(batch_size, num_leads)`, *optional*): recorded leads; a missing
            lead's tokens are left out of the encoder and its patches out of the reconstruction loss.
        """
        for flag in ("output_attentions", "output_hidden_states"):
            if kwargs.get(flag):
                raise ValueError(
                    f"MeritForPreTraining returns losses, not {flag.removeprefix('output_')}: call "
                    f"model.merit.get_ecg_features(..., {flag}=True) or get_text_features for them"
                )
        config = self.config
        use_reconstruction = config.reconstruction_weight > 0
        use_contrastive = config.contrastive_weight > 0
        if use_contrastive and input_ids is None:
            raise ValueError(
                "contrastive_weight > 0 needs the tokenised reports (input_ids); pass them, or set "
                "contrastive_weight=0 for reconstruction-only pretraining"
            )
        ecg_model = self.merit.ecg_model
        masked_output = None
        if use_reconstruction or (use_contrastive and config.contrastive_input == "masked"):
            masked_output = ecg_model(
                ecg_values,
                ecg_attention_mask=ecg_attention_mask,
                noise=noise,
                apply_masking=True,
                lead_mask=lead_mask,
                return_dict=True,  # whatever the ECG config's return_dict says: this class decides its own output
            )

        loss = 0.0
        reconstruction_loss = predicted = reconstruction_patch_count = None
        if use_reconstruction:
            predicted = self.decoder(
                masked_output.last_hidden_state, masked_output.ids_restore, masked_output.patch_attention_mask
            )
            reconstruction_loss = masked_patch_reconstruction_loss(
                ecg_values,
                predicted,
                masked_output.mask,
                config.ecg_config.patch_size,
                config.ecg_config.norm_pix_loss,
                masked_output.patch_attention_mask,
            )
            reconstruction_patch_count = reconstruction_patch_weights(
                masked_output.mask, masked_output.patch_attention_mask
            ).sum()
            weight = config.reconstruction_weight if reconstruction_weight is None else reconstruction_weight
            loss = loss + weight * reconstruction_loss

        contrastive = logits_per_ecg = ecg_embeds = text_embeds = scale = None
        if use_contrastive:
            if config.contrastive_input == "masked":
                ecg_pooled = masked_output.pooler_output
            else:
                ecg_pooled = ecg_model(
                    ecg_values, ecg_attention_mask=ecg_attention_mask, lead_mask=lead_mask, return_dict=True
                ).pooler_output
            ecg_embeds = unit_vectors(self.merit.ecg_projection(ecg_pooled))
            text_features = self.merit.get_text_features(  # losses only: no hidden states, whatever the config says
                input_ids,
                attention_mask,
                token_type_ids,
                output_attentions=False,
                output_hidden_states=False,
                return_dict=True,
            )
            text_embeds = unit_vectors(text_features.pooler_output)
            scale = self.merit.logit_scale.exp()
            logits_per_ecg = similarity_logits(ecg_embeds, text_embeds, scale)
            contrastive = contrastive_loss(logits_per_ecg)
            loss = loss + config.contrastive_weight * contrastive

        return MeritForPreTrainingOutput(
            loss=loss if return_loss else None,
            reconstruction_loss=reconstruction_loss,
            contrastive_loss=contrastive,
            logits=predicted,
            mask=masked_output.mask if masked_output is not None else None,
            ids_restore=masked_output.ids_restore if masked_output is not None else None,
            logits_per_ecg=logits_per_ecg,
            logits_per_text=logits_per_ecg.t() if logits_per_ecg is not None else None,
            ecg_embeds=ecg_embeds,
            text_embeds=text_embeds,
            logit_scale=scale,
            reconstruction_patch_count=reconstruction_patch_count,
        )


class MeritForEcgClassification(MeritPreTrainedModel):
    r"""
    The MERIT ECG encoder with a linear head on `pooler_output`. Multi-label (one sigmoid per class, BCE) unless
    `config.problem_type` says otherwise, because PTB-XL statements co-occur. Class names live in `config.id2label`.

    `from_pretrained` takes a pretraining, two-tower, encoder-only (`MeritEcgModel`) or report-generation checkpoint: it
    keeps the encoder and creates the head; every other missing weight raises. A fine-tuned classifier gets a head for another
    label set with `ignore_mismatched_sizes=True`.

    Example:

    ```python
    >>> model = MeritForEcgClassification.from_pretrained(
    ...     "path/to/merit", id2label={0: "NORM", 1: "MI", 2: "STTC", 3: "CD", 4: "HYP"}
    ... )  # doctest: +SKIP
    ```"""

    _heads_created_on_load = ("classifier.",)
    _pipeline_auto_class = "AutoModelForSequenceClassification"
    _has_text_tower = False
    _auto_map = {
        "AutoConfig": "configuration_merit.MeritConfig",
        # the two-tower `MeritModel` that `AutoModel` gives for a `MeritConfig` cannot load it: this says what can
        "AutoModel": "modeling_merit.MeritClassifierFolderAutoModel",
        "AutoModelForSequenceClassification": "modeling_merit.MeritForEcgClassification",
    }
    _encoder_only_key_mapping = {r"^(embeddings|layers|norm|pooler_norm)\.": r"ecg_model.\1."}
    _report_key_mapping = {r"^ecg_encoder\.": "ecg_model."}  # `MeritForReportGeneration._checkpoint_key_mapping`
    _keys_to_ignore_on_load_unexpected = [
        r"^decoder\.",
        r"text_model\.",
        r"text_projection\.",
        r"ecg_projection\.",
        r"logit_scale",
        r"^multi_modal_projector\.",
        r"^language_model\.",
    ]

    def __init__(self, config: MeritConfig):
        super().__init__(config)
        if config.problem_type is None:
            config.problem_type = "multi_label_classification"
        self.ecg_model = MeritEcgModel._from_config(config.ecg_config)
        self.dropout = nn.Dropout(config.ecg_config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.ecg_config.hidden_size, config.num_labels)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        # An encoder-only folder: its MeritEcgConfig is wrapped in a MeritConfig and its weights mapped under
        # `ecg_model.`. The Auto classes pass that config in, already holding the caller's config kwargs. A report
        # model's folder: its encoder config is wrapped the same way (its weights are already under `ecg_model.`).
        config = kwargs.get("config")
        if config is None or getattr(config, "model_type", None) == MeritEcgConfig.model_type:
            hub = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")
            config_dict, _ = PreTrainedConfig.get_config_dict(
                pretrained_model_name_or_path, **{k: kwargs[k] for k in hub if k in kwargs}
            )
            if config is None and config_dict.get("model_type") == MeritReportConfig.model_type:
                kwargs = _encoder_only_classifier_kwargs(config_dict["ecg_config"], None, kwargs)
                kwargs.setdefault("key_mapping", cls._report_key_mapping)
            elif config is not None or config_dict.get("model_type") == MeritEcgConfig.model_type:
                kwargs.pop("config", None)
                kwargs = _encoder_only_classifier_kwargs(config_dict, config, kwargs)
                kwargs.setdefault("key_mapping", cls._encoder_only_key_mapping)
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    def set_attn_implementation(self, attn_implementation, *args, **kwargs):
        # The config's `text_config` (a `MeritConfig` holds one) has no model here: transformers would set it "in the
        # dark" and warn of undefined behaviour. It is left out for the call; the ECG encoder gets the setting.
        text_config = self.config.text_config
        self.config.text_config = None
        try:
            return super().set_attn_implementation(attn_implementation, *args, **kwargs)
        finally:
            self.config.text_config = text_config

    @can_return_tuple
    def forward(
        self,
        ecg_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        ecg_attention_mask: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        lead_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput | tuple:
        r"""
        ecg_values (`torch.FloatTensor` of shape `(batch_size, num_leads, num_samples)`):
            Output of [`MeritFeatureExtractor`]. Required; it has a default only so that a call through PEFT's
            sequence-classification wrapper, which passes its first argument on as `input_ids`, gets a clear error.
        labels (`torch.FloatTensor` of shape `(batch_size, num_labels)`, *optional*):
            Multi-hot targets for multi-label classification (the default); class indices `(batch_size,)` for
            `problem_type="single_label_classification"`; values for `"regression"`.
        lead_mask (`torch.BoolTensor` of shape `(batch_size, num_leads)`, *optional*): recorded leads (the missing
            ones are left out, see `MeritEcgModel.forward`).
        """
        _refuse_text_inputs(type(self).__name__, ecg_values, kwargs)
        ecg_output = self.ecg_model(
            ecg_values,
            ecg_attention_mask=ecg_attention_mask,
            lead_mask=lead_mask,
            return_dict=True,
            # the classifier's config decides, as in transformers (the encoder's own config is a copy inside it)
            output_attentions=self.config.output_attentions if output_attentions is None else output_attentions,
            output_hidden_states=(
                self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
            ),
        )
        logits = self.classifier(self.dropout(ecg_output.pooler_output))
        loss = None
        if labels is not None:
            loss = self._loss(logits, labels)
        return SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=ecg_output.hidden_states, attentions=ecg_output.attentions
        )

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        problem_type = self.config.problem_type
        if problem_type == "multi_label_classification":
            if labels.shape != logits.shape:
                raise ValueError(
                    f"multi-label classification needs multi-hot labels of shape {tuple(logits.shape)}, got "
                    f"{tuple(labels.shape)}; for one class per ECG set problem_type='single_label_classification'"
                )
            return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
        if problem_type == "single_label_classification":
            return F.cross_entropy(logits, labels.long().view(-1))
        if problem_type == "regression":
            return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).squeeze(-1))
        raise ValueError(f"problem_type must be one of {PROBLEM_TYPES[1:]}, got {problem_type!r}")


# The inputs of a text model, which PEFT's `PeftModelForSequenceClassification` (`task_type="SEQ_CLS"`) passes by
# name to the model it wraps (`None` unless the caller gave them): a tensor there would vanish into `**kwargs`.
_TEXT_INPUT_NAMES = ("input_ids", "attention_mask", "inputs_embeds")


def _refuse_text_inputs(model_name: str, ecg_values: torch.Tensor | None, kwargs: dict) -> None:
    """Raise when an ECG classifier is handed a text model's inputs instead of `ecg_values`, or no ECG at all."""
    given = [name for name in _TEXT_INPUT_NAMES if kwargs.get(name) is not None]
    if given:
        raise ValueError(
            f"{model_name} takes the ECGs as ecg_values (padding as ecg_attention_mask), not {given}; a PEFT model "
            "with task_type='SEQ_CLS' passes a positional tensor on as input_ids, so call it as "
            "peft_model(ecg_values=..., labels=...)"
        )
    if ecg_values is None:
        raise ValueError(f"{model_name}: ecg_values is required (batch, num_leads, num_samples)")


class MeritForEcgClassificationFromEncoder:
    r"""
    What `AutoModelForSequenceClassification` loads an encoder-only (`MeritEcgConfig`) folder with: it returns a
    [`MeritForEcgClassification`] around that encoder, with a new head. It exists because transformers registers a
    model class under a config class only when the model's `config_class` is that class, and the classifier's config
    is a `MeritConfig` (the encoder config inside it).

    Example:

    ```python
    >>> from transformers import AutoModelForSequenceClassification
    >>> classifier = AutoModelForSequenceClassification.from_pretrained(
    ...     "path/to/merit-ecg-encoder", trust_remote_code=True, id2label={0: "NORM", 1: "MI"}
    ... )  # doctest: +SKIP
    >>> type(classifier).__name__  # doctest: +SKIP
    'MeritForEcgClassification'
    ```"""

    config_class = MeritEcgConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs) -> MeritForEcgClassification:
        return MeritForEcgClassification.from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    @classmethod
    def _from_config(cls, config: MeritEcgConfig, **kwargs) -> MeritForEcgClassification:
        kwargs = _encoder_only_classifier_kwargs(type(config)().to_dict(), config, kwargs)
        return MeritForEcgClassification._from_config(kwargs.pop("config"), **kwargs)

    @classmethod
    def register_for_auto_class(cls, auto_class: str = "AutoModelForSequenceClassification") -> None:
        """Nothing to record: a saved classifier's `auto_map` names `MeritForEcgClassification` itself."""


def _classifier_folder_message(folder, loader: str) -> str:
    return (
        f"{folder} holds a MeritForEcgClassification (the ECG encoder and a classification head, no text tower), "
        f"which {loader} cannot load: load the classifier with AutoModelForSequenceClassification.from_pretrained "
        "(its encoder is model.ecg_model), or the encoder alone with MeritEcgModel.from_pretrained(folder) "
        "(merit_hf installed)"
    )


class MeritClassifierFolderAutoModel:
    r"""
    What `AutoModel` finds in a classifier folder's `auto_map`: it raises a `ValueError` that says how to load the
    folder (`AutoModelForSequenceClassification`, whose `ecg_model` is the fine-tuned encoder, or
    `MeritEcgModel.from_pretrained`). Without it, `AutoModel.from_pretrained(folder, trust_remote_code=True)` fails
    with transformers' "Unrecognized configuration class" and a list of every model type; with merit_hf installed
    the two-tower `MeritModel` refuses the folder with the same message.
    """

    config_class = MeritConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        raise ValueError(_classifier_folder_message(pretrained_model_name_or_path, "AutoModel"))

    @classmethod
    def _from_config(cls, config: MeritConfig, **kwargs):
        raise ValueError(_classifier_folder_message("this config", "AutoModel"))

    @classmethod
    def register_for_auto_class(cls, auto_class: str = "AutoModel") -> None:
        """Nothing to record: a saved classifier's `auto_map` names this class itself."""


# `from_pretrained` arguments that transformers keeps for loading even where a config has an attribute of that name.
_LOADING_KWARGS = ("dtype", "torch_dtype", "attn_implementation", "experts_implementation")


def _encoder_only_classifier_kwargs(saved_dict: dict, given_config: PreTrainedConfig | None, kwargs: dict) -> dict:
    """`MeritForEcgClassification.from_pretrained` kwargs for an encoder-only folder (`saved_dict`, its `config.json`):
    `config` becomes a `MeritConfig` around the encoder config that takes the kwargs which are its attributes, as
    transformers' `from_pretrained` puts them in the config it loads (`num_labels`, `id2label`, `problem_type`,
    `output_hidden_states`, ...); the other kwargs stay for loading. `given_config` is the encoder config that an Auto
    class loaded with those kwargs already in it: the attributes they changed are taken over, and so is the attention
    implementation that it holds privately (`to_dict()` leaves it out, and the Auto class consumed the kwarg)."""
    ecg_dict = dict(saved_dict) if given_config is None else given_config.to_dict()
    if given_config is not None and getattr(given_config, "_attn_implementation", None) is not None:
        kwargs = {"attn_implementation": given_config._attn_implementation, **kwargs}
    for key in ("auto_map", "architectures", "custom_pipelines"):
        ecg_dict.pop(key, None)
    attributes = MeritConfig(ecg_config=ecg_dict)

    def is_config_attribute(key: str) -> bool:
        return key not in _LOADING_KWARGS and hasattr(attributes, key)

    if given_config is not None:
        saved = type(given_config).from_dict(saved_dict).to_dict()
        changed = {key: value for key, value in ecg_dict.items() if saved.get(key) != value}
        kwargs = {**{key: value for key, value in changed.items() if is_config_attribute(key)}, **kwargs}
    config_kwargs = {key: kwargs.pop(key) for key in list(kwargs) if is_config_attribute(key)}
    return {**kwargs, "config": MeritConfig(ecg_config=ecg_dict, **config_kwargs)}  # validated as it is built


__all__ = [
    "MeritBasePreTrainedModel",
    "MeritEcgModel",
    "MeritEcgPreTrainedModel",
    "MeritForEcgClassification",
    "MeritForEcgClassificationFromEncoder",
    "MeritForPreTraining",
    "MeritModel",
    "MeritPreTrainedModel",
    "contrastive_loss",
    "masked_patch_reconstruction_loss",
    "pool_window_embeddings",
]

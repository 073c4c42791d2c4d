"""Inference precision: one resolver for every place merit_hf embeds ECGs (the embedding command line,
`zero_shot_classify`, the pipeline, the Space).

`precision` is one of:

- `"auto"` (the default): on a CUDA GPU, **bf16 weights** (the model is cast, no autocast: 1.2x autocast's speed for
  ViT-B/75 on an H200, cosine 0.99999 to fp32 embeddings); fp32 on GPUs without native bf16 (before Ampere). On CPU,
  the fastest accurate path for the CPU it runs on, decided from what the CPU reports (`CpuCapability`):
  bf16 weights when it computes bf16 natively (AMX-BF16 or AVX512-BF16; cosine 0.99999 to fp32), else fp32. The
  choice is logged at debug level (`logging.getLogger("merit_hf.models.merit.inference_precision")`). `auto` never picks int8:
  it is the fastest path on some CPUs but costs more accuracy (cosine 0.9998 for ViT-B/75) and, because activations
  are quantised per batch, a record's embedding then depends slightly on the records batched with it (tested).
- `"fp32"`, `"bf16"`, `"fp16"`: the weights in that dtype (bf16 on a CPU without native bf16 runs, emulated and
  slowly, and the debug line says so; on a CUDA GPU without bf16, before Ampere, it is an error: fp16 is for GPUs
  such as V100 and T4). In bf16 on a CPU the linear layers of the Transformer
  blocks keep their weights in oneDNN's own layout, reordered once (`PrepackedLinear`), and the MLP's first layer
  computes its GELU in the same call: bf16 linear layers already run on oneDNN, which otherwise reorders every weight
  on every call, and GELU then rounds once instead of twice. 1.05-1.08x faster on its own, 1.07-1.18x with the GELU,
  outputs identical without the GELU (benchmarks/README.md, "CPU inference"). fp32 linear layers run MKL or
  OpenBLAS instead, and whether oneDNN's prepacked kernel beats them depends on the CPU, so in fp32 on a CPU one
  Transformer block is timed both ways at first use (once per machine for each block shape, token count and thread
  count; `cpu_prepacking_pays`) and the faster is kept: prepacked, the model is a copy that shares the caller's
  weights, and its outputs differ from `nn.Linear`'s by float rounding (about 1e-6). `MERIT_CPU_PREPACK=on` or `=off`
  fixes the choice (benchmarks, runs that must match bit for bit across machines).
- `"int8"` (CPU only): dynamic int8 quantisation (int8 weights, activations quantised per batch) of every
  `nn.Linear` inside the Transformer blocks (over 99 % of the FLOPs) through PyTorch's own
  `torch.ao.quantization.quantize_dynamic`; the patch projection, pooling and heads stay fp32. Two of PyTorch's
  quantised engines can run these layers, fbgemm's (`"x86"`, PyTorch's default) and oneDNN's (`"onednn"`, with
  AMX-INT8 tiles where the CPU has them: 1.4-1.5x the whole int8 model's speed on an AMX Xeon); one block is quantised
  and timed under each at first use (once per machine for each block shape and thread count; `cpu_int8_engine`) and
  the faster packs the model, which then runs with it whatever the global engine is. The caller's
  `torch.backends.quantized.engine` is left as it was. `MERIT_CPU_INT8_ENGINE=x86` or `=onednn` fixes the choice. (A
  deep copy or unpickling of an int8 model packs its layers again under the global engine, and its
  `merit_int8_engine` then no longer says which; `prepare_for_inference`'s own copies keep the engine.) PyTorch marks
  `torch.ao.quantization` deprecated in favour of torchao, but torchao 0.18's CPU int8 path
  (`Int8DynamicActivationInt8WeightConfig`) ran 4x slower than it in eager mode on our CPUs, so we keep the
  working one (benchmarks/README.md, "CPU inference").
- `"fp8"` (CUDA GPUs with FP8 tensor cores only, compute capability 8.9+: Ada, Hopper, Blackwell): torchao's float8
  dynamic quantisation (e4m3 weights and activations, per-row scales) of the same linear layers, on bf16 weights.
  Needs the optional extra `pip install merit_hf[fp8]` (torchao); anywhere else it is a clear error.

Every choice timed on a CPU (the bf16 attention kernel, fp32 prepacking, the int8 engine) is made once per machine:
kept in the process and in `$HF_HOME/merit_hf/cpu_choices.json` (`MERIT_CPU_CHOICES`: another path, or `off`), keyed by
the CPU's model name and flags, PyTorch's version and the choice's shape and thread count, so later processes, and the
other processes of one `accelerate launch`, read it instead of timing (`modeling_merit.cached_cpu_choice`). Delete the
file to time again.

`prepare_for_inference(module, precision, device)` never changes the module it is given, its training mode included:
it returns the module itself when it is already in that precision on that device and in eval mode (and, in fp32 on a
CPU, prepacking does not pay), else a converted copy in eval mode (a module in training mode that needs no conversion:
a copy sharing its weights). A module that `"int8"` or `"fp8"` already quantised runs only in that precision: another
is an error, never int8 or fp8 under another name. The copy is kept with the
module and reused while the module's parameters are unchanged (a training step or `load_state_dict` makes a new
one), so calling `zero_shot_classify` in a loop does not convert the model every time. (Not seen: weights made under
`torch.inference_mode()` and then written in place under it, for example `load_state_dict` inside that block: such
tensors keep no write counter, and the old copy is returned. Load into a new model, or outside inference mode.)

On Linux with glibc, preparing a model for the CPU also makes the C library keep memory it frees for reuse
(`keep_freed_cpu_memory`): by default glibc gives every block above its mmap threshold (at most 32 MiB) back to the
operating system when it is freed, and its heap's free top above twice that, so each forward then pays a page fault
for every 4 kB of its larger activations. At `base-p75` and batch 32 on an AMX Xeon that was 2.2 million faults a
forward in int8 and 0.48 million in bf16, run 1.67x and 1.32x slower than with the memory kept (benchmarks/README.md,
"CPU inference"); the embedding command line ran 1.47x faster end to end in bf16 and 1.49x in int8. The process then
keeps up to 1 GiB of freed memory for reuse, as tcmalloc and jemalloc do (its peak RSS there: +0.39 GB in bf16, +0.95
GB in int8). `MERIT_CPU_ALLOCATOR=system` leaves the C library as it is, and so does an allocation the process was
configured with already (glibc's `MALLOC_*_` or `GLIBC_TUNABLES` settings, tcmalloc or jemalloc preloaded).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import functools
import logging
import os
import platform
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .pipeline_merit import tensor_version, weights_signature

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8", "fp8")
FP8_MIN_CUDA_CAPABILITY = (8, 9)
BF16_MIN_CUDA_CAPABILITY = (8, 0)
INT8_DOT_PRODUCT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PREPACKED_DTYPES = (torch.bfloat16, torch.float32)
CPU_PREPACK_ENV = "MERIT_CPU_PREPACK"
_cpu_prepacking_choice: dict[tuple, bool] = {}
CPU_ALLOCATOR_ENV = "MERIT_CPU_ALLOCATOR"
CPU_ALLOCATORS = ("keep", "system")
# glibc's mallopt parameters (malloc.h) and what `keep_freed_cpu_memory` sets them to
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
KEPT_FREED_BYTES = 2**30
INT8_ENGINES = ("x86", "onednn")
# int8 and fp8 quantise the encoder's Transformer blocks only: what a projection head runs beside such an encoder
QUANTISED_HEAD_PRECISIONS = {"int8": "fp32", "fp8": "bf16"}
CPU_INT8_ENGINE_ENV = "MERIT_CPU_INT8_ENGINE"
_cpu_int8_engine_choice: dict[tuple, str] = {}


class PrepackedLinear(nn.Linear):
    """An `nn.Linear` for CPU inference whose weight oneDNN reorders once into its own blocked layout
    (`torch.ops.mkldnn._reorder_linear_weight`, what inductor's freezing pass does), optionally fused with the exact
    GELU that follows it (`activation="gelu"`). The reordered copy is made at the first call, kept beside `weight`
    (which stays, so `state_dict`, `deepcopy` and `.to()` work as for `nn.Linear`; the copy is dropped from both and
    made again when the weight changes) and used only where it computes what `nn.Linear` would: CPU inputs in the
    weight's dtype, without autograd. Anywhere else (a GPU, another dtype, training) the layer is `nn.Linear` (plus its
    GELU)."""

    activation: str = "none"

    @classmethod
    def convert(cls, linear: nn.Linear, activation: str = "none") -> PrepackedLinear:
        """`linear` itself, turned into a `PrepackedLinear` (its parameters are kept)."""
        linear.__class__ = cls
        linear.activation = activation
        linear._packed = None
        return linear

    def _packed_weight(self) -> torch.Tensor:
        key = (self.weight.data_ptr(), tensor_version(self.weight), self.weight.dtype)
        if self._packed is None or self._packed[0] != key:
            self._packed = (key, torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), None))
        return self._packed[1]

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if (
            input.device.type == "cpu"
            and weight.device.type == "cpu"
            and input.dtype == weight.dtype
            and not (torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad))
        ):
            algorithm = "none" if self.activation == "gelu" else ""
            return torch.ops.mkldnn._linear_pointwise(
                input, self._packed_weight(), self.bias, self.activation, [], algorithm
            )
        output = super().forward(input)
        return nn.functional.gelu(output) if self.activation == "gelu" else output

    def __getstate__(self) -> dict:  # oneDNN's opaque tensor can be neither copied nor pickled
        state = self.__dict__.copy()
        state["_packed"] = None
        return state

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", activation={self.activation}" if self.activation != "none" else "")


@functools.cache
def cpu_prepacking_works(dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether this PyTorch build reorders and runs linear weights through oneDNN on this CPU, to `F.linear`'s result
    (checked once per process and dtype on a small layer: builds without oneDNN, or a future PyTorch that renames
    these operators, keep `nn.Linear`)."""
    try:
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(24, 16, generator=generator).to(dtype)
        bias = torch.randn(24, generator=generator).to(dtype)
        inputs = torch.randn(2, 3, 16, generator=generator).to(dtype)
        with torch.inference_mode():
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
            output = torch.ops.mkldnn._linear_pointwise(inputs, packed, bias, "none", [], "")
            expected = nn.functional.linear(inputs, weight, bias)
        works = bool(torch.allclose(output.float(), expected.float(), rtol=1e-2, atol=1e-2))
    except (AttributeError, RuntimeError, NotImplementedError) as error:
        logger.debug("oneDNN weight prepacking unavailable (%s): nn.Linear on the CPU", error)
        return False
    if not works:
        logger.debug("oneDNN weight prepacking disagrees with F.linear here: nn.Linear on the CPU")
    return works


@dataclass(frozen=True)
class CpuCapability:
    """What a CPU reports: its model name, its feature flags (as `/proc/cpuinfo` names them) and the vector ISA
    PyTorch dispatches to (`torch.backends.cpu.get_cpu_capability()`). Tests build one by hand for CPUs CI lacks."""

    model_name: str
    flags: frozenset[str]
    torch_capability: str

    @property
    def amx_bf16(self) -> bool:
        return "amx_bf16" in self.flags

    @property
    def avx512_bf16(self) -> bool:
        return "avx512_bf16" in self.flags

    @property
    def native_bf16(self) -> bool:
        """bf16 matmuls run in hardware (AMX tiles or AVX512-BF16 dot products), at 2-4x fp32 speed."""
        return self.amx_bf16 or self.avx512_bf16

    @property
    def int8_dot_product(self) -> bool:
        return bool(self.flags & INT8_DOT_PRODUCT_FLAGS)

    def summary(self) -> dict:
        """The facts a benchmark records beside its numbers."""
        return {
            "model_name": self.model_name,
            "torch_capability": self.torch_capability,
            "amx_bf16": self.amx_bf16,
            "avx512_bf16": self.avx512_bf16,
            "int8_dot_product": self.int8_dot_product,
            "flags": sorted(self.flags),
        }


def _read_cpuinfo(path: Path = Path("/proc/cpuinfo")) -> tuple[str, frozenset[str]] | None:
    from .modeling_merit import read_cpuinfo

    return read_cpuinfo(path)


def _flags_from_torch() -> frozenset[str]:
    """Where there is no /proc/cpuinfo (macOS, Windows): the flags PyTorch's own CPU probes answer for."""
    probes = {
        "amx_bf16": "_is_amx_tile_supported",
        "amx_fp16": "_is_amx_fp16_supported",
        "avx512_bf16": "_is_avx512_bf16_supported",
        "avx512_vnni": "_is_vnni_supported",
    }
    found = set()
    for flag, probe in probes.items():
        function = getattr(torch.cpu, probe, None)
        if function is not None and function():
            found.add(flag)
    return frozenset(found)


@functools.cache
def cpu_capability() -> CpuCapability:
    """This machine's `CpuCapability` (read once per process)."""
    read = _read_cpuinfo()
    model_name, flags = read if read is not None else (platform.processor() or platform.machine(), _flags_from_torch())
    return CpuCapability(model_name, flags, torch.backends.cpu.get_cpu_capability())


def _cpu_choice(capability: CpuCapability) -> tuple[str, str]:
    if capability.native_bf16:
        kind = "AMX-BF16" if capability.amx_bf16 else "AVX512-BF16"
        return "bf16", f"the CPU computes bf16 natively ({kind})"
    int8 = " ('int8' is faster on it, opt in)" if capability.int8_dot_product else ""
    return "fp32", f"no native bf16, which would run emulated and slower than fp32{int8}"


def _explicit_note(precision: str, device: torch.device, capability: CpuCapability | None) -> str:
    """What the debug line of an explicit precision adds: that bf16 on this CPU is emulated, when it is."""
    if precision != "bf16" or device.type != "cpu":
        return ""
    capability = capability or cpu_capability()
    return (
        ""
        if capability.native_bf16
        else f": {capability.model_name or 'this CPU'} has no native bf16, it runs emulated"
    )


def resolve_precision(
    precision: str = "auto",
    device: torch.device | str = "cpu",
    capability: CpuCapability | None = None,
    cuda_capability: tuple[int, int] | None = None,
) -> str:
    """The concrete precision (`"fp32"`, `"bf16"`, `"fp16"`, `"int8"` or `"fp8"`) that `precision` means on `device`.

    Args:
        capability: the CPU's (default: this machine's `cpu_capability()`); tests pass others.
        cuda_capability: the GPU's compute capability (default: `torch.cuda.get_device_capability(device)`).

    Raises `ValueError` for an unknown precision, int8 on a GPU, bf16 on a CUDA GPU without bf16 (before Ampere),
    and fp8 anywhere but a CUDA GPU with FP8 tensor cores. Every choice is logged at debug level, `"auto"`'s with why.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision: must be one of {list(PRECISIONS)}, got {precision!r}")
    device = torch.device(device)
    if device.type == "cuda" and cuda_capability is None:
        cuda_capability = torch.cuda.get_device_capability(device)
    if precision == "int8" and device.type != "cpu":
        raise ValueError(
            f"precision 'int8' is CPU inference (PyTorch dynamic quantisation); on {device} use 'bf16' or 'fp8'"
        )
    if precision == "fp8":
        if device.type != "cuda":
            raise ValueError(
                f"precision 'fp8' needs a CUDA GPU with FP8 tensor cores (compute capability "
                f"{FP8_MIN_CUDA_CAPABILITY[0]}.{FP8_MIN_CUDA_CAPABILITY[1]}+: Ada, Hopper, Blackwell); this device is "
                f"{device}. On CPU use 'auto', 'bf16' or 'int8'"
            )
        if tuple(cuda_capability) < FP8_MIN_CUDA_CAPABILITY:
            raise ValueError(
                f"precision 'fp8' needs FP8 tensor cores (compute capability 8.9+: Ada, Hopper, Blackwell); {device} "
                f"has compute capability {cuda_capability[0]}.{cuda_capability[1]}. Use 'bf16' there"
            )
    if precision == "bf16" and device.type == "cuda" and tuple(cuda_capability) < BF16_MIN_CUDA_CAPABILITY:
        raise ValueError(
            f"precision 'bf16' needs a GPU with bf16 (compute capability 8.0+: Ampere and later); {device} has compute "
            f"capability {cuda_capability[0]}.{cuda_capability[1]}. Use 'fp16' (its fast half precision) or 'fp32'"
        )
    if precision != "auto":
        logger.debug(
            "precision %r on %s (as asked)%s", precision, device, _explicit_note(precision, device, capability)
        )
        return precision
    if device.type == "cuda":
        choice, why = (
            ("bf16", "a CUDA GPU with native bf16")
            if tuple(cuda_capability) >= BF16_MIN_CUDA_CAPABILITY
            else ("fp32", "no bf16")
        )
    elif device.type == "cpu":
        capability = capability or cpu_capability()
        choice, why = _cpu_choice(capability)
        why = f"{capability.model_name or 'CPU'}: {why}"
    else:  # mps, xpu, ...: their bf16 support varies, so the exact path
        choice, why = "fp32", f"{device.type} device"
    logger.debug("precision 'auto' on %s -> %s (%s)", device, choice, why)
    return choice


def _quantization(module: nn.Module) -> str | None:
    """`"int8"` for PyTorch's dynamic quantisation (layers from a `quantized` module), `"fp8"` for torchao's float8
    (it keeps `nn.Linear` and swaps in a weight tensor subclass, `torchao.quantization.Float8Tensor` in 0.18), else
    `None`."""
    if any("quantized" in type(child).__module__ for child in module.modules()):
        return "int8"
    return next((kind for kind in map(_quantization_of_parameter, module.parameters()) if kind), None)


def _quantization_of_parameter(parameter: torch.Tensor) -> str | None:
    """`"fp8"` for a torchao float8 weight (a tensor subclass), else `None`."""
    kind = type(parameter)
    return "fp8" if kind.__module__.split(".")[0] == "torchao" and "float8" in kind.__name__.lower() else None


def _float_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype of `module`'s floating-point parameters that are not quantised (the first one's), or `None`."""
    for parameter in module.parameters():
        if parameter.is_floating_point() and _quantization_of_parameter(parameter) is None:
            return parameter.dtype
    return None


def _state(module: nn.Module) -> tuple[torch.dtype | None, torch.device | None]:
    parameter = next(module.parameters(), None)
    return (parameter.dtype, parameter.device) if parameter is not None else (None, None)


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def is_merit_module(module: nn.Module, class_name: str) -> bool:
    """Whether `module` is a `class_name` (or a subclass of one) of merit_hf's `modeling_merit` or of a copy of that
    file. A saved folder loaded with `trust_remote_code=True` runs its own `modeling_merit.py`, whose classes are other
    class objects of the same names (`transformers_modules.<folder>.<hash>.modeling_merit.MeritEcgLayer`), so
    `isinstance` against merit_hf's own classes missed them: int8 then quantised nothing and bf16 prepacked nothing.
    The class is recognised by its name and the module that defines it, whichever copy of the file that is."""
    return any(
        klass.__name__ == class_name and klass.__module__.rpartition(".")[2] == "modeling_merit"
        for klass in type(module).__mro__
    )


def _blocks(module: nn.Module) -> list[nn.Module]:
    """`module`'s Transformer blocks (`MeritEcgLayer`, from whichever copy of modeling_merit its classes come)."""
    return [child for child in module.modules() if is_merit_module(child, "MeritEcgLayer")]


def _block_linears(module: nn.Module) -> dict[str, nn.Linear]:
    """Every `nn.Linear` inside a Transformer block (attention q/k/v + output, MLP): what int8 and fp8 quantise."""
    linears = {}
    for block_name, block in module.named_modules():
        if is_merit_module(block, "MeritEcgLayer"):
            for name, child in block.named_modules():
                if isinstance(child, nn.Linear):
                    linears[f"{block_name}.{name}" if block_name else name] = child
    return linears


def _prepack_block_linears(module: nn.Module) -> nn.Module:
    """Every linear layer inside a Transformer block as a `PrepackedLinear`, the MLP's first one with its exact GELU
    (`hidden_act="gelu"`) fused into it (the block's `act` becomes the identity)."""
    from transformers.activations import GELUActivation

    for name, linear in _block_linears(module).items():
        parent_name, _, leaf = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        fuse = (
            is_merit_module(parent, "MeritEcgMLP")
            and leaf == "fc1"
            and type(parent.act) is GELUActivation
            and parent.act.act is nn.functional.gelu
        )
        PrepackedLinear.convert(linear, "gelu" if fuse else "none")
        if fuse:
            parent.act = nn.Identity().train(parent.training)
    return module


_quantized_engine_lock = threading.RLock()


@contextlib.contextmanager
def _quantized_engine(engine: str):
    """PyTorch's quantised engine set to `engine` inside the block, the caller's restored after it; one thread at a
    time (the engine is one global setting). The engine a dynamic int8 layer is packed under is the one it runs with,
    whatever the engine is later."""
    with _quantized_engine_lock:
        previous = torch.backends.quantized.engine
        torch.backends.quantized.engine = engine
        try:
            yield
        finally:
            torch.backends.quantized.engine = previous


def cpu_int8_engines() -> tuple[str, ...]:
    """The int8 engines this PyTorch build offers of the two merit_hf chooses between: `"x86"` (fbgemm's AVX2 /
    AVX512-VNNI kernels for dynamic linear layers) and `"onednn"` (oneDNN's, which use AMX-INT8 tiles where the CPU
    has them)."""
    supported = torch.backends.quantized.supported_engines
    return tuple(engine for engine in INT8_ENGINES if engine in supported)


def _quantize_int8(module: nn.Module, engine: str | None = None) -> nn.Module:
    import warnings

    from torch.ao.quantization import quantize_dynamic

    names = set(_block_linears(module))
    with warnings.catch_warnings():  # PyTorch's deprecation notice for torch.ao.quantization (see the module doc)
        warnings.filterwarnings(
            "ignore", message=r"torch\.ao\.quantization is deprecated", category=DeprecationWarning
        )
        warnings.filterwarnings("ignore", message=r".*torch\.quantize_per_tensor.*deprecated", category=UserWarning)
        with _quantized_engine(engine or torch.backends.quantized.engine):
            quantized = quantize_dynamic(module, names, dtype=torch.qint8, inplace=True)
    quantized.merit_int8_engine = engine or torch.backends.quantized.engine
    return quantized


def time_cpu_int8_engines(
    block: nn.Module, num_tokens: int, batch_size: int = 2, repeats: int = 3
) -> dict[str, float]:
    """Best-of-`repeats` seconds of one forward of the fp32 Transformer block `block` with its linear layers quantised
    to int8 under each engine of `cpu_int8_engines()`, on random hidden states of `num_tokens` tokens, interleaved.
    `block` itself is left as it is."""
    from .modeling_merit import best_interleaved_seconds

    quantized = {
        engine: _quantize_int8(copy.deepcopy(block).to("cpu", torch.float32).eval(), engine).eval()
        for engine in cpu_int8_engines()
    }
    hidden_states = torch.randn(batch_size, num_tokens, block.norm1.normalized_shape[0])
    runs = {engine: functools.partial(layer, hidden_states) for engine, layer in quantized.items()}
    return best_interleaved_seconds(runs, repeats)


def _block_shape_key(block: nn.Module) -> tuple[int, tuple[int, ...]]:
    """A Transformer block's token count, and what a choice timed on it is kept under: (hidden size, MLP size, heads,
    tokens, threads)."""
    config = block.attention.config
    num_tokens = config.num_leads * config.tokens_per_lead
    fc1 = block.mlp.fc1
    return num_tokens, (
        fc1.in_features,
        fc1.out_features,
        block.attention.num_heads,
        num_tokens,
        torch.get_num_threads(),
    )


def cpu_int8_engine(module: nn.Module) -> str:
    """The engine `"int8"` quantises `module`'s Transformer blocks under on this CPU: the faster of
    `cpu_int8_engines()`, timed on one of `module`'s blocks at first use, once per machine for each (hidden size, MLP
    size, heads, tokens, threads), with the choice logged at debug level. oneDNN's dynamic int8 linear layers ran
    2-5x faster than fbgemm's on an AMX Xeon (benchmarks/README.md, "CPU inference"); where they are not faster the
    timing keeps `"x86"`, PyTorch's default. A build offering fewer than two of them (ARM) keeps PyTorch's own
    engine, untimed. `MERIT_CPU_INT8_ENGINE=x86` or `=onednn` fixes it."""
    engines = cpu_int8_engines()
    forced = os.environ.get(CPU_INT8_ENGINE_ENV)
    if forced:
        if forced not in INT8_ENGINES:
            raise ValueError(f"{CPU_INT8_ENGINE_ENV}: must be one of {list(INT8_ENGINES)}, got {forced!r}")
        if forced not in engines:
            raise ValueError(
                f"{CPU_INT8_ENGINE_ENV}={forced}: this PyTorch build has no such quantised engine (it has "
                f"{list(torch.backends.quantized.supported_engines)})"
            )
        return forced
    block = next(iter(_blocks(module)), None)
    if block is None or len(engines) < 2:  # nothing to time (an ARM build, say): PyTorch's own choice, as before
        return torch.backends.quantized.engine
    num_tokens, key = _block_shape_key(block)
    if key not in _cpu_int8_engine_choice:
        from .modeling_merit import cached_cpu_choice

        _cpu_int8_engine_choice[key], how = cached_cpu_choice(
            "int8-engine", key, engines, lambda: time_cpu_int8_engines(block, num_tokens)
        )
        logger.debug(
            "CPU int8 engine for blocks of %d -> %d, %d tokens, %d threads: %s (%s)",
            key[0], key[1], num_tokens, key[-1], _cpu_int8_engine_choice[key], how,
        )  # fmt: skip
    return _cpu_int8_engine_choice[key]


def _fp8_shapes(linear: nn.Linear) -> bool:
    """Whether fp8 can quantise `linear`: torch._scaled_mm needs both matmul dimensions divisible by 16."""
    return linear.in_features % 16 == 0 and linear.out_features % 16 == 0


def _quantize_fp8(module: nn.Module) -> nn.Module:
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except ImportError as error:
        raise ImportError(
            "precision 'fp8' needs torchao: pip install 'merit_hf[fp8]' (or pip install torchao)"
        ) from error
    chosen = {id(linear) for linear in _block_linears(module).values() if _fp8_shapes(linear)}
    quantize_(
        module,
        Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
        filter_fn=lambda child, _name: id(child) in chosen,
    )
    return module


def time_cpu_prepacking(block: nn.Module, num_tokens: int, batch_size: int = 2, repeats: int = 3) -> dict[str, float]:
    """Best-of-`repeats` seconds of one forward of the Transformer block `block` with its linear layers as they are
    (`"nn.Linear"`) and prepacked (`"prepacked"`), on random hidden states of `num_tokens` tokens in the block's dtype,
    interleaved so that machine drift hits both. `block` itself is left as it is."""
    from .modeling_merit import best_interleaved_seconds

    plain = copy.deepcopy(block).eval()
    packed = _prepack_block_linears(copy.deepcopy(block).eval())
    parameter = next(block.parameters())
    hidden_states = torch.randn(batch_size, num_tokens, block.norm1.normalized_shape[0], dtype=parameter.dtype)
    runs = {"nn.Linear": lambda: plain(hidden_states), "prepacked": lambda: packed(hidden_states)}
    return best_interleaved_seconds(runs, repeats)


def cpu_prepacking_pays(module: nn.Module, dtype: torch.dtype) -> bool:
    """Whether `module`'s Transformer blocks run faster on this CPU in `dtype` with prepacked linear layers
    (`PrepackedLinear`). bf16: always, where the operators work (oneDNN otherwise reorders every weight on every
    call). fp32: timed on one of `module`'s blocks at first use (`time_cpu_prepacking`), once per machine for each
    (dtype, hidden size, MLP size, heads, tokens, threads), with the choice logged at debug level.
    `MERIT_CPU_PREPACK=on` or `=off` fixes it."""
    if dtype not in PREPACKED_DTYPES:
        return False
    forced = os.environ.get(CPU_PREPACK_ENV)
    if forced and forced not in ("on", "off"):
        raise ValueError(f"{CPU_PREPACK_ENV}: must be 'on' or 'off', got {forced!r}")
    block = next(iter(_blocks(module)), None)
    if block is None or forced == "off" or not cpu_prepacking_works(dtype):
        return False
    if forced == "on" or dtype == torch.bfloat16:
        return True
    num_tokens, shape = _block_shape_key(block)
    key = (dtype, *shape)
    if key not in _cpu_prepacking_choice:
        from .modeling_merit import cached_cpu_choice

        choice, how = cached_cpu_choice(
            "linear-prepacking", key, ("prepacked", "nn.Linear"), lambda: time_cpu_prepacking(block, num_tokens)
        )
        _cpu_prepacking_choice[key] = choice == "prepacked"
        logger.debug(
            "CPU %s linear layers for blocks of %d -> %d, %d tokens, %d threads: %s (%s)",
            dtype, key[1], key[2], num_tokens, key[-1], choice, how,
        )  # fmt: skip
    return _cpu_prepacking_choice[key]


def _check_something_to_quantise(module: nn.Module, precision: str) -> None:
    """`ValueError` when `precision` (`"int8"` or `"fp8"`) would quantise nothing in `module`: it quantises the linear
    layers of MERIT's Transformer blocks only, and a module without any (other layers, or a model whose blocks are
    not recognised) would run unquantised under the name int8 or fp8."""
    linears = _block_linears(module)
    if precision == "fp8":
        linears = {name: linear for name, linear in linears.items() if _fp8_shapes(linear)}
    if not linears:
        what = "no Transformer block (MeritEcgLayer)" if not _blocks(module) else "no linear layer fp8 can take"
        raise ValueError(
            f"precision {precision!r} quantises the linear layers of MERIT's Transformer blocks, and "
            f"{type(module).__name__} ({type(module).__module__}) has {what}: nothing would be quantised. Pass the "
            "ECG encoder (a MeritEcgModel), or run a float precision"
        )


def _convert(module: nn.Module, precision: str, device: torch.device) -> nn.Module:
    if precision in ("int8", "fp8"):
        _check_something_to_quantise(module, precision)
    if precision == "int8":
        # quantize_dynamic's new layers start in training mode: eval() again (they compute the same either way)
        engine = cpu_int8_engine(module)
        return _quantize_int8(copy.deepcopy(module).to(device=device, dtype=torch.float32), engine).eval()
    if precision == "fp8":
        return _quantize_fp8(copy.deepcopy(module).to(device=device, dtype=torch.bfloat16).eval())
    dtype = _DTYPES[precision]
    current_dtype, current_device = _state(module)
    if current_dtype == dtype and current_device is not None and _same_device(current_device, device):
        # already in that dtype on that device (fp32 on a CPU to be prepacked, or a module in training mode): the
        # copy shares the caller's tensors
        converted = _shared_copy(module)
    else:
        converted = copy.deepcopy(module).to(device=device, dtype=dtype).eval()
    if device.type == "cpu" and cpu_prepacking_pays(converted, dtype):
        _prepack_block_linears(converted)
    return converted


def _shared_copy(module: nn.Module) -> nn.Module:
    """An eval-mode copy of `module` that shares its parameters and buffers (only the module objects are new)."""
    shared = {id(tensor): tensor for tensor in (*module.parameters(), *module.buffers())}
    engine = getattr(module, "merit_int8_engine", None)  # deep-copying repacks int8 layers under the global engine
    with _quantized_engine(engine) if engine else contextlib.nullcontext():
        return copy.deepcopy(module, memo=shared).eval()


_prepared: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def inference_device(device: torch.device | str | None = None, use_cpu: bool = False) -> torch.device:
    """Where merit_hf embeds ECGs when the caller does not say: `device` when given, else the GPU when there is one
    (unless `use_cpu`), else the CPU. The one default of the embedding command line, `evaluate_zero_shot` and the
    probe's features."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() and not use_cpu else "cpu")


def allocator_set_by_user(environ: dict[str, str] | None = None) -> str | None:
    """What in `environ` (default: this process's) already configures how memory is allocated, which
    `keep_freed_cpu_memory` then leaves alone: glibc's `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_` /
    `MALLOC_TOP_PAD_` / `MALLOC_MMAP_MAX_`, a `glibc.malloc` entry of `GLIBC_TUNABLES`, or tcmalloc, jemalloc or
    mimalloc in `LD_PRELOAD` (glibc's settings would not reach them). `None` when nothing does."""
    environ = os.environ if environ is None else environ
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_"):
        if environ.get(name):
            return f"{name} is set"
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES sets glibc.malloc"
    preloaded = environ.get("LD_PRELOAD", "").lower()
    for allocator in ("tcmalloc", "jemalloc", "mimalloc"):
        if allocator in preloaded:
            return f"{allocator} is preloaded (LD_PRELOAD)"
    return None


def keep_freed_cpu_memory() -> bool:
    """Make glibc keep the memory this process frees for its next allocations, up to 1 GiB (`KEPT_FREED_BYTES`):
    blocks up to that size come from its heap instead of fresh pages of the operating system, and its heap's free top
    is given back only beyond it (`mallopt(M_MMAP_THRESHOLD)`, `mallopt(M_TRIM_THRESHOLD)`). Done once per process,
    unless `MERIT_CPU_ALLOCATOR=system`, or the process's allocation was configured already (`allocator_set_by_user`:
    glibc's own `MALLOC_*_` or `GLIBC_TUNABLES` malloc settings, or another allocator preloaded); elsewhere than glibc
    (macOS, Windows, musl) nothing is done. Returns whether the setting is in force. See the module doc for why."""
    choice = os.environ.get(CPU_ALLOCATOR_ENV, "keep").strip().lower() or "keep"
    if choice not in CPU_ALLOCATORS:
        raise ValueError(f"{CPU_ALLOCATOR_ENV}={choice!r}: one of {CPU_ALLOCATORS}")
    if choice == "system":
        return False
    return _keep_freed_memory_once()


@functools.cache
def _keep_freed_memory_once() -> bool:
    """`keep_freed_cpu_memory`'s `mallopt` calls, made at most once per process; whether they took."""
    kept, configured = False, allocator_set_by_user()
    if configured:
        logger.debug("C library left as it is: %s", configured)
    elif platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        try:
            libc = ctypes.CDLL("libc.so.6")
            kept = bool(libc.mallopt(_M_MMAP_THRESHOLD, KEPT_FREED_BYTES)) and bool(
                libc.mallopt(_M_TRIM_THRESHOLD, KEPT_FREED_BYTES)
            )
        except (OSError, AttributeError) as error:
            logger.debug("glibc's mallopt unavailable (%s): freed memory goes back as usual", error)
    logger.debug(
        "C library %s freed memory for reuse (%s=system to leave it)",
        "keeps up to 1 GiB of" if kept else "left as it is: returns", CPU_ALLOCATOR_ENV,
    )  # fmt: skip
    return kept


def prepare_for_inference(
    module: nn.Module, precision: str = "auto", device: torch.device | str | None = None
) -> nn.Module:
    """`module` ready for inference in `precision` (see the module doc) on `device` (default: the module's own).

    Returns `module` itself when it already is in that precision on that device and in eval mode; otherwise a
    converted copy in eval mode (for a module in training mode that needs no conversion, a copy sharing its weights),
    cached beside `module` until its parameters change. The caller's module is never cast, quantised or switched to
    eval mode (a training loop that scores zero-shot between steps keeps its dropout, whatever the CPU).

    The Transformer blocks are recognised by their class's name and defining module (`is_merit_module`), so a model
    loaded from a saved folder with `trust_remote_code=True` (the folder's own `modeling_merit.py`) converts as
    merit_hf's classes do. The debug line says what was converted (`conversion_summary`).

    Raises `ValueError` for a module already quantised to int8 or fp8 (what `"int8"` and `"fp8"` return) asked for
    another precision, and for `"int8"` or `"fp8"` of a module in which they would quantise nothing (no Transformer
    block), except MERIT's projection head, which runs fp32 beside an int8 encoder and bf16 beside an fp8 one
    (`QUANTISED_HEAD_PRECISIONS`; what the zero-shot pipeline of a folder saved by an earlier merit_hf asks for).
    """
    dtype, current_device = _state(module)
    device = torch.device(device) if device is not None else (current_device or torch.device("cpu"))
    resolved = resolve_precision(precision, device)
    if device.type == "cpu":
        keep_freed_cpu_memory()
    if resolved in QUANTISED_HEAD_PRECISIONS and is_merit_module(module, "MeritProjectionHead"):
        # the zero-shot pipeline of a folder saved by an earlier merit_hf (remote code) passes its projection head
        # with the encoder's int8 / fp8; they quantise the Transformer blocks only, and the head ran fp32 / bf16
        resolved = QUANTISED_HEAD_PRECISIONS[resolved]
    quantized = _quantization(module)
    if quantized is not None and resolved != quantized:
        raise ValueError(
            f"{type(module).__name__} is already quantised to {quantized} (prepare_for_inference(..., {quantized!r}) "
            f"returns such a copy); it cannot run in {resolved!r}: pass the model it was made from"
        )
    ready = quantized is not None or (
        resolved in _DTYPES
        and dtype in (None, _DTYPES[resolved])
        and (current_device is None or _same_device(current_device, device))
        and not (device.type == "cpu" and dtype is not None and cpu_prepacking_pays(module, dtype))
    )
    if ready and not module.training:
        return module
    signature = (resolved, str(device), weights_signature(module))
    cached = _prepared.get(module)
    if cached is not None and cached[0] == signature:
        return cached[1]
    converted = _shared_copy(module) if ready else _convert(module, resolved, device)
    _prepared[module] = (signature, converted)
    logger.debug(
        "%s %s for %s inference on %s: %s",
        type(module).__name__, "shared (an eval-mode copy)" if ready else "converted", resolved, device,
        conversion_summary(converted),
    )  # fmt: skip
    return converted


def conversion_summary(module: nn.Module) -> str:
    """What `prepare_for_inference` made of a module, counted in it: its Transformer blocks' linear layers quantised
    to int8 (and the engine) or fp8, or prepacked for oneDNN (and how many with their GELU fused), and the dtype of
    the other weights. The debug line of every conversion ends with it, so a conversion that changed nothing says so."""
    num_blocks = len(_blocks(module))
    blocks = f"{num_blocks} Transformer block{'s' * (num_blocks != 1)}"
    int8 = fp8 = prepacked = fused = 0
    for child in module.modules():
        if child._get_name() == "DynamicQuantizedLinear":
            int8 += 1
        elif isinstance(child, PrepackedLinear):
            prepacked += 1
            fused += child.activation == "gelu"
        elif isinstance(child, nn.Linear) and _quantization_of_parameter(child.weight) == "fp8":
            fp8 += 1
    dtype = _float_dtype(module)
    weights = f"{str(dtype).removeprefix('torch.')} weights" if dtype is not None else "no float weights"
    if int8:
        engine = getattr(module, "merit_int8_engine", None)
        return f"{int8} linear layers of {blocks} quantised to int8{f' ({engine} engine)' if engine else ''}, else {weights}"
    if fp8:
        return f"{fp8} linear layers of {blocks} quantised to fp8, else {weights}"
    if prepacked:
        return f"{prepacked} linear layers of {blocks} prepacked for oneDNN ({fused} with the GELU fused), {weights}"
    return f"{weights}, no layer quantised or prepacked ({blocks})"


__all__ = [
    "CpuCapability",
    "PRECISIONS",
    "PrepackedLinear",
    "allocator_set_by_user",
    "cpu_capability",
    "cpu_int8_engine",
    "cpu_prepacking_pays",
    "conversion_summary",
    "inference_device",
    "is_merit_module",
    "keep_freed_cpu_memory",
    "prepare_for_inference",
    "resolve_precision",
]

"""The batched torch path of `MeritFeatureExtractor` (`fe(records, ..., device="cpu" | "cuda")`).

The scipy path resamples and filters one record at a time; this one does the same arithmetic on a whole batch of
tensors, on the CPU or a GPU, so that preparing ECGs does not set the pace of a GPU that embeds them. Validation
(shape, units, leads, NaN, amplitude, rates, lengths) is the feature extractor's own, in the same order and with the
same errors, before any tensor is built. Only for records whose columns are already the model's leads in mV does one
batched screen (`screen_records`) stand in for the record-by-record checks, and only where it proves they would pass.
The windows (one crop, or every window of `window="sliding"`) are its own code applied to sample positions, and
missing leads (`missing_leads="mask"`) are zero and left out of the statistics as there. Only the DSP differs, and it
reproduces scipy's rather than approximating it:

- `scipy.signal.resample_poly`: the same Kaiser-windowed FIR (designed by scipy, once per `(up, down)`), applied
  polyphase (no multiplication by an inserted zero) as matrix products on blocks of the signal read in place;
- `scipy.signal.sosfiltfilt`: the forward and backward passes over a whole record are one convolution with the
  autocorrelation of the filter's impulse response (a real FFT and its inverse), plus what the record's ends add
  (scipy's odd padding, `sosfilt_zi` states, the forward pass cut at the end), which depends on the signal through
  at most 2 + the filter's order numbers and is one small matrix product; both operators come from scipy's own
  `sosfilt` / `sosfiltfilt`, and are checked against them when built. Records longer than `FFT_MAX_LENGTH` run the
  IIR filter on blocks of `FILTER_BLOCK` samples as matrix products instead, whose columns scipy's `sosfilt`
  computed from unit inputs and states, the starting states carried by powers of the block-to-block transition.

What is left between the two paths is float32 arithmetic (measured in tests/test_core_feature_extraction_torch.py).
Records are batched by `(resampling ratio, length)`; a batch of PTB-XL or MIMIC-IV-ECG records is one or two groups.
On a CPU shared with other processes give torch one thread (`torch.set_num_threads(1)`, as DataLoader workers have):
two threads fighting for two busy cores made this path 14x slower than scipy, one thread 2.6x faster
(benchmarks/README.md). This file is Hub remote code: it imports numpy, scipy and torch only.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import lru_cache, partial
from typing import Any

import numpy as np
import torch
from scipy import fft as sp_fft
from scipy import signal as sp_signal

# On the CPU a batch goes through the DSP this many records at a time, so that its intermediates (about 0.3 MB a
# record) stay in cache: 1.3-1.7x faster than the whole batch of 64 at once, single-threaded on the 2-core machine.
CPU_RECORDS_PER_CHUNK = 8
# Output positions per block of the resampling matrix product: each output sample costs about
# `RESAMPLE_BLOCK * down / up + filter taps` multiply-adds.
RESAMPLE_BLOCK = 32
MAX_RESAMPLE_MATRIX = 2**20  # entries
# Samples per block of the blocked IIR filter (each output sample costs this many multiply-adds in one matrix product),
# and blocks per segment whose starting states come from one matrix product (16 s at 250 Hz; a longer record takes one
# small step per segment).
FILTER_BLOCK = 64
SEGMENT_BLOCKS = 64
# Records up to this many samples (at the output rate, with `sosfiltfilt`'s padding) are band-passed through one FFT
# (`_fft_operators`: 1.1-1.2x faster than the blocked filter on the 2-core CPU); longer ones (hours of Holter, whose
# operators would take memory in proportion) block by block. So are groups of fewer than `FFT_MIN_ROWS` leads of one
# length: the FFT's operators are built once per length (9 ms for 10 s at 250 Hz), which only pays when they are
# reused, and a data set whose every record has its own length would build them for every record.
FFT_MAX_LENGTH = 2**17
FFT_MIN_ROWS = 48


# `screen_records` splits each lead into groups of this many samples, `num_samples // SCREEN_GROUP` apart, and looks
# at the first `max(SCREEN_GROUPS_PER_OUTSIDE * (outside + 1), SCREEN_MIN_GROUPS)` groups (any subset will do): a lead
# is cleared of being flat when more than `outside` of them are not quiet. Of the 100 PTB-XL records at 500 Hz and
# the 1,987 at 100 Hz in ../shared/data, no lead had fewer than 183 of 512 (500 Hz, 50 needed) or 74 of 333 (100 Hz,
# 10 needed): every lead was cleared, with room.
SCREEN_GROUP = 3
SCREEN_GROUPS_PER_OUTSIDE = 10
SCREEN_MIN_GROUPS = 512
# Rounding slack of the screen, relative to a lead's largest |value|: a float64 value cast to float32 moves by at most
# 2**-24 of itself, and a difference of two such values rounds once more; 2**-20 covers both with room.
SCREEN_SLACK = 2.0**-20


def screen_records(
    stack: torch.Tensor, min_amplitude_mv: float, max_amplitude_mv: float, outside: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A sufficient test, on a batch at once, that validation (`MeritFeatureExtractor.validate_signal`) passes
    records whose leads are already the model's, in order and in mV, without changing them: `stack`
    `(records, num_leads, num_samples)` (float32 casts of the float64 records). `max_amplitude_mv`: the smaller of the
    feature extractor's upper bounds (`max_amplitude_mv`, `max_sample_deviation_mv`). Returns `(checked (records,)
    bool, may_be_flat (records, num_leads) bool, off_zero (records,) bool)`:

    - `checked`: every value finite and no lead wider than `max_amplitude_mv` peak to peak (finite in float32 implies
      finite in float64; a lead's peak-to-peak range bounds each of its |x - median|, so `leads_too_wide` and
      `sample_too_far` clear a lead whose range is within their limit, and the float32 range is within
      `SCREEN_SLACK` of its largest |value| of the float64 one);
    - `may_be_flat`: leads that this test cannot clear of being flat; the caller runs the exact test on them. A flat
      lead has all but `outside` of its samples within `min_amplitude_mv` of its median (`flat_outside`). Split the
      lead into `num_samples // SCREEN_GROUP` groups of `SCREEN_GROUP` samples that far apart: the `outside` samples
      touch at most `outside` groups, so all other groups span less than `2 * min_amplitude_mv` ("quiet"). A lead
      with more than `outside` groups that are not quiet, among any of its groups, is not flat. Samples far apart
      are rarely close in an ECG (a flat stretch and a wave, or two beats' baselines): real leads clear this with
      room (see the constants);
    - `off_zero`: records with a lead whose values reach farther from 0 mV than its peak-to-peak range. The cast
      rounds a value by up to 2**-24 of it; a lead taken out around one of its values first (`_write_centred`)
      by up to 2**-24 of its range. Where `off_zero` is false the cast is as exact as that (every lead of the
      1,987 + 100 PTB-XL records in ../shared/data: their largest |value| is at most 0.93 of their range).

    Two reductions over the batch and a few operations on a fifth of it: about 20 µs a record on the 2-core CPU,
    against 110 µs for validation record by record (benchmarks/README.md)."""
    high, low = stack.amax(dim=-1), stack.amin(dim=-1)  # NaN propagates into both
    extent, spread = torch.maximum(high.abs(), low.abs()), high - low
    off_zero = (extent > spread).any(dim=-1)
    slack = extent.mul_(SCREEN_SLACK)
    checked = (torch.isfinite(high) & torch.isfinite(low) & ((spread + slack) <= max_amplitude_mv)).all(dim=-1)
    records, num_leads, num_samples = stack.shape
    groups = num_samples // SCREEN_GROUP
    if min_amplitude_mv <= 0:  # no flat-lead test
        return checked, torch.zeros((records, num_leads), dtype=torch.bool, device=stack.device), off_zero
    if groups <= outside:  # too few groups to tell
        return checked, torch.ones((records, num_leads), dtype=torch.bool, device=stack.device), off_zero
    looked_at = min(groups, max(SCREEN_GROUPS_PER_OUTSIDE * (outside + 1), SCREEN_MIN_GROUPS))
    parts = [stack[..., part * groups : part * groups + looked_at] for part in range(SCREEN_GROUP)]
    group_high, group_low = torch.maximum(parts[0], parts[1]), torch.minimum(parts[0], parts[1])
    for part in parts[2:]:
        torch.maximum(group_high, part, out=group_high)
        torch.minimum(group_low, part, out=group_low)
    not_quiet = (group_high.sub_(group_low) > (slack + 2 * min_amplitude_mv)[..., None]).sum(dim=-1)
    return checked, not_quiet <= outside, off_zero


@lru_cache(maxsize=64)
def polyphase_filter(up: int, down: int) -> tuple[np.ndarray, int]:
    """`resample_poly(x, up, down)`'s FIR as `conv1d` weights `(up, 1, taps)` (one output phase per channel, to be
    applied with stride `down`) and the zeros to put before `x`. Output sample `up * m + q` is channel `q` at
    position `m`. The filter and its placement are scipy's own (`firwin`, Kaiser beta 5, `half_len = 10 * max(up,
    down)`, `n_pre_pad`, `n_pre_remove`), so the outputs agree to rounding (tested)."""
    max_rate = max(up, down)
    half_len = 10 * max_rate
    taps = sp_signal.firwin(2 * half_len + 1, 1.0 / max_rate, window=("kaiser", 5.0)) * up
    n_pre_pad = down - half_len % down
    n_pre_remove = (half_len + n_pre_pad) // down
    full = np.concatenate([np.zeros(n_pre_pad), taps])
    # y[i] = sum_j x[j] full[(i + n_pre_remove) * down - j * up]; with i = up * m + q this is
    # sum_k g_q[k] x[down * m + a_q - k], where (q + n_pre_remove) * down = up * a_q + p_q and g_q[k] = full[up * k + p_q]
    num_k = -(-len(full) // up)
    phases = np.zeros((up, num_k))
    offsets = np.zeros(up, dtype=np.int64)
    for q in range(up):
        offsets[q], p = divmod((q + n_pre_remove) * down, up)
        phase = full[p::up]
        phases[q, : len(phase)] = phase
    left = max(0, num_k - 1 - int(offsets.min()))
    width = int(offsets.max()) + left + 1
    weights = np.zeros((up, 1, width))
    for q in range(up):  # cross-correlation position s = a_q + left - k
        positions = offsets[q] + left - np.arange(num_k)
        keep = positions >= 0
        weights[q, 0, positions[keep]] = phases[q, keep]
    return weights, left


@lru_cache(maxsize=64)
def _resample_blocks(up: int, down: int) -> tuple[np.ndarray, int, int]:
    """`polyphase_filter` as one matrix for a block of output positions: `(window, positions * up)`, applied to input
    windows of `window` samples taken every `positions * down` (a matrix product runs about 6x more multiply-adds a
    second than the depthwise convolution on the CPU, which outweighs the zeros). `positions` is `RESAMPLE_BLOCK`,
    or fewer where unusual rates (large `up` and `down`, e.g. 1001 Hz) would make the matrix large."""
    weights, _ = polyphase_filter(up, down)
    taps = weights.shape[-1]
    positions = RESAMPLE_BLOCK
    while positions > 1 and ((positions - 1) * down + taps) * positions * up > MAX_RESAMPLE_MATRIX:
        positions //= 2
    window = (positions - 1) * down + taps
    matrix = np.zeros((window, positions * up))
    for position in range(positions):
        matrix[position * down : position * down + taps, position * up : (position + 1) * up] = weights[:, 0].T
    return matrix, window, positions


@lru_cache(maxsize=64)
def _resample_matrix_on(up: int, down: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.as_tensor(_resample_blocks(up, down)[0], dtype=dtype, device=device)


def _resample_layout(up: int, down: int, length: int) -> tuple[int, int, int, int]:
    """How `resample_poly_padded` reads a signal of `length` samples: `(step, spans, blocks, per_row)`. Output block
    `b` reads the input from `b * step` on, `spans` steps of it (the window overlaps the next blocks); a row holds
    `per_row` steps, `spans - 1` more than the output needs, so that the last block's window stays in its own row."""
    _, window, positions = _resample_blocks(up, down)
    step = positions * down
    spans = -(-window // step)
    blocks = -(-(-(-length * up // down)) // (up * positions))
    return step, spans, blocks, blocks + spans - 1


def resample_padding(up: int, down: int, length: int) -> tuple[int, int]:
    """The zeros `resample_poly_padded` needs before and after a signal of `length` samples."""
    _, left = polyphase_filter(up, down)
    step, _, _, per_row = _resample_layout(up, down, length)
    return left, per_row * step - (length + left)


def resample_poly_padded(padded: torch.Tensor, up: int, down: int, length: int) -> torch.Tensor:
    """`scipy.signal.resample_poly(x, up, down, axis=-1)` for `(rows, length)` signals given already zero-padded by
    `resample_padding` (callers write the signal into that buffer, which saves a pass over it), contiguous. Each
    block of outputs is a sum of matrix products, one per `step` of input its window spans, read in place: the
    signal's rows seen as `(rows * per_row, step)` and shifted by whole steps (no copy of overlapping windows)."""
    matrix = _resample_matrix_on(up, down, padded.device, padded.dtype)
    step, spans, _, per_row = _resample_layout(up, down, length)
    rows, out_length = len(padded), -(-length * up // down)
    if padded.shape[-1] != per_row * step:
        raise ValueError(f"expected rows of {per_row * step} samples (resample_padding), got {padded.shape[-1]}")
    flat = padded.reshape(-1)
    count = rows * per_row - (spans - 1)  # the last row's trailing blocks would run past the buffer: never used
    output = padded.new_empty(rows * per_row, matrix.shape[1])
    for span in range(spans):
        width = min(step, len(matrix) - span * step)
        inputs = flat.as_strided((count, width), (step, 1), flat.storage_offset() + span * step)
        part = matrix[span * step : span * step + width]
        if span == 0:
            torch.mm(inputs, part, out=output[:count])
        else:
            output[:count].addmm_(inputs, part)
    return output.reshape(rows, -1)[:, :out_length]


def resample_poly(signals: torch.Tensor, up: int, down: int) -> torch.Tensor:
    """`scipy.signal.resample_poly(signals, up, down, axis=-1)` (zero padding at the ends) for `(rows, length)`."""
    if up == down == 1:
        return signals
    left, right = resample_padding(up, down, signals.shape[-1])
    return resample_poly_padded(torch.nn.functional.pad(signals, (left, right)), up, down, signals.shape[-1])


def filtfilt_padlen(sos: np.ndarray) -> int:
    """The odd-extension length of `scipy.signal.sosfiltfilt` (its default `padlen`): 3 x the filter's taps."""
    ntaps = 2 * len(sos) + 1 - min(int((sos[:, 2] == 0).sum()), int((sos[:, 5] == 0).sum()))
    return 3 * ntaps


@lru_cache(maxsize=16)
def _block_operators(sos_bytes: bytes) -> tuple[np.ndarray, ...]:
    """`scipy.signal.sosfilt` as matrices on blocks of `FILTER_BLOCK` samples, each computed by `sosfilt` itself from
    a unit input or state (so the state layout and `sosfilt_zi` are scipy's): `toeplitz` (block input -> block
    output from a zero state), `to_state` (block input -> the state after it), `from_state` (a block's starting state
    -> its output), `transition` (state -> the state one block later), `initial` (`sosfilt_zi`), `powers` (a
    segment's starting state -> the starting state of each of its `SEGMENT_BLOCKS` blocks) and `carry` (the inputs
    of block `j` -> the starting state of every later block `b` of the segment, `transition ** (b - 1 - j)`)."""
    sos = np.frombuffer(sos_bytes).reshape(-1, 6).copy()  # sosfilt needs a writable array
    block, state_size = FILTER_BLOCK, 2 * len(sos)
    zeros_state = np.zeros((len(sos), 2))
    toeplitz = np.zeros((block, block))
    to_state = np.zeros((block, state_size))
    for j in range(block):
        impulse = np.zeros(block)
        impulse[j] = 1.0
        toeplitz[j], final = sp_signal.sosfilt(sos, impulse, zi=zeros_state)
        to_state[j] = final.reshape(-1)
    from_state = np.zeros((state_size, block))
    transition = np.zeros((state_size, state_size))
    for k in range(state_size):
        unit = np.zeros(state_size)
        unit[k] = 1.0
        from_state[k], final = sp_signal.sosfilt(sos, np.zeros(block), zi=unit.reshape(len(sos), 2))
        transition[k] = final.reshape(-1)
    # In scipy's state coordinates a high-pass near 0 Hz keeps large states that cancel in the output (x27 here),
    # which float32 turned into 1e-3 errors on z-scored leads; in coordinates where `from_state` has orthonormal
    # rows a state is as large as what it adds to the output (1.6e-7 relative error in float32).
    # (scipy state = new state @ to_scipy; from_state = U S V^T, to_scipy = (U S)^-1 = S^-1 U^T)
    left, singular, right = np.linalg.svd(from_state, full_matrices=False)
    to_scipy, from_scipy = (left / singular).T, left * singular
    to_state, from_state, transition = to_state @ from_scipy, right, to_scipy @ transition @ from_scipy
    initial = sp_signal.sosfilt_zi(sos).reshape(-1) @ from_scipy
    power = [np.eye(state_size)]
    for _ in range(SEGMENT_BLOCKS):
        power.append(power[-1] @ transition)
    powers = np.concatenate(power[:SEGMENT_BLOCKS], axis=1)
    carry = np.zeros((SEGMENT_BLOCKS * state_size, SEGMENT_BLOCKS * state_size))
    for j in range(SEGMENT_BLOCKS):
        for b in range(j + 1, SEGMENT_BLOCKS):
            carry[j * state_size : (j + 1) * state_size, b * state_size : (b + 1) * state_size] = power[b - 1 - j]
    return toeplitz, to_state, from_state, transition, initial, powers, carry


@lru_cache(maxsize=16)
def _block_operators_on(sos_bytes: bytes, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    return tuple(torch.as_tensor(operator, dtype=dtype, device=device) for operator in _block_operators(sos_bytes))


def sosfilt(blocks: torch.Tensor, sos: np.ndarray) -> torch.Tensor:
    """`scipy.signal.sosfilt(sos, x, zi=sosfilt_zi(sos) * x[:, :1])` for `x` `(rows, num_blocks * FILTER_BLOCK)`,
    as matrix products on blocks (no loop over time within a segment of `SEGMENT_BLOCKS` blocks, one step per
    segment): the output of each block is its own input through the filter plus the state it starts in, and that
    state is the segment's starting state and every earlier block's input carried forward. Exact in exact
    arithmetic; zeros after the signal change only outputs after it."""
    rows, length = blocks.shape
    num_blocks = length // FILTER_BLOCK
    key = np.ascontiguousarray(sos, dtype=np.float64).tobytes()
    toeplitz, to_state, from_state, transition, initial, powers, carry = _block_operators_on(
        key, blocks.device, blocks.dtype
    )
    state_size = len(initial)
    flat = blocks.reshape(rows * num_blocks, FILTER_BLOCK)
    inputs = (flat @ to_state).reshape(rows, num_blocks, state_size)  # each block's input -> the state after it
    states = []
    state = blocks[:, :1] * initial  # sosfilt_zi * x[0]
    for first in range(0, num_blocks, SEGMENT_BLOCKS):
        count = min(SEGMENT_BLOCKS, num_blocks - first)
        size = count * state_size
        segment = inputs[:, first : first + count].reshape(rows, size)
        starts = torch.addmm(state @ powers[:, :size], segment, carry[:size, :size])  # (rows, count * state_size)
        states.append(starts)
        state = starts[:, -state_size:] @ transition + inputs[:, first + count - 1]
    states = torch.cat(states, dim=1) if len(states) > 1 else states[0]
    return (flat @ toeplitz).addmm_(states.reshape(rows * num_blocks, state_size), from_state).reshape(rows, length)


@lru_cache(maxsize=64)
def _reversal(length: int, padded: int, device: torch.device) -> torch.Tensor:
    """Indices that reverse the first `length` of `padded` samples and read a zero sample (`length`) after them."""
    return torch.cat([torch.arange(length - 1, -1, -1), torch.full((padded - length,), length)]).to(device)


@lru_cache(maxsize=64)
def _fft_operators(
    sos_bytes: bytes, length: int, tolerance: float
) -> tuple[int, np.ndarray, np.ndarray, np.ndarray] | None:
    """`sosfiltfilt` without padding (scipy's `padtype=None`: the forward pass from `sosfilt_zi * x[0]`, the backward
    one from `sosfilt_zi * y[-1]`) on `length` samples as `(n, spectrum, basis, correction)`: the map is `x -> r * x
    + correction @ (basis.T @ x)`, where `r * x` is the convolution with the autocorrelation `r` of the filter's
    impulse response (the forward and backward passes of an endless signal), done as a real FFT of `n` samples
    whose product with `spectrum` is `r`'s (`r` is cut where it falls below `tolerance` times its peak, so the
    circular product wraps nothing larger), and the rest is what the record's two ends add: the starting states, and the
    forward pass's output cut at the end. That rest has rank at most 2 + the filter's order: it depends on the signal
    only through its first sample, its last, and the forward pass's final state, whose coefficients `basis`
    (orthonormal) spans; `correction` is the exact map minus the convolution on that basis, computed by scipy.
    `None` where a check of the result against scipy on random walks is off by more than `1000 * tolerance` of
    their size (the blocked filter is used then)."""
    sos = np.frombuffer(sos_bytes).reshape(-1, 6).copy()
    size = 4096
    while True:  # the impulse response, long enough to have died out
        impulse = np.zeros(size)
        impulse[0] = 1.0
        response = sp_signal.sosfilt(sos, impulse)
        if np.abs(response[-size // 4 :]).max() <= 1e-16 * np.abs(response).max() or size > 2**22:
            break
        size *= 2
    autocorrelation = sp_signal.fftconvolve(response, response[::-1])[size - 1 :]  # lags 0, 1, ...
    reach = int(np.flatnonzero(np.abs(autocorrelation) > tolerance * autocorrelation[0]).max()) + 1
    n = sp_fft.next_fast_len(length + reach, real=True)
    kept = min(n - length, len(autocorrelation) - 1)
    circular = np.zeros(n)
    circular[: kept + 1] = autocorrelation[: kept + 1]
    circular[n - kept :] = autocorrelation[kept:0:-1]
    spectrum = np.fft.rfft(circular).real  # `r` is even: its spectrum is real
    # the state after each sample of the impulse response, from each section's input and output (scipy's
    # transposed direct form II: z1 = b2 x - a2 y, z0 = b1 x - a1 y + z1 one sample earlier)
    section_input, states = np.zeros(length), []
    section_input[0] = 1.0
    for section in sos:
        output = sp_signal.sosfilt(section[None], section_input)
        later = section[2] * section_input - section[5] * output
        states += [section[1] * section_input - section[4] * output + np.concatenate([[0.0], later[:-1]]), later]
        section_input = output
    # the final state's coefficient on sample i is the state `length - 1 - i` samples into the impulse response
    ends = np.zeros((length, 2))
    ends[0, 0] = ends[-1, 1] = 1.0
    span = np.concatenate([ends, np.stack(states, axis=1)[::-1]], axis=1)
    basis, _ = np.linalg.qr(span)

    def convolve(x: np.ndarray) -> np.ndarray:
        return np.fft.irfft(np.fft.rfft(x, n, axis=0) * spectrum[:, None], n, axis=0)[:length]

    correction = sp_signal.sosfiltfilt(sos, basis, axis=0, padtype=None) - convolve(basis)
    check = np.random.default_rng(0).standard_normal((length, 2)).cumsum(axis=0)
    expected = sp_signal.sosfiltfilt(sos, check, axis=0, padtype=None)
    error = np.abs(convolve(check) + correction @ (basis.T @ check) - expected).max()
    if not error <= 1000 * tolerance * np.abs(check).max():  # an FFT rounds in proportion to its input
        return None
    return n, spectrum, basis, correction


@lru_cache(maxsize=16)
def _fft_operators_on(
    sos_bytes: bytes, length: int, device: torch.device, dtype: torch.dtype
) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    # float32 rounds at 6e-8: a cut at 1e-10 costs nothing; float64 keeps scipy's own digits
    operators = _fft_operators(sos_bytes, length, 1e-15 if dtype == torch.float64 else 1e-10)
    if operators is None:
        return None
    n, spectrum, basis, correction = operators
    as_tensor = partial(torch.as_tensor, dtype=dtype, device=device)
    # both as `(rank, length)` rows: `basis.T @ x.T` (2.4x faster than `x @ basis` on the 2-core CPU, a product
    # with only `rank` columns) and the correction's rows
    return (
        n,
        as_tensor(spectrum),
        as_tensor(np.ascontiguousarray(basis.T)),
        as_tensor(np.ascontiguousarray(correction.T)),
    )


def sosfiltfilt(signals: torch.Tensor, sos: np.ndarray, start: int = 0, count: int | None = None) -> torch.Tensor:
    """`scipy.signal.sosfiltfilt(sos, signals, axis=-1)[:, start : start + count]` (odd padding, default `padlen`)
    for `(rows, length)`. Up to `FFT_MAX_LENGTH` samples (with the padding) and from `FFT_MIN_ROWS` rows, as one real
    FFT and its inverse plus a correction of rank 2 + the filter's order (`_fft_operators`); otherwise as the blocked
    forward pass and the same on its reversed output (the signal goes into a buffer of whole blocks once, each
    reversal is one gather). The caller checks `length > filtfilt_padlen(sos)`."""
    padlen = filtfilt_padlen(sos)
    rows, length = signals.shape
    count = length - start if count is None else count
    extended = length + 2 * padlen
    key = np.ascontiguousarray(sos, dtype=np.float64).tobytes()
    use_fft = extended <= FFT_MAX_LENGTH and rows >= FFT_MIN_ROWS
    operators = _fft_operators_on(key, extended, signals.device, signals.dtype) if use_fft else None
    if operators is not None:
        n, spectrum, basis_rows, correction = operators
        buffer = signals.new_empty(rows, n)
        buffer[:, :padlen] = 2 * signals[:, :1] - signals[:, 1 : padlen + 1].flip(-1)
        buffer[:, padlen : padlen + length] = signals
        buffer[:, padlen + length : extended] = 2 * signals[:, -1:] - signals[:, -padlen - 1 : -1].flip(-1)
        buffer[:, extended:] = 0
        ends = (basis_rows @ buffer[:, :extended].T).T
        first = padlen + start
        filtered = torch.fft.irfft(torch.fft.rfft(buffer).mul_(spectrum), n)[:, first : first + count]
        return filtered.addmm_(ends, correction[:, first : first + count])
    padded = -(-(extended + 1) // FILTER_BLOCK) * FILTER_BLOCK  # at least one zero after the signal
    buffer = signals.new_empty(rows, padded)
    first, last = signals[:, :1], signals[:, -1:]
    buffer[:, :padlen] = 2 * first - signals[:, 1 : padlen + 1].flip(-1)
    buffer[:, padlen : padlen + length] = signals
    buffer[:, padlen + length : extended] = 2 * last - signals[:, -padlen - 1 : -1].flip(-1)
    buffer[:, extended:] = 0
    forward = sosfilt(buffer, sos)
    forward[:, extended] = 0
    backward = sosfilt(forward.index_select(1, _reversal(extended, padded, signals.device)), sos)
    # output sample t (of the unpadded signal) is backward[extended - 1 - padlen - t]
    last_index = extended - 1 - padlen - start
    return backward[:, last_index - count + 1 : last_index + 1].flip(-1)


def resample_and_filter(
    signals: torch.Tensor, sampling_rate: float, up: int, down: int, sos: np.ndarray | None, keep_mean: bool
) -> torch.Tensor:
    """`MeritFeatureExtractor._resample_and_filter` for a batch `(rows, length)` of leads recorded at one rate: each
    lead around its mean, extended by 1 s of odd reflection at both ends, resampled, band-passed, the extension cut;
    `keep_mean` adds the mean back (when no high-pass removes DC)."""
    rows, length = signals.shape
    mean = signals.mean(dim=-1, keepdim=True)
    pad = min(int(round(sampling_rate)), length - 1)
    extended = length + 2 * pad
    left, right = resample_padding(up, down, extended) if (up, down) != (1, 1) else (0, 0)
    buffer = signals.new_empty(rows, left + extended + right)  # the odd extension, inside resample_poly's zeros
    buffer[:, :left] = 0
    buffer[:, left : left + pad] = 2 * signals[:, :1] - mean - signals[:, 1 : pad + 1].flip(-1)
    torch.sub(signals, mean, out=buffer[:, left + pad : left + pad + length])
    buffer[:, left + pad + length : left + extended] = 2 * signals[:, -1:] - mean - signals[:, -pad - 1 : -1].flip(-1)
    buffer[:, left + extended :] = 0
    resampled = buffer if (up, down) == (1, 1) else resample_poly_padded(buffer, up, down, extended)
    start, count = int(round(pad * up / down)), -(-length * up // down)
    if sos is not None:
        resampled = sosfiltfilt(resampled, sos, start, count)
    else:
        resampled = resampled[:, start : start + count]
    return resampled + mean if keep_mean else resampled


def normalize(
    values: torch.Tensor,
    mask: torch.Tensor,
    normalization: str,
    padded: bool = True,
    present: torch.Tensor | None = None,
    eps: float = 1e-6,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`MeritFeatureExtractor._normalize` for a batch `(batch, num_leads, num_samples)` with `mask`
    `(batch, num_samples)` and `present` `(batch, num_leads)` bool (`None`: every lead recorded): mean and
    (population) std over the unpadded samples of the recorded leads, padding and missing leads set to zero. With
    `padded=False` and `present=None` (the caller knows both are all ones) two passes do. `out`: a tensor of
    `values`' shape to write the result into (and return), else a new one."""
    dims = (1, 2) if normalization == "zscore_record" else (2,)
    if not padded and present is None:
        if normalization == "none":
            return values if out is None else out.copy_(values)
        # two passes (mean, then the centred values' norm): 10x faster than `torch.std_mean` on the CPU, and as
        # exact; the norm reads the centred values without writing their squares (1.3x faster single-threaded)
        centred = torch.sub(values, values.mean(dim=dims, keepdim=True), out=out)
        size = values[0].numel() if len(dims) == 2 else values.shape[-1]
        std = torch.linalg.vector_norm(centred, dim=dims, keepdim=True).mul_(size**-0.5)
        return centred.div_(std.add_(eps))
    valid = mask[:, None, :].to(values.dtype)
    if present is not None:
        valid = valid * present[:, :, None].to(values.dtype)
    if normalization == "none":
        return torch.mul(values, valid, out=out)
    # a missing lead has no samples: its (zero) statistics are never used, the count only kept off zero
    count = valid.expand_as(values).sum(dim=dims, keepdim=True).clamp_min(1)
    mean = (values * valid).sum(dim=dims, keepdim=True) / count
    std = ((((values - mean) * valid) ** 2).sum(dim=dims, keepdim=True) / count).sqrt()
    return torch.mul((values - mean) / (std + eps), valid, out=out)


@contextmanager
def full_float32_matmuls():
    """float32 matrix products in full float32 inside the block, whatever the caller set: `TrainingArguments(tf32=True)`
    or `torch.backends.cuda.matmul.allow_tf32 = True`, usual for training on a GPU, would run the resampling and
    filtering products in TF32 (10-bit mantissas, about 1e-3 of a sample; "medium" may use bf16 on a CPU). On torch
    >= 2.9 through the per-backend `fp32_precision` ("ieee"): there `TrainingArguments(tf32=True)` sets
    `torch.backends.fp32_precision = "tf32"`, after which `torch.get_float32_matmul_precision()` raises (a mix of the
    legacy and new APIs). Older torch: `torch.set_float32_matmul_precision("highest")`. The caller's setting is
    restored after."""
    matmul = [torch.backends.cuda.matmul, getattr(torch.backends.mkldnn, "matmul", None)]
    backends = [backend for backend in matmul if backend is not None and hasattr(backend, "fp32_precision")]
    if not backends:
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(previous)
        return
    previous = [backend.fp32_precision for backend in backends]
    try:
        for backend in backends:
            backend.fp32_precision = "ieee"
        yield
    finally:
        for backend, precision in zip(backends, previous):
            backend.fp32_precision = precision


def extract_batch(
    feature_extractor: Any, prepared: list[dict[str, Any]], device: torch.device
) -> dict[str, torch.Tensor]:
    """`_extract_batch` with its matrix products in full float32 (`full_float32_matmuls`)."""
    with full_float32_matmuls():
        return _extract_batch(feature_extractor, prepared, device)


def _extract_batch(
    feature_extractor: Any, prepared: list[dict[str, Any]], device: torch.device
) -> dict[str, torch.Tensor]:
    """What `MeritFeatureExtractor.__call__` returns for what it was given, as tensors on `device`: `ecg_values`
    `(num_windows, num_leads, num_samples)` float32, `ecg_attention_mask` `(num_windows, num_samples)` int64,
    `lead_mask` `(num_windows, num_leads)` bool and `record_index` `(num_windows,)` int64 (one window per record
    unless `window="sliding"`). `prepared` is one entry per record from the feature extractor's
    `_prepare_for_device`, which validated it, in order, with its own code (so the first bad record raises the same
    error as on the scipy path, and random crops draw the same numbers) and placed its windows (`windows`: the sample
    positions of each, `masks`); the DSP runs here once per group of records with one
    rate and length. `feature_extractor` is the `MeritFeatureExtractor` (its filter, leads, window length and
    normalisation are read; it is not imported here, so that this module depends on nothing of the package)."""
    fe = feature_extractor
    sos = fe._band_pass_sos()
    groups: dict[tuple[int, int, int], list[int]] = {}
    rates: dict[tuple[int, int, int], float] = {}
    signals, windows, masks, presents, rows = [], [], [], [], []
    num_windows = 0
    for index, record in enumerate(prepared):
        signal, rate, up, down = record["signal"], record["sampling_rate"], record["up"], record["down"]
        length = signal.shape[-1]
        windows.extend(record["windows"])
        masks.extend(record["masks"])
        rows.append(np.arange(num_windows, num_windows + len(record["windows"])))
        num_windows += len(record["windows"])
        signals.append(signal)
        presents.append(record["present"])
        groups.setdefault((up, down, length), []).append(index)
        rates[(up, down, length)] = rate
    window_index = None  # the windows' sample positions, built only where a window is not a plain slice
    mask = torch.as_tensor(np.stack(masks), device=device)
    record_index = np.repeat(np.arange(len(prepared)), [len(record_rows) for record_rows in rows])
    present = torch.as_tensor(np.stack(presents), device=device)
    num_leads = len(fe.lead_names)
    values = torch.empty((num_windows, num_leads, fe.num_samples), dtype=torch.float32, device=device)
    chunk = CPU_RECORDS_PER_CHUNK if device.type == "cpu" else len(prepared)
    for (up, down, length), group in groups.items():
        for start in range(0, len(group), chunk):
            members = group[start : start + chunk]
            stack = prepared[members[0]]["stack"][0]
            if all(prepared[index]["stack"][0] is stack and prepared[index]["stack"][1] == slot
                   for slot, index in enumerate(members)):  # fmt: skip
                stacked = stack[: len(members)]  # the members fill one array in order: read it in place
            else:
                stacked = np.stack([signals[index] for index in members])  # (members, leads, length) float32
            batch = torch.from_numpy(stacked).to(device).reshape(-1, length)
            keep_mean = fe.highpass_hz is None
            filtered = resample_and_filter(batch, rates[(up, down, length)], up, down, sos, keep_mean)
            filtered = filtered.reshape(len(members), num_leads, -1)
            if keep_mean and fe.normalization != "zscore_lead":  # the leads' offsets, taken out in float64, back
                offsets = np.stack([prepared[index]["offset"] for index in members])
                if fe.normalization == "zscore_record":  # less what a record's z-score removes anyway
                    recorded = np.stack([presents[index] for index in members])
                    offsets -= (offsets * recorded).sum(axis=1, keepdims=True) / recorded.sum(axis=1, keepdims=True)
                filtered += torch.as_tensor(offsets, dtype=filtered.dtype, device=device)[:, :, None]
            member_rows = np.concatenate([rows[index] for index in members])
            at = torch.as_tensor(member_rows, device=device)
            if len(member_rows) != len(members):  # sliding windows: each window reads its own record
                local = np.repeat(np.arange(len(members)), [len(rows[index]) for index in members])
                filtered = filtered.index_select(0, torch.as_tensor(local, device=device))
            starts = [int(windows[row][0]) for row in member_rows]
            if all(
                windows[row][-1] - start == fe.num_samples - 1 and masks[row].all()
                for row, start in zip(member_rows, starts)
            ):
                # every window a run of samples (no padding): one view when they start together, else slices
                windowed = (
                    filtered[:, :, starts[0] : starts[0] + fe.num_samples]
                    if len(set(starts)) == 1
                    else torch.stack(
                        [filtered[i, :, start : start + fe.num_samples] for i, start in enumerate(starts)]
                    )
                )
            else:
                if window_index is None:
                    window_index = torch.as_tensor(np.stack(windows), device=device)
                windowed = filtered.gather(2, window_index[at][:, None, :].expand(-1, num_leads, -1))
            padded = not all(masks[row].all() for row in member_rows)
            member_present = present[torch.as_tensor(record_index[member_rows], device=device)]
            all_present = all(presents[index].all() for index in members)
            first_row = int(member_rows[0])
            in_order = bool((member_rows == np.arange(first_row, first_row + len(member_rows))).all())
            target = values[first_row : first_row + len(member_rows)] if in_order else None  # written in place
            normalized = normalize(
                windowed, mask[at], fe.normalization, padded, None if all_present else member_present, out=target
            )
            if target is None:
                values[at] = normalized
    record_index = torch.as_tensor(record_index, device=device)
    return {
        "ecg_values": values,
        "ecg_attention_mask": mask,
        "lead_mask": present[record_index],
        "record_index": record_index,
    }


__all__ = ["extract_batch", "normalize", "resample_and_filter", "resample_poly", "screen_records", "sosfiltfilt"]

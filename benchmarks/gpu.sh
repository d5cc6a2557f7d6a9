#!/usr/bin/env bash
# Every GPU measurement of the project in one short run (about 10 minutes on one H100/H200),
# for a machine with no network where only a small working tree travels:
#
#   bash benchmarks/gpu.sh --prepare        # here: the SmolLM2 tokenizer + Dolly into .gpu/ (gitignored:
#                                           # never commit it; the device call carries it, carry=[".gpu"])
#   bash benchmarks/gpu.sh OUT_DIR          # there: writes OUT_DIR/*.md and OUT_DIR/gpu.log
#
# Models are random-init of the paper's shapes (GPT-2 1.5B teacher, GPT-2 124M student) with
# the SmolLM2 tokenizer (vocabulary 49,152), so no weights travel. What it runs, each step with
# its own time limit so that one failure or overrun cannot cost the others:
#   1. benchmarks/throughput.py --preset gpu: KD step, 16 x 512, bf16 (hand-written, srd, compiled,
#      compiled keeping float32 log-probs instead of bf16 logits, from the teacher store's rows, TRL)
#   2. benchmarks/generation.py --preset gpu: decode loop and static-cache `generate` (compiled,
#      CUDA graphs) vs plain `generate`, sampling up to 256 new tokens, the random-init model's
#      EOS logit raised so that answers end after the Dolly references' mean length (geometric)
#   3. srd reflect with the 124M student over the first $REFLECT_ROWS Dolly training prompts
#      (greedy, 256 new tokens, the paper's reflection settings): wall time of the whole step
#   4. benchmarks/throughput.py --preset gpu --profile (where a step's kernel time goes),
#      --loss-only (forward KL, hand-written backward vs autograd; CE + KL separate vs fused; bf16
#      logits kept vs float32 log-probs) and generation.py --profile --phases (hf and loop: host vs
#      device time; the loop's decode steps against the weight-reading limit)
#   5. benchmarks/onpolicy.py --preset gpu: GKD sampling, one batch per micro-batch vs one stream per step;
#      benchmarks/sampling.py: one token per row, counter-based sample_rows vs torch.multinomial
#   6. benchmarks/teacher_store_rows.py --device cuda: the teacher store's build with each row alone
#      (how runs build) against batches of 4 (time, and whether shared rows differ), on the random-init
#      1.5B teacher (GPT-2 has no rotary frequencies: its two bf16 casts store the same rows)
# Environment: SRD_GPU_SMOKE=1 shrinks everything to seconds (to check the script on a CPU);
# SRD_GPU_STEPS="1 2" runs only those steps (the limits below add up to 1,240 s, more than one
# 600-second device call: split the run over two calls, "1 2" (540 s) then "3 4 5 6" (700 s: drop
# 4 if the call's limit is 600 s)). A
# benchmark stopped by its limit (SIGTERM) still writes the record of what it finished.
set -u
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
    set -e
    mkdir -p .gpu/data/dolly
    cp ../shared/data/dolly/*.jsonl .gpu/data/dolly/  # train, dev (reflection reads it), eval
    python - <<'EOF'
from srd.models import load_tokenizer
from srd.models.load import resolve_model_path
from transformers import AutoConfig

tok = load_tokenizer("smollm2-135m-instruct")
tok.save_pretrained(".gpu/tok")
# a config.json marks the folder as a model folder for srd's loader; no weights travel
AutoConfig.from_pretrained(resolve_model_path("smollm2-135m-instruct")).save_pretrained(".gpu/tok")
EOF
    du -sh .gpu
    exit 0
fi

OUT=${1:-benchmarks/results/gpu-$(date +%F)}
mkdir -p "$OUT"
export SRD_DATA_DIR=${SRD_DATA_DIR:-$PWD/.gpu/data} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
TOK=${SRD_GPU_TOKENIZER:-.gpu/tok}
PY=${PYTHON:-python3}
if [ "${SRD_GPU_SMOKE:-0}" = 1 ]; then
    T="random:gpt2-tiny:$TOK" S="random:gpt2-tiny:$TOK"
    TP_ARGS=(--steps 1 --batch 2 --seq 64 --impls naive srd-keep srd-keep-cache)
    PROF_ARGS=(--steps 1 --batch 2 --seq 64 --impls naive srd-keep)
    GEN_ARGS=(--limit 4 --batch-sizes 2 --max-new-tokens 4 --backends hf loop static)
    GPROF_ARGS=(--limit 4 --batch-sizes 2 --max-new-tokens 4)
    OP_ARGS=(--micro-batches 2 --batch 2 --max-new-tokens 4 --repeats 1)
    SAMPLE_ARGS=(--rows 2 --vocab 300 --repeats 1)
    REFLECT_ROWS=4 GEN_BS=2 NEW=4 STORE_ROWS=6 STORE_K=8
else
    T="random:gpt2-xl:$TOK" S="random:gpt2:$TOK"
    TP_ARGS=(--timeout 80 --impls naive srd srd-keep srd-compile srd-keep-compile srd-keep-compile-lp32 srd-keep-cache trl)
    PROF_ARGS=(--steps 3 --timeout 60 --impls naive srd-keep srd-keep-compile)
    GEN_ARGS=(--limit 512 --batch-sizes 256 --backends hf loop static)
    GPROF_ARGS=(--limit 256 --batch-sizes 256 --max-new-tokens 64)
    OP_ARGS=()
    SAMPLE_ARGS=(--device cuda --rows 16 64 256)
    REFLECT_ROWS=${REFLECT_ROWS:-1024} GEN_BS=256 NEW=256 STORE_ROWS=96 STORE_K=64
fi
STEPS=" ${SRD_GPU_STEPS:-1 2 3 4 5 6} "
want() { [[ "$STEPS" == *" $1 "* ]]; }
exec > >(tee -a "$OUT/gpu.log") 2>&1
echo "== $(date -u) gpu.sh into $OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)"

if want 1; then
echo "== 1. throughput"
timeout -k 10 370 $PY benchmarks/throughput.py --preset gpu --teacher "$T" --student "$S" "${TP_ARGS[@]}" \
    --record "$OUT/throughput.md" || echo "throughput: exit $?"
fi

if want 2; then
echo "== 2. generation"
timeout -k 10 170 $PY benchmarks/generation.py --preset gpu --model "$S" "${GEN_ARGS[@]}" \
    --record "$OUT/generation.md" || echo "generation: exit $?"
fi

if want 3; then
echo "== 3. reflection over $REFLECT_ROWS Dolly prompts"
RUN=$(mktemp -d "${TMPDIR:-/tmp}/srd-gpu-reflect.XXXXXX")  # a new folder of its own (nothing else removed)
CMD=(-m srd.cli reflect --no-progress configs/gpt2-dolly-srd.yaml "model.teacher=$T" "model.student=$S"
     "data.train_limit=$REFLECT_ROWS" "generation.batch_size=$GEN_BS" "generation.max_new_tokens=$NEW"
     "output_dir=$RUN" name=reflect)
t0=$(date +%s.%N)
timeout -k 10 120 $PY "${CMD[@]}" || echo "reflect: exit $?"
t1=$(date +%s.%N)
$PY - "$RUN" "$OUT/reflection.md" "$t0" "$t1" "$REFLECT_ROWS" "${CMD[@]}" <<'EOF'
import json, sys
from pathlib import Path

sys.path.insert(0, ".")
from benchmarks.common import header, save_record

run, record, t0, t1, rows = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
sys.argv = sys.argv[6:]  # the record names the reflect command
outs = sorted(run.rglob("outputs.rank*.jsonl"))
done = sum(len(p.read_text().splitlines()) for p in outs)
summary = next(iter(run.rglob("reflection/summary.json")), None)
meta = json.loads(summary.read_text()) if summary else {}
wall = t1 - t0
own = meta.get("wall_time_s")
rate = done / (own or wall)
lines = header("Reflection on one GPU, random-init GPT-2 124M student") + [
    f"`srd reflect configs/gpt2-dolly-srd.yaml` over the first {rows} Dolly training prompts (greedy, at most "
    "256 new tokens, no-repeat 6-grams, ROUGE-L + cross-entropy, rank fusion); a random-init student never "
    "stops early, so every answer is 256 tokens long (an upper bound on a trained student's cost).",
    "",
    f"- rows answered and scored: {done} of {rows}{'' if summary else ' (did not finish inside its time limit)'}",
    f"- wall time of the command (model build, generation, scoring, ranking): {wall:.1f} s",
    f"- reflection's own wall time (summary.json): {meta.get('wall_time_s', 'n/a')} s",
    f"- rows per second: {rate:.1f} (over {'reflection' if own else 'the command'}'s wall time); the 11,435-row "
    f"Dolly split at this rate: {11435 / max(rate, 1e-9):.0f} s",
]
save_record("\n".join(lines) + "\n", record, "gpu", "reflection")
EOF
fi

if want 4; then
echo "== 4. profile and loss"
timeout -k 10 180 $PY benchmarks/throughput.py --preset gpu --teacher "$T" --student "$S" --profile "${PROF_ARGS[@]}" \
    --record "$OUT/profile.md" || echo "profile: exit $?"
timeout -k 10 60 $PY benchmarks/throughput.py --preset gpu --loss-only --record "$OUT/loss.md" || echo "loss: exit $?"
timeout -k 10 90 $PY benchmarks/generation.py --preset gpu --model "$S" "${GPROF_ARGS[@]}" --backends hf loop --profile --phases \
    --record "$OUT/generation-profile.md" || echo "generation profile: exit $?"
fi

if want 5; then
echo "== 5. on-policy sampling"
timeout -k 10 90 $PY benchmarks/onpolicy.py --preset gpu --model "$S" ${OP_ARGS[@]+"${OP_ARGS[@]}"} \
    --record "$OUT/onpolicy.md" || echo "onpolicy: exit $?"
timeout -k 10 40 $PY benchmarks/sampling.py "${SAMPLE_ARGS[@]}" --record "$OUT/sampling.md" || echo "sampling: exit $?"
fi
if want 6; then
echo "== 6. teacher store rows: each alone against batches"
DEV=cuda
[ "${SRD_GPU_SMOKE:-0}" = 1 ] && DEV=cpu
timeout -k 10 120 $PY benchmarks/teacher_store_rows.py --teacher "$T" --device "$DEV" --rows "$STORE_ROWS" --k "$STORE_K" \
    --record "$OUT/teacher-store-rows.md" || echo "teacher store rows: exit $?"
fi
echo "== $(date -u) done"

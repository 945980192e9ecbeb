#!/usr/bin/env bash
# The whole xGen-MM recipe in miniature, on a CPU, in one command (~28 minutes on 2 cores):
#
#   bash toy/run_toy.sh [OUT_DIR] [--quick]    # OUT_DIR defaults to out/toy; --quick: a small world, a few steps
#
# toy world -> toy vision encoder (stands in for SigLIP's pretraining) -> pretraining (captions + interleaved
# documents) -> SFT (LLaVA-style instructions) -> interleaved multi-image SFT -> DPO (LoRA, VLFeedback) ->
# safety tuning (LoRA, VLGuard), with eval.py after every stage and linear probes of the vision features after
# pretraining and at the end. The commands are the ones a user runs at scale, with toy-sized steps. Prints,
# and writes to OUT_DIR, results.md (the tables, probes, time per stage, curves.png, held-out examples with
# every stage's answers; toy/report.py) and results.json ({stage: {metric: fraction}}).
# Steps and learning rates: toy/recipe.sh; the environment overrides them, e.g. PRETRAIN_STEPS=600; PYTHON
# picks the interpreter (default: python). Paths are relative to the repository root (the folder above toy/).
set -euo pipefail
cd "$(dirname "$0")/.."  # the repository root

OUT=out/toy QUICK=0
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1 ;;
    -h|--help) sed -n '2,13p' toy/run_toy.sh | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "run_toy.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
    *) OUT=$arg ;;
  esac
done

source toy/recipe.sh  # SIZE, the steps, BATCH, EVAL_LIMIT and the learning rates
DATA=$OUT/data
mkdir -p "$OUT/eval" "$OUT/probes"
: > "$OUT/times.tsv"

timed() {  # timed NAME COMMAND...: run it, add its wall time to OUT/times.tsv
  local name=$1 start=$SECONDS
  shift
  echo "== $name: $*"
  "$@"
  printf '%s\t%s\n' "$name" $((SECONDS - start)) >> "$OUT/times.tsv"
}

evaluate() {  # evaluate STAGE [eval.py options]
  local stage=$1
  shift
  timed eval "${PYTHON:-python}" eval.py --checkpoint "$OUT/$stage" --data "$DATA" --limit "$EVAL_LIMIT" \
    --system "$SYSTEM" --name "$stage" --json "$OUT/eval/$stage.json" \
    --predictions "$OUT/eval/$stage.predictions.jsonl" "$@"
}
# few-shot naming is what interleaved pretraining teaches: scored after pretraining, like the paper's base model
LATER=(--splits captions vqa counting ocr ocr_small grounding multi_image pope safety arithmetic)

train() {  # train STAGE INIT STEPS [train.py options]
  local stage=$1 init=$2 steps=$3
  shift 3
  timed "$stage" "${PYTHON:-python}" train.py --stage "$stage" --init "$OUT/$init" \
    --data "$DATA/mixtures/$stage.json" --out-dir "$OUT/$stage" --max-steps "$steps" --save-every "$steps" --keep 1 \
    --batch-size "$BATCH" --length-groups 16 --system "$SYSTEM" "$@"
}

probe() {  # probe STAGE: fresh linear heads on the checkpoint's frozen ViT features and resampler latents
  timed probe "${PYTHON:-python}" -m toy.toyvision --probe "$OUT/$1" --data "$DATA" --steps "$PROBE_STEPS" \
    --json "$OUT/probes/$1.json"
}

[[ -f $DATA/world.json ]] || timed world "${PYTHON:-python}" -m toy.toyworld --out "$DATA" --size $SIZE
timed vision "${PYTHON:-python}" -m toy.toyvision --data "$DATA" --out "$OUT/vision" --steps "$VISION_STEPS"

train pretrain vision "$PRETRAIN_STEPS" --lr "$PRETRAIN_LR"
evaluate pretrain --prompt plain
probe pretrain

train sft pretrain "$SFT_STEPS" --lr "$SFT_LR"
evaluate sft "${LATER[@]}"

train interleave sft "$INTERLEAVE_STEPS" --lr "$INTERLEAVE_LR"
evaluate interleave "${LATER[@]}"

timed dpo "${PYTHON:-python}" dpo.py --init "$OUT/interleave" --data "$DATA/mixtures/dpo.json" --out-dir "$OUT/dpo" \
  --max-steps "$DPO_STEPS" --save-every "$DPO_STEPS" --keep 1 --batch-size 4 --lr "$DPO_LR" \
  --lora-r "$DPO_LORA_R" --lora-alpha "$DPO_LORA_ALPHA" --rpo-alpha "$DPO_RPO" --system "$SYSTEM"
evaluate dpo "${LATER[@]}"

train safety dpo "$SAFETY_STEPS" --lr "$SAFETY_LR"
evaluate safety "${LATER[@]}"
probe safety

"${PYTHON:-python}" -m toy.report "$OUT"

#!/usr/bin/env bash
# The paper's ablations in miniature, on the checkpoints of a finished `bash toy/run_toy.sh RUN_DIR`:
#
#   bash toy/ablations.sh [RUN_DIR] [NAME...] [--quick]    # RUN_DIR defaults to out/toy; NAME: resolution,
#                                                           # instruction, text, scale (default: all four)
#
# resolution   SFT from RUN/pretrain with each image strategy (any-resolution, any-resolution with fixed
#              sampling, fixed resolution): reading small text (ocr_small) against normal text (ocr)
# instruction  SFT with an instruction-aware resampler (the question joins what the latents read) vs plain
# text         SFT with diverse text-only data (arithmetic, word games, chat) vs conversational chat only:
#              text-only arithmetic questions never seen in training
# scale        pretraining for 1/4, 1/2 and all of toy/run_toy.sh's pretraining steps from RUN/vision (tokens
#              seen: the toy's "data scale"), scored with plain prompts after pretraining
#
# Every SFT variant starts from the same pretrained checkpoint and runs the same steps (ABLATION_STEPS, by
# default toy/run_toy.sh's SFT steps; both read toy/recipe.sh); the plain any-resolution run, shared by the
# first three, is RUN/sft itself when it has a checkpoint of that many steps (the same command, so the same
# weights). Writes RUN/ablations/<variant>/ and prints (and saves as RUN/ablations/ablations.md) one table
# per ablation. PYTHON picks the interpreter (default: python); paths are relative to the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."  # the repository root

RUN=out/toy QUICK=0 NAMES=()
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1 ;;
    -h|--help) sed -n '2,19p' toy/ablations.sh | sed 's/^# \{0,1\}//'; exit 0 ;;
    resolution|instruction|text|scale) NAMES+=("$arg") ;;
    -*) echo "ablations.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
    *) RUN=$arg ;;
  esac
done
[[ ${#NAMES[@]} -gt 0 ]] || NAMES=(resolution instruction text scale)
source toy/recipe.sh  # toy/run_toy.sh's steps, batch and learning rates
: "${ABLATION_STEPS:=$SFT_STEPS}"
for need in "$RUN/pretrain" "$RUN/vision/config.json" "$RUN/data/world.json"; do
  [[ -e $need ]] || { echo "ablations.sh: $need not found: run \`bash toy/run_toy.sh $RUN\` first" >&2; exit 2; }
done
DATA=$RUN/data OUT=$RUN/ablations
mkdir -p "$OUT"

sft() {  # sft VARIANT MIXTURE [train.py options]: SFT from RUN/pretrain, then eval.py on the reading/VQA splits
  local name=$1 mixture=$2 ckpt=$OUT/$1
  shift 2
  # toy/run_toy.sh's own SFT is the plain variant when it ran as many steps
  [[ $name == anyres && -d $RUN/sft/ckpt-$(printf %07d "$ABLATION_STEPS") ]] && ckpt=$RUN/sft
  [[ -d $ckpt ]] && ls "$ckpt"/ckpt-* >/dev/null 2>&1 || \
    "${PYTHON:-python}" train.py --stage sft --init "$RUN/pretrain" --data "$DATA/mixtures/$mixture.json" \
      --out-dir "$ckpt" --max-steps "$ABLATION_STEPS" --save-every "$ABLATION_STEPS" --keep 1 \
      --batch-size "$BATCH" --length-groups 16 --lr "$SFT_LR" --system "$SYSTEM" "$@"
  "${PYTHON:-python}" eval.py --checkpoint "$ckpt" --data "$DATA" --limit "$EVAL_LIMIT" --name "$name" --system "$SYSTEM" \
    --splits vqa ocr ocr_small grounding arithmetic --json "$OUT/eval/$name.json" > /dev/null
}

table() {  # table TITLE VARIANT...: one markdown table from the variants' eval JSON
  local title=$1
  shift
  "${PYTHON:-python}" - "$OUT" "$title" "$@" <<'EOF' | tee -a "$OUT/ablations.md"
import json, sys
from pathlib import Path
from toy import tasks
out, title, names = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
rows = [(n, json.loads((out / "eval" / f"{n}.json").read_text())["metrics"]) for n in names]
print(f"\n### {title}\n\n" + tasks.table(rows))
EOF
}

: > "$OUT/ablations.md"
for name in "${NAMES[@]}"; do
  case $name in
    resolution)
      sft anyres sft
      sft anyres-fixed sft --strategy anyres-fixed
      sft fixed sft --strategy fixed
      table "image strategy (SFT $ABLATION_STEPS steps from the same pretrained checkpoint)" anyres anyres-fixed fixed ;;
    instruction)
      sft anyres sft
      sft instruction-aware sft --instruction-aware
      table "instruction-aware resampler (SFT $ABLATION_STEPS steps)" anyres instruction-aware ;;
    text)
      sft anyres sft
      sft conversational sft_conversational
      table "text-only SFT data: diverse vs conversational (SFT $ABLATION_STEPS steps)" anyres conversational ;;
    scale)
      for frac in 4 2 1; do
        steps=$((PRETRAIN_STEPS / frac)) v=pretrain-$((PRETRAIN_STEPS / frac)) ckpt=$OUT/pretrain-$((PRETRAIN_STEPS / frac))
        [[ $frac == 1 ]] && ckpt=$RUN/pretrain  # toy/run_toy.sh's own pretraining is the full size
        [[ -d $ckpt ]] && ls "$ckpt"/ckpt-* >/dev/null 2>&1 || \
          "${PYTHON:-python}" train.py --stage pretrain --init "$RUN/vision" --data "$DATA/mixtures/pretrain.json" \
            --out-dir "$ckpt" --max-steps "$steps" --save-every "$steps" --keep 1 --batch-size "$BATCH" \
            --length-groups 16 --lr "$PRETRAIN_LR"
        "${PYTHON:-python}" eval.py --checkpoint "$ckpt" --data "$DATA" --limit "$EVAL_LIMIT" --name "$v" \
          --prompt plain --splits captions vqa ocr grounding fewshot --json "$OUT/eval/$v.json" > /dev/null
      done
      table "pretraining scale (steps x $BATCH samples; plain prompts after pretraining)" \
        "pretrain-$((PRETRAIN_STEPS / 4))" "pretrain-$((PRETRAIN_STEPS / 2))" "pretrain-$PRETRAIN_STEPS" ;;
  esac
done

# The toy recipe's steps, batch and learning rates, in one place: toy/run_toy.sh and toy/ablations.sh source
# it (with QUICK set), so an ablation's plain variant is the recipe's own run. The environment overrides any
# of them, e.g. SFT_STEPS=600 bash toy/run_toy.sh.
if [[ $QUICK == 1 ]]; then  # the pipeline end to end in a few minutes (the tests run this); numbers mean nothing
  SIZE=small; : "${VISION_STEPS:=4}" "${PRETRAIN_STEPS:=4}" "${SFT_STEPS:=4}" "${INTERLEAVE_STEPS:=3}"
  : "${DPO_STEPS:=3}" "${SAFETY_STEPS:=3}" "${EVAL_LIMIT:=4}" "${BATCH:=4}" "${PROBE_STEPS:=4}"
else
  SIZE=medium; : "${VISION_STEPS:=1000}" "${PRETRAIN_STEPS:=1400}" "${SFT_STEPS:=4400}" "${INTERLEAVE_STEPS:=500}"
  : "${DPO_STEPS:=150}" "${SAFETY_STEPS:=400}" "${EVAL_LIMIT:=0}" "${BATCH:=8}" "${PROBE_STEPS:=200}"
fi
# SFT 4,400 steps: at 2,200 the model looked a shape up only when it was alone in the picture (existence at
# chance, POPE 48%); twice the steps reached 67% and 70%
# SFT at a third of pretraining's rate: at 1e-3 it undid what pretraining taught (captions 95% -> 58%)
: "${PRETRAIN_LR:=1e-3}" "${SFT_LR:=3e-4}" "${INTERLEAVE_LR:=2e-4}" "${DPO_LR:=1e-4}" "${SAFETY_LR:=1e-3}"
# DPO's adapters in proportion to the decoder: rank 8 trains ~4% of its weights (the paper's rank 64: 2.6% of
# Phi-3's); the train.py default (rank 64 on a width-256 decoder) would train a quarter of them
: "${DPO_LORA_R:=8}" "${DPO_LORA_ALPHA:=16}" "${DPO_RPO:=1.0}"
# chats without a system prompt: the release's (31 tokens) would be a quarter of every toy SFT sample;
# eval.py and sample.py ask with --system "" to match
SYSTEM=${SYSTEM-}

"""
Direct Preference Optimization (Rafailov et al., arXiv 2305.18290) with LoRA, xGen-MM's post-training step
for helpfulness and visual faithfulness (paper section 4.3: VLFeedback, beta 0.1, rank-64 LoRA, ~2.6% of
the LLM's weights).

    python dpo.py --init out/interleave                             # the toy world's preference mixture, CPU
    python dpo.py --init out/interleave --precompute-ref            # reference log-probs computed once, cached
    python dpo.py --init path/to/xgenmm-sft --data vlfeedback.jsonl --device cuda --batch-size 4 --grad-accum 8
    torchrun --nproc_per_node=8 dpo.py --init path/to/xgenmm-sft --data vlfeedback.jsonl --device cuda

For a prompt x with a chosen answer y_w and a rejected one y_l, with log-likelihoods summed over the answer
tokens only (images included in the prompt), the policy pi and the frozen reference pi_ref:

    h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]
    sigmoid loss: -log sigmoid(beta h)   (label smoothing e: -(1-e) log sigmoid(beta h) - e log sigmoid(-beta h))
    IPO loss:     (h - 1 / (2 beta))^2
    RPO (--rpo-alpha a, Pang et al., arXiv 2404.19733): + a * NLL(y_w|x) / |y_w|. DPO alone can lower the
    chosen answer's likelihood too, when chosen and rejected differ in a few tokens (Smaug, arXiv 2402.13228).

1. The reference is the same model with its adapters switched off (lora.disabled) under no_grad: no second
   copy of the weights. Or --precompute-ref scores every pair once before training and caches the result
   (OUT/ref_logps.safetensors), so each step runs only the policy.
2. Chosen and rejected go through the model in one batch (collate stacks them: all chosen rows, then all
   rejected rows), so the prompt's images are encoded in the same forward.
3. Everything else is train.py's: arguments, data mixtures, DDP / FSDP2, checkpoints (the merged model in
   the official layout, the adapters in trainer/), exact --resume, metrics.jsonl. Logged per step: loss,
   rewards beta * (log pi - log pi_ref) of chosen and rejected, their margin, and the accuracy (margin > 0).
"""
import argparse
import math

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import data
import lora
import train
from distributed import all_sum, barrier, print0, sync_grads
from errors import fail

# -----------------------------------------------------------------------------
# arguments


def build_parser():
    p = train.build_parser(__doc__, stages=None)
    g = p.add_argument_group("DPO")
    g.add_argument("--beta", type=float, default=0.1, help="strength of the pull toward the reference (paper: 0.1)")
    g.add_argument("--loss", default="sigmoid", choices=["sigmoid", "ipo"], help="DPO (sigmoid) or IPO")
    g.add_argument("--label-smoothing", type=float, default=0.0, help="conservative DPO: assumed label noise")
    g.add_argument("--rpo-alpha", type=float, default=0.0, metavar="A", help="add A x the chosen answer's mean "
                   "negative log-likelihood per token (RPO), which keeps the chosen answers likely")
    g.add_argument("--precompute-ref", action=argparse.BooleanOptionalAction, default=False,
                   help="score the reference once before training and cache it, instead of every step")
    p.set_defaults(stage="dpo")
    return p

# -----------------------------------------------------------------------------
# the loss


def dpo_loss(h, args):
    """Per-pair loss from h = policy log-ratio of chosen minus that of rejected."""
    if args.loss == "ipo":
        return (h - 1 / (2 * args.beta)) ** 2
    e = args.label_smoothing
    return -(1 - e) * F.logsigmoid(args.beta * h) - e * F.logsigmoid(-args.beta * h)


def logps(model, b):
    """(2B,) summed log-likelihood of each row's supervised tokens (the answers)."""
    return -model(b["input_ids"], b["images"], b["attention_mask"], labels=b["labels"], reduction="sequence")


def reference(run, b, table):
    """The reference log-likelihoods of a batch: from the cache, or the model with its adapters off."""
    if table is not None:
        rows = torch.stack([table[src][i] for src, i in b["keys"]])  # (B, 2): chosen, rejected
        return torch.cat((rows[:, 0], rows[:, 1])).to(run.device)
    with torch.no_grad(), lora.disabled(run.m), train.autocast(run.device):
        return logps(run.m, b).float()


def dpo_step(run, micro, table=None):
    """One optimiser step on the preference micro-batches; the loss is averaged over the step's pairs.
    Returns device tensors (read at log time, as train.train_step's)."""
    n_pairs = all_sum(torch.tensor(float(sum(len(b["keys"]) for b in micro)), device=run.device))
    stats = torch.zeros(5, device=run.device)  # loss, chosen reward, rejected reward, correct, chosen NLL
    for k, b in enumerate(micro):
        if train.empty(b, run.world):
            continue
        ref = reference(run, b, table)
        with sync_grads(run.wrapped, k == len(micro) - 1), train.autocast(run.device):
            policy = logps(run.wrapped, b).float()
        B = len(policy) // 2
        ratio = policy - ref
        h = ratio[:B] - ratio[B:]
        nll = -policy[:B] / (b["labels"][:B] != -100).sum(-1).clamp(min=1)  # per token of the chosen answer
        losses = dpo_loss(h, run.args) + run.args.rpo_alpha * nll
        (losses.sum() * run.world / n_pairs.clamp(min=1)).backward()
        r = run.args.beta * ratio.detach()
        stats += torch.stack([losses.detach().sum(), r[:B].sum(), r[B:].sum(), (h > 0).float().sum(),
                              nll.detach().sum()])
    loss, chosen, rejected, correct, nll = all_sum(stats) / n_pairs.clamp(min=1)
    return {"loss": loss, "grad_norm": train.optimizer_step(run, loss), "reward_chosen": chosen,
            "reward_rejected": rejected, "margin": chosen - rejected, "accuracy": correct, "nll_chosen": nll,
            "pairs": n_pairs}

# -----------------------------------------------------------------------------
# the reference, precomputed


@torch.no_grad()
def precompute(run, sources):
    """{source index: (len, 2) reference log-likelihoods of (chosen, rejected)}, NaN for unusable pairs.

    Each rank scores a share of the pairs; the shares are summed across ranks; the result is cached in the
    run directory, so a resumed run does not score again.
    """
    path = run.run_dir / "ref_logps.safetensors"
    if path.is_file():
        cached = load_file(path)
        return {int(k): v for k, v in cached.items()}
    encoder = data.Encoder(run.m.tokenizer, run.m.config, run.args.max_len, run.args.system)
    spare = encoder({"turns": [("user", "hi")], "chosen": "a", "rejected": "b", "images": [], "where": "spare"})
    table, B = {}, run.args.batch_size
    for si, (src, _) in enumerate(sources):
        out = torch.zeros(len(src), 3, device=run.device)  # chosen, rejected, usable
        mine = list(range(run.rank, len(src), run.world))
        # the same number of forwards on every rank (FSDP2 all-gathers in each): the shares are padded, and a
        # batch with no usable pair scores a spare one instead, thrown away
        for start in range(0, math.ceil(len(src) / run.world / B) * B, B):
            samples, idx = [], []
            for i in mine[start: start + B]:
                try:
                    samples.append(encoder(src.record(i)))
                    idx.append(i)
                except data.BadSample:
                    pass  # counted when training meets it
            b = data.collate(samples or [spare], run.m.tokenizer.pad_id)
            ref = reference(run, b | {"keys": idx}, None)
            if idx:
                out[idx] = torch.stack((ref[: len(idx)], ref[len(idx):], torch.ones_like(ref[: len(idx)])), 1)
        out = all_sum(out)
        table[si] = torch.where(out[:, 2:] > 0, out[:, :2], torch.full_like(out[:, :2], float("nan"))).cpu()
    if run.rank == 0:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        save_file({str(k): v.contiguous() for k, v in table.items()}, path)
    barrier()
    return table


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.init is None:
        fail("dpo.py", "--init is required: DPO starts from an instruction-tuned model (e.g. out/interleave)")
    run = train.Run(train.finish_args(args, "dpo.py"), script="dpo.py")
    for src, _ in run.sources:
        if hasattr(src, "counts"):
            print0(f"{src.name}: {dict(src.counts)}")
    table = precompute(run, run.sources) if args.precompute_ref else None
    train.train(run, lambda run, micro: dpo_step(run, micro, table))
    run.close()
    return run


if __name__ == "__main__":
    main()

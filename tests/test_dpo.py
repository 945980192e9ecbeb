"""dpo.py: log 2 at the start, the margin grows, the reference stays fixed, precomputed == on the fly,
bad pairs are counted, the merged checkpoint equals the trained policy."""
import json
import math
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import data
import dpo
import model
import train
from conftest import world_source

FAST = ["--workers", "0", "--max-len", "512", "--log-every", "1", "--save-every", "100", "--lora-r", "8",
        "--lora-alpha", "16", "--lora-dropout", "0"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, world):
    """An SFT checkpoint (3 steps on the toy world) and two preference pairs of the world's, in a mixture
    config whose image folder is the world (the pairs' image paths are relative to it)."""
    root = tmp_path_factory.mktemp("dpo")
    train.main(["--data", str(world / "mixtures" / "sft.json"), "--out-dir", str(root / "sft"),
                "--max-steps", "3", "--batch-size", "4", *FAST[:6]])
    rows = [json.loads(x) for x in (world / "dpo" / "pairs.jsonl").read_text().splitlines()][:2]
    world_source(world, root, "two", "pairs", rows)
    return root


def run(setup, out, data_path, *extra):
    s = dpo.main(["--init", str(setup / "sft"), "--data", str(data_path), "--out-dir", str(out), *FAST, *extra])
    return s, [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_first_step_is_log_2_and_the_margin_grows(setup, tmp_path):
    s, log = run(setup, tmp_path / "a", setup / "two.json", "--batch-size", "2", "--max-steps", "8", "--lr", "2e-3")
    assert abs(log[0]["loss"] - math.log(2)) <= 1e-6  # policy == reference: fresh adapters change nothing
    assert log[0]["reward_chosen"] == 0 and log[0]["reward_rejected"] == 0 and log[0]["pairs"] == 2
    assert log[-1]["margin"] > log[0]["margin"] + 0.05 and log[-1]["loss"] < log[0]["loss"]
    assert log[-1]["accuracy"] == 1.0


def fixed_batch(setup, m):
    tok = m.tokenizer
    src = data.open_sources(setup / "two.json", tok.id_to_token(tok.eos_id))[0][0]
    enc = data.Encoder(tok, m.config, 512)
    return data.collate([enc(src.record(i)) for i in range(len(src))], tok.pad_id) | {"keys": [(0, 0), (0, 1)]}


def test_reference_stays_fixed_and_the_merged_checkpoint_is_the_policy(setup, tmp_path):
    s, _ = run(setup, tmp_path / "b", setup / "two.json", "--batch-size", "2", "--max-steps", "4", "--lr", "2e-3")
    init = model.XGenMM.from_pretrained(checkpoint.newest(setup / "sft")).train()
    b = fixed_batch(setup, init)
    with torch.no_grad():
        before = dpo.logps(init, b)
        after = dpo.reference(s, b, None)  # the trained model with its adapters off
        policy = dpo.logps(s.m, b)
        merged = dpo.logps(model.XGenMM.from_pretrained(tmp_path / "b" / "ckpt-0000004").train(), b)
    assert (before - after).abs().max().item() <= 1e-5
    assert (policy - before).abs().max().item() > 1e-3  # training moved the policy
    assert (merged - policy).abs().max().item() <= 1e-3


def test_precomputed_reference_equals_on_the_fly(setup, tmp_path):
    args = ["--batch-size", "2", "--max-steps", "3", "--lr", "2e-3"]
    _, fly = run(setup, tmp_path / "fly", setup / "two.json", *args)
    _, pre = run(setup, tmp_path / "pre", setup / "two.json", *args, "--precompute-ref")
    assert (tmp_path / "pre" / "ref_logps.safetensors").is_file()
    for a, b in zip(fly, pre):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 and abs(a["margin"] - b["margin"]) <= 1e-5


def test_bad_pairs_are_reported_not_used(setup, world, tmp_path):
    rows = [json.loads(x) for x in (setup / "two.pairs.jsonl").read_text().splitlines()]
    same = dict(rows[0], rejected=rows[0]["chosen"])
    missing = dict(rows[1], image="images/nope.png")
    bad = world_source(world, tmp_path, "bad", "pairs", rows + [same, missing])
    _, log = run(setup, tmp_path / "c", bad, "--batch-size", "4", "--max-steps", "2",
                 "--max-bad-fraction", "0.6")
    assert log[0]["pairs"] == 2 and log[-1]["bad_samples"] == 4  # two bad rows in each of the two steps


def test_dpo_needs_an_initial_model(setup, capsys):
    with pytest.raises(SystemExit) as e:
        dpo.main(["--data", str(setup / "two.json")])
    assert e.value.code == 2 and "dpo.py: error: --init is required" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# the loss by hand: beta, IPO and label smoothing (the first step's log 2 cannot see any of them)


@pytest.mark.parametrize("loss, beta, smoothing, expected", [
    ("sigmoid", 0.1, 0.0, 0.5543552444685271),  # log(1 + e^-0.3)
    ("sigmoid", 1.0, 0.0, 0.04858735157374205),  # log(1 + e^-3)
    ("sigmoid", 0.1, 0.2, 0.6143552444685272),  # 0.8 log(1 + e^-0.3) + 0.2 log(1 + e^0.3)
    ("ipo", 0.1, 0.0, 4.0),  # (3 - 1 / (2 * 0.1))^2
    ("ipo", 0.5, 0.0, 4.0),  # (3 - 1)^2
])
def test_loss_values_by_hand(loss, beta, smoothing, expected):
    """h = 3 (the policy's log-ratio of chosen minus rejected): a dropped beta, a beta applied twice, IPO's
    target 1/(2 beta) written as 1/beta, or the smoothing weights swapped each give another number."""
    args = SimpleNamespace(loss=loss, beta=beta, label_smoothing=smoothing)
    assert abs(dpo.dpo_loss(torch.tensor([3.0], dtype=torch.float64), args).item() - expected) <= 1e-12


class FixedPolicy(torch.nn.Module):
    """A 'model' whose summed log-likelihoods are parameters: what dpo_step does with them is all there is."""

    def __init__(self, logps):
        super().__init__()
        self.logps = torch.nn.Parameter(torch.tensor(logps, dtype=torch.float64))

    def forward(self, ids, images, mask, labels=None, reduction=None):
        return -self.logps  # logps() negates the summed loss


def hand_step(rpo_alpha):
    """dpo_step on two pairs: policy (chosen, chosen, rejected, rejected) = (-10, -20, -12, -15), reference
    (-11, -20, -11, -16), beta 0.5, 3 supervised tokens per row; one SGD step at lr 1 without clipping.
    Returns the step's record and how far each log-prob moved."""
    policy = FixedPolicy([-10.0, -20.0, -12.0, -15.0])
    args = SimpleNamespace(beta=0.5, loss="sigmoid", label_smoothing=0.0, clip=0.0, rpo_alpha=rpo_alpha)
    run = SimpleNamespace(wrapped=policy, m=policy, world=1, device=torch.device("cpu"), args=args,
                          params=[policy.logps], opt=torch.optim.SGD([policy.logps], lr=1.0))
    b = {"input_ids": torch.ones(4, 3, dtype=torch.long), "attention_mask": None, "images": None,
         "labels": torch.ones(4, 3, dtype=torch.long), "keys": [(0, 0), (0, 1)]}
    table = {0: torch.tensor([[-11.0, -11.0], [-20.0, -16.0]], dtype=torch.float64)}  # (chosen, rejected) per pair
    rec = dpo.dpo_step(run, [b], table)
    return rec, policy.logps.detach() - torch.tensor([-10.0, -20.0, -12.0, -15.0], dtype=torch.float64)


def test_step_rewards_margin_accuracy_and_gradients_by_hand():
    """Two pairs. policy (chosen, chosen, rejected, rejected) = (-10, -20, -12, -15), reference = (-11, -20,
    -11, -16): log-ratios (1, 0 | -1, 1), h = (2, -1). With beta 0.5: losses log(1 + e^-1) = 0.3132617 and
    log(1 + e^0.5) = 0.9740770, mean 0.6436693; rewards 0.5 * ratio: chosen mean 0.25, rejected 0; accuracy
    0.5; d loss / d chosen log-prob = -beta sigmoid(-beta h) / 2 = (-0.0672353, -0.1556148), the rejected
    ones the opposite; one SGD step at lr 1 without clipping moves the log-probs by minus the gradient."""
    rec, step = hand_step(rpo_alpha=0.0)
    assert abs(rec["loss"] - 0.6436693) <= 1e-6 and rec["pairs"] == 2 and rec["accuracy"] == 0.5
    assert abs(rec["reward_chosen"] - 0.25) <= 1e-12 and abs(rec["reward_rejected"]) <= 1e-12
    assert abs(rec["margin"] - 0.25) <= 1e-12
    grad = torch.tensor([0.0672353, 0.1556148], dtype=torch.float64)
    assert torch.allclose(step, torch.cat((grad, -grad)), atol=1e-6), step


def test_rpo_term_by_hand():
    """The same two pairs with --rpo-alpha 0.5: each row has 3 supervised tokens, so the chosen answers' NLL
    per token is (10/3, 20/3), mean 5, and the loss grows by 0.5 * 5; the chosen log-probs get an extra
    gradient of -0.5 / 3 / 2 (mean over 2 pairs) each, the rejected ones none."""
    rec, step = hand_step(rpo_alpha=0.5)
    assert abs(rec["loss"] - (0.6436693 + 2.5)) <= 1e-6 and abs(rec["nll_chosen"] - 5.0) <= 1e-9
    grad = torch.tensor([0.0672353, 0.1556148], dtype=torch.float64)
    assert torch.allclose(step, torch.cat((grad + 0.5 / 6, -grad)), atol=1e-6), step


def test_stop_and_resume_equals_an_uninterrupted_run(setup, tmp_path):
    """DPO trains LoRA adapters on the --init model: a resumed run rebuilds it from --init and takes the
    adapters, optimiser and RNG (LoRA dropout) from its checkpoint, and ends exactly where the
    uninterrupted run does."""
    args = ["--batch-size", "2", "--max-steps", "4", "--lr", "2e-3", "--lora-dropout", "0.1"]
    _, full = run(setup, tmp_path / "full", setup / "two.json", *args)
    _, part = run(setup, tmp_path / "part", setup / "two.json", *args, "--stop-after", "2")
    _, both = run(setup, tmp_path / "part", setup / "two.json", *args, "--resume")
    assert len(part) == 2 and [r["step"] for r in both] == [1, 2, 3, 4]
    assert [(r["loss"], r["grad_norm"], r["margin"]) for r in both] == [(r["loss"], r["grad_norm"], r["margin"])
                                                                       for r in full]
    a, b = (load_file(d / "ckpt-0000004" / "trainer" / "adapters.safetensors") for d in (tmp_path / "full",
                                                                                       tmp_path / "part"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

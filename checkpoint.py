"""
Checkpoints of a training run, and the one resolver every script uses to find a model.

    OUT/ckpt-0000200/            the model in the official layout (XGenMM.from_pretrained, sample.py and eval.py
                                 load it), LoRA adapters merged in
    OUT/ckpt-0000200/trainer/    what resuming needs: optimizer.safetensors, rng-{rank}.safetensors (each rank's
                                 RNG states), adapters.safetensors (LoRA runs), trainer.json (step, data
                                 position, bad-sample counts, the optimiser's groups, the run's arguments)
    OUT/metrics.jsonl            one record per logged step

- A checkpoint is written as `.tmp-ckpt-NNNNNNN/` and renamed when complete (os.replace): a crash or a
  kill -9 in the middle of a write leaves the previous checkpoint intact. The newest `keep` are kept.
- Only directories named exactly `ckpt-NNNNNNN` are checkpoints: a folder of the user's called `ckpt-best`
  is neither resumed from nor rotated away, and rotation never removes the checkpoint just written.
- Weights and optimiser state are safetensors: nothing is unpickled on resume.
- Under FSDP2 the full (unsharded) state is gathered on rank 0, which writes it; every rank writes its RNG.
  On resume rank 0 alone reads the optimiser state and broadcasts it; each rank keeps its shards.
"""
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import lora
import weights
from distributed import barrier, rank
from model import XGenMM
from release import LM

NAME = re.compile(r"ckpt-\d{7}")


def newest(run_dir):
    """The newest complete checkpoint directory of a run, or None."""
    found = sorted(p for p in Path(run_dir).glob("ckpt-*") if NAME.fullmatch(p.name) and p.is_dir())
    return found[-1] if found else None


def resolve(path):
    """What --checkpoint and --init take: a checkpoint directory (with config.json), a training run's directory
    (its newest complete checkpoint), or a Hub id already in the local Hugging Face cache."""
    p = Path(path).expanduser()
    if p.is_dir() and not (p / "config.json").is_file():
        found = newest(p)
        if found is None:
            raise weights.CheckpointError(f"{path}: neither a checkpoint (no config.json) nor a run directory "
                                          "with ckpt-NNNNNNN checkpoints")
        return found
    return weights.resolve_dir(path)

# -----------------------------------------------------------------------------
# save


def full_model(m, wrapped):
    """A model whose parameters are whole tensors, for saving: `m` itself unless FSDP2 sharded it (then a copy
    gathered on rank 0, with the same LoRA adapters, on the meta device elsewhere)."""
    if not hasattr(wrapped, "reshard"):  # plain or DDP: the parameters are whole (FSDP2 modules can reshard)
        return m
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    state = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    with torch.device("meta"):
        full = XGenMM(m.config)
        if lora.lora_modules(m):
            lora.apply_lora(full.lang_model, **lora.settings(m))
    if rank() == 0:
        full.load_state_dict(state, assign=True)
    full.tokenizer = m.tokenizer
    return full


def optimizer_state(wrapped, opt):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(wrapped, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save(run_dir, step, m, wrapped, opt, trainer, args, keep=2):
    """Write ckpt-{step}/ (the model and trainer/, see above), then keep only the newest `keep` checkpoints.
    Every rank calls it (the gathers are collectives)."""
    run_dir = Path(run_dir)
    tmp, final = run_dir / f".tmp-ckpt-{step:07d}", run_dir / f"ckpt-{step:07d}"
    full, osd = full_model(m, wrapped), optimizer_state(wrapped, opt)
    if rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "trainer").mkdir(parents=True)  # training state in its own folder: the model folder stays plain
        state = full.official_state_dict()
        if lora.lora_modules(full):
            state = lora.merged_state_dict(full.lang_model, state, prefix=LM)
            lora.save_adapters(full, tmp / "trainer" / "adapters.safetensors")
        full.save_pretrained(tmp, state_dict=state)
        tensors = {f"state.{fqn}.{k}": v.contiguous() for fqn, s in osd["state"].items() for k, v in s.items()
                   if torch.is_tensor(v)}
        save_file(tensors, tmp / "trainer" / "optimizer.safetensors")
        (tmp / "trainer" / "trainer.json").write_text(json.dumps({**trainer, "param_groups": osd["param_groups"],
                                                                  "args": vars(args)}, indent=1))
    barrier()
    rng = {"cpu": torch.get_rng_state()} | ({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})
    save_file(rng, tmp / "trainer" / f"rng-{rank()}.safetensors")
    barrier()
    if rank() == 0:
        os.replace(tmp, final)  # the checkpoint exists, complete, or not at all
        rotate(run_dir, final, keep)
    barrier()


def rotate(run_dir, final, keep):
    """Keep `final` (the checkpoint just written) and the newest `keep - 1` other checkpoints; remove the rest.
    Only directories named ckpt-NNNNNNN count: a user's ckpt-best, or a file with a checkpoint's name, is
    never removed and never makes the run remove the checkpoint it just wrote."""
    others = sorted(p for p in run_dir.glob("ckpt-*") if NAME.fullmatch(p.name) and p.is_dir() and p != final)
    for old in others[: max(0, len(others) - (keep - 1))]:
        shutil.rmtree(old)

# -----------------------------------------------------------------------------
# resume


def load(ckpt, wrapped, opt):
    """The optimiser state and this rank's RNG from `ckpt`; returns the trainer state. Under FSDP2 only rank 0
    reads the optimiser file and sends each rank its shards (the whole state on every rank would be ~31 GB of
    host memory per rank at 4.4B). (A LoRA run loads its adapters from trainer/adapters.safetensors before
    FSDP2 shards the model: train.Run does.)"""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    trainer = json.loads((ckpt / "trainer" / "trainer.json").read_text())
    fsdp = hasattr(wrapped, "reshard")  # FSDP2 modules can reshard; DDP keeps a whole copy on every rank anyway
    state = {}
    for key, v in (load_file(ckpt / "trainer" / "optimizer.safetensors") if rank() == 0 or not fsdp else {}).items():
        fqn, _, k = key.removeprefix("state.").rpartition(".")
        state.setdefault(fqn, {})[k] = v
    set_optimizer_state_dict(wrapped, opt, {"state": state, "param_groups": trainer["param_groups"]},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=fsdp))
    rng = load_file(ckpt / "trainer" / f"rng-{rank()}.safetensors")
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return trainer


def keep_metrics(path, step):
    """On resume, drop the metrics of steps after the checkpoint: they are logged again. A line that is not a
    whole record (the partial last line of a run killed while writing it) is dropped too."""
    if path.is_file():
        kept = []
        for line in path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
                kept.append(line)
        path.write_text("".join(line + "\n" for line in kept))

"""
Benchmark: data.py's pipeline, can it feed a training step?

    python -m bench.pipeline --data data/toy/mixtures/sft.json data/toy/mixtures/interleave.json

It times data.py's pipeline (read, decode, any-resolution preprocessing, tokenize, collate) through a
DataLoader with 2 workers, in samples/s, next to a `tiny` training step (forward + backward) on the same
batches: the pipeline must outpace the step, or training waits for data.
"""
import argparse
import statistics
import time
from pathlib import Path

import torch

import model
from tokenizer import extended_tokenizer
from bench.common import CPU, parse, report, timed


def data_pipeline(args):
    """Samples/s of data.py's pipeline (read + decode + anyres preprocessing + tokenize + collate) through a
    DataLoader with --workers workers, next to the samples/s of a training step of the model preset it feeds."""
    import data
    results, rows = {}, []
    for path in args.data:
        world = Path(path).resolve().parent.parent
        tok = extended_tokenizer(world / "tokenizer")
        cfg = model.preset(args.preset, tokenizer=tok)
        enc = data.Encoder(tok, cfg, args.max_len)
        mix = data.Mixture(data.open_sources(path, tok.id_to_token(tok.eos_id)), enc, args.batch_size, tok.pad_id)
        it = iter(data.loader(mix, num_workers=args.workers))
        batches = [next(it) for _ in range(2)]  # workers started and warm
        t = time.perf_counter()
        batches += [next(it) for _ in range(args.batches)]
        feed = sum(len(b["where"]) for b in batches[2:]) / (time.perf_counter() - t)
        del it
        step = train_step_rate(cfg, batches[2:], args.repeats)
        results[path] = {"data_samples_per_s": feed, "train_samples_per_s": step}
        rows.append(f"| {Path(path).name} | {feed:,.1f} samples/s | {step:,.1f} samples/s | {feed / step:.1f}x |")
    report(f"| data ({args.workers} workers, batch {args.batch_size}) | pipeline | {args.preset} training step "
           "(fwd+bwd) | pipeline / step |", rows, results, args.json)


def train_step_rate(cfg, batches, repeats):
    """Samples/s of forward + backward of a fresh model of `cfg` on the given batches (median of repeats)."""
    torch.manual_seed(0)
    m = model.XGenMM(cfg).train()
    m.lang_model.init_weights()

    def step():
        for b in batches:
            loss = m(b["input_ids"], b["images"], b["attention_mask"], labels=b["labels"])
            loss.backward()
    step()
    t = statistics.median(timed(step, CPU) for _ in range(repeats))
    return sum(len(b["where"]) for b in batches) / t


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", required=True, help="mixture configs of a toy world (DIR/mixtures/*.json)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--batch-size", type=int, default=8, help="samples per batch")
    p.add_argument("--batches", type=int, default=20, help="batches timed (after two warm-up batches)")
    p.add_argument("--max-len", type=int, default=1024, help="token budget per sample")
    p.add_argument("--preset", default="tiny", choices=sorted(model.PRESET_PARTS), help="model the data feeds")
    p.add_argument("--repeats", type=int, default=3, help="timed passes of the training step (median kept)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    data_pipeline(parse(p))


if __name__ == "__main__":
    main()

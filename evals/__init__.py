"""
The paper's public benchmarks for eval.py: `readers` (each official file format -> records), `metrics` (the
official metrics, as plain functions of strings), `prompts` (the paper's few-shot documents and the chat
prompts), `run` (the generation loop, resumable predictions, a benchmark run) and `cli` (eval.py's `run`
and `score` commands). docs/evaluation.md is the user's guide.
"""

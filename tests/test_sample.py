"""sample.py, the command-line sampler, on a tiny random xGen-MM: its answers equal XGenMM.generate's.

A few runs go through a real subprocess (exit status, stdout carrying only the answer, stdin chat); the
rest call sample.main() in this process, which is the same code without the ~2 s interpreter start.
The random model answers in garbled text; what matters is that the tokens are exactly generate's.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from generate import decode_layout
from images import load_image
from model import XGenMM
from tokenizer import DEFAULT_SYSTEM, chat_prompt
from reference import write_xgenmm

pytest.importorskip("transformers")  # write_xgenmm builds the random weights with it

ROOT = Path(__file__).resolve().parent.parent
N = 8  # new tokens per answer: enough to tell answers apart


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("sample")
    write_xgenmm(d / "ckpt", seed=3)  # seed 3: its answers depend visibly on the prompt and the image order
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a.png": (40, 50), "b.png": (70, 30)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / name)
    (d / "notes.png").write_text("not an image")
    # directories that are not xGen-MM checkpoints: empty, another model, no tokenizer files
    (d / "empty").mkdir()
    (d / "llama").mkdir()
    (d / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    shutil.copytree(d / "ckpt", d / "no-tokenizer")
    (d / "no-tokenizer" / "tokenizer.model").unlink()
    return d


@pytest.fixture(scope="module")
def model(files):
    m = XGenMM.from_pretrained(files / "ckpt")
    decode_layout(m.lang_model)  # as sample.py runs it, so the float rounding is the same too
    return m


def expected(model, text, images=(), **options):
    """generate's answer to the full prompt text: decoded, cut at the first stop id."""
    new = model.generate([model.tokenizer.encode(text)], [list(images)] if images else None, max_new_tokens=N,
                         **options)[0].tolist()
    stops = [i for i, t in enumerate(new) if t in model.stop_ids]
    return model.tokenizer.decode(new[: stops[0]] if stops else new, skip_special_tokens=True)


def pictures(files, *names):
    return [load_image(files / n) for n in names]


def cli(files, *args, stdin=None):
    """sample.py as a subprocess; returns (exit status, stdout, stderr)."""
    env = os.environ | {"PYTHONIOENCODING": "utf-8"}
    r = subprocess.run([sys.executable, "sample.py", "--checkpoint", str(files / "ckpt"), *map(str, args)],
                       cwd=ROOT, input=stdin, capture_output=True, text=True, encoding="utf-8", env=env, timeout=300)
    return r.returncode, r.stdout, r.stderr


def run_main(capsys, files, *args):
    """sample.main() in this process; returns (exit status, stdout, stderr). A later --checkpoint wins."""
    try:
        sample.main(["--checkpoint", str(files / "ckpt"), "--max-new-tokens", str(N), *map(str, args)])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def error_lines(err):
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("sample.py: error:")]

# -----------------------------------------------------------------------------
# answers


def test_one_shot_stdout_is_exactly_the_answer(files, model):
    code, out, err = cli(files, "--image", files / "a.png", "--prompt", "What is this?", "--max-new-tokens", N)
    assert code == 0, err
    want = expected(model, chat_prompt(["<image>\nWhat is this?"]), pictures(files, "a.png"))
    assert want and out == want + "\n"
    assert "loaded" in err and "tokens" in err  # the diagnostics go to stderr


def test_two_images_with_and_without_markers(capsys, files, model):
    a, b = files / "a.png", files / "b.png"
    code, bare, err = run_main(capsys, files, "--image", a, "--image", b, "--prompt", "Which is bigger?")
    assert code == 0, err
    _, marked, _ = run_main(capsys, files, "--image", a, "--image", b, "--prompt", "<image>\n<image>\nWhich is bigger?")
    assert bare == marked == expected(model, chat_prompt(["<image>\n<image>\nWhich is bigger?"]),
                                      pictures(files, "a.png", "b.png")) + "\n"
    swapped = expected(model, chat_prompt(["<image>\n<image>\nWhich is bigger?"]), pictures(files, "b.png", "a.png"))
    assert bare != swapped + "\n", "the images' order should show in the answer, or this test cannot fail"
    prompt = "Is <image> bigger than <image>?"
    code, out, err = run_main(capsys, files, "--image", a, "--image", b, "--prompt", prompt)
    assert code == 0 and out == expected(model, chat_prompt([prompt]), pictures(files, "a.png", "b.png")) + "\n"


@pytest.mark.parametrize("flags, prompt_text", [
    (["--raw"], lambda p: p),
    (["--system", ""], lambda p: chat_prompt([p], system=None)),
    (["--system", "Answer briefly."], lambda p: chat_prompt([p], system="Answer briefly.")),
], ids=["raw", "no-system", "own-system"])
def test_prompt_formats(capsys, files, model, flags, prompt_text):
    prompt = "<image>\nThe picture shows"
    code, out, err = run_main(capsys, files, *flags, "--image", files / "a.png", "--prompt", prompt)
    assert code == 0, err
    images = pictures(files, "a.png")
    assert out == expected(model, prompt_text(prompt), images) + "\n"
    assert out != expected(model, chat_prompt([prompt], DEFAULT_SYSTEM), images) + "\n", "the flag changed nothing"


def test_sampling_flags_reach_generate(capsys, files, model):
    flags = ["--temperature", "1.5", "--top-k", "40", "--top-p", "0.95", "--seed", "7", "--prompt", "hello"]
    code, out, err = run_main(capsys, files, *flags)
    assert code == 0, err
    want = expected(model, chat_prompt(["hello"]), temperature=1.5, top_k=40, top_p=0.95,
                    generator=torch.Generator().manual_seed(7))
    assert out == want + "\n"
    assert out != expected(model, chat_prompt(["hello"])) + "\n", "sampling gave the greedy answer"


def test_chat_keeps_the_conversation(files, model):
    a, b = pictures(files, "a.png", "b.png")
    turns = ["What is this?", "hello", "/image nope.png", "/reset", "/image " + str(files / "b.png"),
             "Which is bigger?", "/quit", "never answered"]
    code, out, err = cli(files, "--image", files / "a.png", "--max-new-tokens", N, stdin="\n".join(turns) + "\n")
    assert code == 0, err
    first = ["<image>\nWhat is this?"]
    a1 = expected(model, chat_prompt(first), [a])
    a2 = expected(model, chat_prompt(first + [a1, "hello"]), [a])
    a3 = expected(model, chat_prompt(["<image>\n<image>\nWhich is bigger?"]), [a, b])  # /reset: --image again, then b
    assert out == f"{a1}\n{a2}\n{a3}\n"
    assert a2 != expected(model, chat_prompt(["hello"])), "the history should show in the answer"
    assert "nope.png" in err  # a bad /image is reported and the chat goes on

# -----------------------------------------------------------------------------
# bad input: one line on stderr, exit status 2


def test_bad_input_in_a_real_process(files):
    code, out, err = cli(files, "--image", files / "notes.png", "--prompt", "hi")
    assert (code, out) == (2, "") and error_lines(err) == [err.strip()] and "notes.png" in err
    code, out, err = cli(files, "--prompt", "hi", "--max-new-tokens", 100000)
    assert (code, out) == (2, "") and len(error_lines(err)) == 1 and "exceeds" in err


BAD_INPUT = {  # case: (arguments after --checkpoint ckpt --max-new-tokens N, what the error line must say)
    "missing image": (["--image", "{d}/nope.png", "--prompt", "hi"], "nope.png"),
    "marker mismatch": (["--image", "{a}", "--prompt", "<image> and <image>?"], "2 <image> marker(s)"),
    "long prompt": (["--prompt", "count " * 600], "exceeds the model's 512 positions"),
    "no such checkpoint": (["--prompt", "hi", "--checkpoint", "{d}/missing"], "no such file"),
    "not a checkpoint": (["--prompt", "hi", "--checkpoint", "{d}/empty"], "config.json"),
    "not xgen-mm": (["--prompt", "hi", "--checkpoint", "{d}/llama"], "model_type 'llama'"),
    "hub id not cached": (["--prompt", "hi", "--checkpoint", "nobody/no-such-model"], "not in the Hugging Face cache"),
    "no tokenizer": (["--prompt", "hi", "--checkpoint", "{d}/no-tokenizer"], "no tokenizer"),
    "bad flag value": (["--prompt", "hi", "--top-p", "0"], "--top-p"),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input(capsys, monkeypatch, tmp_path, files, case):
    args, cause = BAD_INPUT[case]
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache
    code, out, err = run_main(capsys, files, *[a.format(a=files / "a.png", d=files) for a in args])
    assert (code, out) == (2, ""), (case, err)
    lines = error_lines(err)
    assert len(lines) == 1 and cause in lines[0], (case, err)


def test_stream_prints_whole_characters_as_they_come(capsys, model):
    tok = model.tokenizer
    ids = tok.encode("héllo wörld ✓ ok", bos=False)
    assert any(tok.is_byte(i) for i in ids), "the test needs byte tokens"
    stream, seen = sample.Stream(tok, model.stop_ids), []
    for i in ids + [model.stop_ids[0]] + ids:  # nothing after the stop token shows
        stream(torch.tensor([i]))
        seen.append(capsys.readouterr().out)
    stream.show(end="\n")
    assert "".join(seen) + capsys.readouterr().out == "héllo wörld ✓ ok\n"
    assert "\ufffd" not in "".join(seen) and sum(map(bool, seen)) > 3  # whole characters, several pieces


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_layout_only_for_fp32_on_the_cpu(files, dtype):
    """Column-major weights speed up fp32 matrix-vector products on a CPU but slow bf16 ones ~36x."""
    m = sample.load(sample.build_parser().parse_args(["--checkpoint", str(files / "ckpt"), "--dtype", dtype]))
    w = m.lang_model.model.layers[0].mlp.gate_up_proj.weight
    assert w.dtype == getattr(torch, dtype) and w.is_contiguous() == (dtype == "bfloat16")


def test_a_run_directory_means_its_newest_checkpoint(capsys, files, model, tmp_path):
    """What train.py writes (RUN/ckpt-NNNNNNN/) is what --checkpoint takes, as train.py and eval.py do."""
    shutil.copytree(files / "ckpt", tmp_path / "run" / "ckpt-0000002")
    (tmp_path / "run" / "ckpt-best").mkdir()  # a user's folder: not a checkpoint name, never chosen
    code, out, err = run_main(capsys, files, "--prompt", "hi", "--checkpoint", tmp_path / "run")
    assert code == 0 and out == expected(model, chat_prompt(["hi"])) + "\n", err

"""
How a benchmark record is put to the model, and how its answer is read back: the paper's few-shot documents
for pretrained checkpoints, the chat template for instruction-tuned ones.

- Pretrained (`--prompt plain`), the protocol of OpenFlamingo's evaluation, from which xGen-MM's training code
  descends (docs/release.md §7): a caption reads `<image>Output:{caption}<|endofchunk|>`, a question
  `<image>Question:{question} Short answer:{answer}<|endofchunk|>`; each demonstration is followed by a
  newline and the record comes last, open after `Output:` / `Short answer:`. POPE and multiple choice use
  the question form, the options inline.
- Demonstrations are drawn at random for each record from a query set of the training split (2,048 records,
  seeded); k = 0, 4 or 8. "0-shot" for an interleaved model is 2 demonstrations with their images removed,
  so the model still sees the format. Difference: each record's draw is seeded by (seed, its id) instead of
  one random stream, so a resumed or re-batched run asks every record exactly as before.
- Instruction-tuned (`--prompt chat`): Phi-3's chat format with the default system prompt, the image before
  the question, and LLaVA-1.5's answer-format instructions (short answer, option letter, "Unanswerable"
  for VizWiz, one-sentence caption); k shots are k earlier question/answer turns.
- Answers read back: OpenFlamingo's cuts for plain prompts (a VQA answer ends at a following "Question",
  "Answer", "Short" or ", "; a caption at "Output", quotes removed), then the first line, stripped.
- Decoding is greedy, where the paper's pretrained results use beam search (3 beams); at most 5 new tokens
  for a short answer and 20 for a caption with plain prompts, as OpenFlamingo's evaluation.

References: OpenFlamingo (arXiv 2308.01390) and its evaluate.py; Flamingo (arXiv 2204.14198) for the 0-shot
text-only demonstrations; LLaVA-1.5 (arXiv 2310.03744) for the short-answer instructions.
"""
import random
import re
from dataclasses import dataclass, field

from tokenizer import DEFAULT_SYSTEM, END_CHUNK, IMAGE, chat_prompt

QUERY_SET = 2048  # OpenFlamingo's --query_set_size
ZERO_SHOT_DEMOS = 2  # OpenFlamingo's compute_effective_num_shots: 0 shots -> 2 text-only demonstrations
MAX_NEW = {("plain", "caption"): 20, ("chat", "caption"): 60, ("chat", "vqa"): 16}  # else 5 (plain) / 8 (chat)
INSTRUCTIONS = {  # LLaVA-1.5's evaluation prompts, after the question (chat only)
    "vqa": "Answer the question using a single word or phrase.",
    "pope": "Answer the question using a single word or phrase.",
    "vizwiz": "When the provided information is insufficient, respond with 'Unanswerable'.\n"
              "Answer the question using a single word or phrase.",
    "choice": "Answer with the option's letter from the given choices directly.",
    "caption": "Provide a one-sentence caption for the provided image.",
}


@dataclass
class Query:
    """One prompt to the model: its record's id, the text, the images in prompt order (paths or bytes)."""
    id: object
    prompt: str
    images: list
    max_new: int
    answer: str = None
    raw: str = field(default=None, repr=False)

# -----------------------------------------------------------------------------
# one record as text


def question(record, kind, ocr=False):
    """The question as asked: a hint and the options around it for multiple choice; OCR tokens if asked."""
    if kind == "choice":
        hint = f"{record['hint']}\n" if record.get("hint") else ""
        return hint + record["question"] + "".join(f"\n{c}. {t}" for c, t in record["options"].items())
    if ocr and record.get("ocr_tokens"):  # TextVQA's tokens, as LLaVA-1.5's TextVQA prompt lists them
        return f"{record['question']}\nReference OCR token: {', '.join(record['ocr_tokens'])}"
    return record["question"]


def target(record, kind):
    """What a demonstration answers: the first of the human answers (as OpenFlamingo), the first caption."""
    if kind == "vqa":
        return record["answers"][0]
    if kind == "caption":
        return record["captions"][0].strip()
    return record["label"] if kind == "pope" else record["answer"]


def plain_chunk(record, kind, answer=None, ocr=False):
    """One interleaved chunk; with `answer` a closed demonstration, without it the open query."""
    head = f"{IMAGE}Output:" if kind == "caption" else f"{IMAGE}Question:{question(record, kind, ocr)} Short answer:"
    return head if answer is None else f"{head}{answer}{END_CHUNK}"


def chat_turn(record, kind, task=None, ocr=False):
    """The user turn of a chat prompt: the image, the question, the answer-format instruction."""
    rule = INSTRUCTIONS["vizwiz" if task == "vizwiz" else kind]
    text = rule if kind == "caption" else f"{question(record, kind, ocr)}\n{rule}"
    return f"{IMAGE}\n{text}"

# -----------------------------------------------------------------------------
# few-shot documents


def query_set(pool, seed=42, size=QUERY_SET):
    """The fixed random subset of the training split that demonstrations are drawn from."""
    return random.Random(seed).sample(list(pool), min(size, len(pool)))


def how_many(shots, style, demos):
    """Demonstrations per record: `shots`; 0-shot plain prompts get 2 (text only) when there is a pool."""
    return shots if shots or style == "chat" else (ZERO_SHOT_DEMOS if demos else 0)


def demonstrations(demos, record, shots, style, seed=42):
    """The demonstrations of one record, drawn by (seed, record id)."""
    k = how_many(shots, style, demos)
    if k > len(demos):
        raise ValueError(f"{k} demonstrations asked for, but the training split gave {len(demos)}; pass "
                         "--demos (the training split's files), or fewer --shots")
    return random.Random(f"{seed}:{record['id']}").sample(demos, k)


def build(record, kind, style="chat", shots=0, demos=(), seed=42, task=None, ocr=False, system=DEFAULT_SYSTEM,
          chosen=None):
    """The Query of one record: the prompt text, its images, and the answer budget. `chosen`: its
    demonstrations, already chosen (RICES); else drawn from `demos`."""
    chosen = demonstrations(list(demos), record, shots, style, seed) if chosen is None else chosen
    images = [d["image"] for d in chosen] if shots else []
    if style == "plain":
        context = "".join(plain_chunk(d, kind, target(d, kind), ocr) + "\n" for d in chosen)
        context = context if shots else context.replace(IMAGE, "")  # 0-shot: the demonstrations' text only
        prompt = context + plain_chunk(record, kind, ocr=ocr)
    else:
        turns = [t for d in chosen for t in (chat_turn(d, kind, task, ocr), target(d, kind))]
        prompt = chat_prompt(turns + [chat_turn(record, kind, task, ocr)], system=system)
    budget = MAX_NEW.get((style, kind), 5 if style == "plain" else 8)
    return Query(record["id"], prompt, images + [record["image"]], budget)


def read_answer(text, kind, style):
    """The answer in a generated text: OpenFlamingo's cuts for plain prompts, then the first line, stripped."""
    if style == "plain" and kind == "caption":
        text = text.split("Output", 1)[0].replace('"', "")
    elif style == "plain":
        text = re.split(", ", re.split("Question|Answer|Short", text, maxsplit=1)[0], maxsplit=1)[0]
    return text.strip().split("\n")[0].strip()

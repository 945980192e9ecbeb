"""
Multiple choice (MMBench, SEED-Bench, ScienceQA, AI2D) as VLMEvalKit scores it (its matching of 2024, the
version the paper's numbers come from), without its optional GPT judge ("exact matching"):

- The option a free-form answer picks: a refusal phrase -> 'Z' (never right); else the answer with
  . ( ) [ ] , : ; ! * # { } turned into spaces and split on spaces: if exactly one option letter stands
  alone among the words, that letter ("A dog" -> A, as VLMEvalKit reads it); if none does and a lone 'Z'
  does, 'Z'. Else the one option whose text (lower case) the answer (lower case) contains. Else no letter,
  which scores as wrong ("The answer is B because A is wrong." names two letters: none).
- Circular evaluation (MMBench): rotation k of question i has index i + k * 1,000,000; a question is right
  only if every rotation is. Its per-category figures (category and l2-category) are circular too.

References: MMBench (arXiv 2307.06281); VLMEvalKit vlmeval/utils/matching_util.py (can_infer) and
vlmeval/dataset/utils/multiple_choice.py (circular groups, report_acc), as of 2024.
"""
CIRCULAR = 1_000_000  # MMBench: rotation k of question i has index i + k * 1,000,000
REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
            "I'm sorry, but without the image provided", "Cannot determine the answer")
SEPARATORS = ".()[],:;!*#{}"


def letter_alone(answer, options):
    """The option letter standing alone among the answer's words, 'Z' for a refusal, or None."""
    if "Failed to obtain answer via API" in answer:
        return None
    if any(r in answer for r in REFUSALS):
        return "Z"
    words = answer.translate({ord(c): " " for c in SEPARATORS}).split()
    found = [c for c in options if c in words]
    if len(found) == 1:
        return found[0]
    return "Z" if not found and "Z" in words else None


def option_named(answer, options):
    """The one option whose text the answer contains (both lower case), or None."""
    named = [c for c, text in options.items() if str(text).lower() in answer.lower()]
    return named[0] if len(named) == 1 else None


def choice_letter(answer, options):
    """The option letter a free-form answer picks, 'Z' (a refusal), or None. `options`: {"A": text, ...}."""
    answer = str(answer)
    return letter_alone(answer, options) or option_named(answer, options)


def rotate(record, k):
    """Rotation k of a multiple-choice record: option j shows option (j + k)'s text; the answer follows it."""
    letters = sorted(record["options"])
    texts = [record["options"][c] for c in letters]
    options = {c: texts[(j + k) % len(texts)] for j, c in enumerate(letters)}
    answer = None
    if record.get("answer") in letters:
        answer = letters[(letters.index(record["answer"]) - k) % len(letters)]
    return {**record, "id": int(record["id"]) + k * CIRCULAR, "options": options, "answer": answer}


def is_rotation_id(i):
    return str(i).isdigit() and int(i) >= CIRCULAR


def circular_groups(right, records):
    """{question index: [all rotations right?, its record]} from {str(id): right?} over the records."""
    groups = {}
    for r in records:
        group = groups.setdefault(int(r["id"]) % CIRCULAR, [True, r])
        group[0] = group[0] and right[str(r["id"])]
    return groups


def choice_scores(said, records):
    """accuracy (each record), circular_accuracy, and accuracy by category and by l2-category (MMBench's two
    levels; circular where the records rotate, as VLMEvalKit's report_acc)."""
    right = {str(r["id"]): choice_letter(a, r["options"]) == r["answer"] for a, r in zip(said, records)}
    out = {"accuracy": mean(right.values())}
    if any(is_rotation_id(r["id"]) for r in records):
        pairs = list(circular_groups(right, records).values())
        out["circular_accuracy"] = mean(ok for ok, _ in pairs)
    else:
        pairs = [(right[str(r["id"])], r) for r in records]
    for field in ("category", "l2_category"):
        values = {r.get(field) for _, r in pairs} - {None}
        if len(values) > 1:
            out[f"by_{field}"] = {v: mean(ok for ok, r in pairs if r.get(field) == v) for v in sorted(values)}
    return out


def mean(values):
    values = list(values)
    return sum(values) / len(values) if values else 0.0

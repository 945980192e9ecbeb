"""
The official metrics of the paper's benchmarks, as plain functions of strings: nothing here sees a model.

- VQA accuracy (VQAv2, OK-VQA, TextVQA, VizWiz), as the VQA API's vqaEval.py computes it: newlines and tabs
  to spaces, strip; when the ten human answers are not all the same, the answers are normalised
  (punctuation, lower case, number words, articles, contractions); then for each of the ten leave-one-out
  sets of nine, min(matches / 3, 1), and the mean of the ten. One deliberate difference: the prediction is
  normalised whenever it misses as typed (lmms-eval's EvalAI processor normalises it always), where the API
  leaves it as typed when the ten agree, so "Yes." would miss ten "yes". Every API match still counts.
- CIDEr-D and BLEU-4 on tokenised captions, equal to pycocoevalcap's Cider and Bleu(4) on the same tokens,
  quirks included (CIDEr-D's length penalty counts bigrams; BLEU's 1e-15 / 1e-9 smoothing, 'closest'
  reference length). `tokenize` stands in for the Java PTB tokenizer pycocoevalcap runs first: lower case,
  clitics split off ("do n't", "man 's"), the punctuation pycocoevalcap drops removed.
- POPE: an answer is "no" when its first sentence has the word No, no or not (POPE's evaluate.py); accuracy,
  precision, recall and F1 with "yes" as the positive class, and the share of "yes".
- Multiple choice: the option letter is read from a free-form answer; MMBench's circular evaluation counts a
  question right only if every rotation of its options is (rotations share index mod 1,000,000).

References: VQA (arXiv 1505.00468) and its evaluation API (GT-Vision-Lab/VQA, vqaEval.py); CIDEr (arXiv
1411.5726) and pycocoevalcap; BLEU (Papineni et al., ACL 2002); POPE (arXiv 2305.10355, its evaluate.py);
MMBench (arXiv 2307.06281).
"""
import math
import re
from collections import Counter

# -----------------------------------------------------------------------------
# VQA accuracy (the VQA API's normalisation, then leave-one-out)

PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!"]  # vqaEval.py's list; "." and "'" are handled apart (periods below, apostrophes kept)
COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # quirk, kept: meant as a look-behind, it only checks "not before a digit"
NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
           "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
# vqaEval.py's contractions as "typed:restored" pairs. Its capitalised keys (Im, Ive, Id've, I'dve) never meet
# lower-cased text and are left out; its reversed entry somebody'd -> somebodyd is kept.
CONTRACTIONS = dict(pair.split(":") for pair in """
aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've couldnt've:couldn't've
didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've hadn'tve:hadn't've hasnt:hasn't
havent:haven't hed:he'd hed've:he'd've he'dve:he'd've hes:he's howd:how'd howll:how'll hows:how's isnt:isn't
itd:it'd itd've:it'd've it'dve:it'd've itll:it'll let's:let's maam:ma'am mightnt:mightn't mightnt've:mightn't've
mightn'tve:mightn't've mightve:might've mustnt:mustn't mustve:must've neednt:needn't notve:not've oclock:o'clock
oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at 'ow'sat:'ow's'at shant:shan't shed've:she'd've
she'dve:she'd've she's:she's shouldve:should've shouldnt:shouldn't shouldnt've:shouldn't've
shouldn'tve:shouldn't've somebody'd:somebodyd somebodyd've:somebody'd've somebody'dve:somebody'd've
somebodyll:somebody'll somebodys:somebody's someoned:someone'd someoned've:someone'd've someone'dve:someone'd've
someonell:someone'll someones:someone's somethingd:something'd somethingd've:something'd've
something'dve:something'd've somethingll:something'll thats:that's thered:there'd thered've:there'd've
there'dve:there'd've therere:there're theres:there's theyd:they'd theyd've:they'd've they'dve:they'd've
theyll:they'll theyre:they're theyve:they've twas:'twas wasnt:wasn't wed've:we'd've we'dve:we'd've weve:we've
werent:weren't whatll:what'll whatre:what're whats:what's whatve:what've whens:when's whered:where'd
wheres:where's whereve:where've whod:who'd whod've:who'd've who'dve:who'd've wholl:who'll whos:who's
whove:who've whyll:why'll whyre:why're whys:why's wont:won't wouldve:would've wouldnt:wouldn't
wouldnt've:wouldn't've wouldn'tve:wouldn't've yall:y'all yall'll:y'all'll y'allll:y'all'll yall'd've:y'all'd've
y'alld've:y'all'd've y'all'dve:y'all'd've youd:you'd youd've:you'd've you'dve:you'd've youll:you'll
youre:you're youve:you've""".split())


def strip_answer(text):
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text):
    """A mark is deleted everywhere if it touches a space anywhere in the text, or if the text has a digit,digit
    comma ('1,000' -> '1000'); else each is replaced by a space ('yes/no' -> 'yes no'). Then a period not
    before a digit goes."""
    out = text
    number = COMMA_IN_NUMBER.search(text) is not None
    for p in PUNCTUATION:
        out = out.replace(p, "" if (p + " " in text or " " + p in text or number) else " ")
    return PERIOD.sub("", out)


def process_digits_articles(text):
    """Lower case, number words to digits, articles dropped, contractions restored, single spaces."""
    words = [NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(text):
    return process_digits_articles(process_punctuation(strip_answer(text)))


def vqa_accuracy(prediction, answers):
    """The VQA accuracy of one prediction against the human answers (ten in the official files), in [0, 1]."""
    answers, typed = [strip_answer(a) for a in answers], strip_answer(prediction)
    if len(set(answers)) > 1:  # vqaEval.py normalises the answers (and the prediction) only when they differ
        answers = [normalize_answer(a) for a in answers]
    prediction = typed if typed in answers and len(set(answers)) == 1 else normalize_answer(prediction)
    matches = [a == prediction for a in answers]
    total = sum(matches)
    return sum(min((total - m) / 3, 1.0) for m in matches) / len(answers)  # leave answer i out, for each i

# -----------------------------------------------------------------------------
# captions: tokenisation, BLEU-4, CIDEr-D

PTB_DROPPED = re.compile(r"(?<!\d)[.,]|[.,](?!\d)|[?!:;\"`()\[\]{}]")  # a '.' or ',' stays only between digits
CLITIC = re.compile(r"n't|'(?:s|re|ve|ll|d|m)")


def tokenize(caption):
    """Lower case, PTB clitics split off, the punctuation pycocoevalcap drops removed: 'A man's hat.' ->
    'a man 's hat'. Decimal points and digit commas stay ('3.5', '1,000'), hyphens inside words too."""
    text = caption.lower().replace("\n", " ")
    text = re.sub(r"(\w)(n't)\b", r"\1 \2", text)
    text = re.sub(r"(\w)('(?:s|re|ve|ll|d|m))\b", r"\1 \2", text)
    words = [w if CLITIC.fullmatch(w) else w.strip("'-") for w in PTB_DROPPED.sub(" ", text).split()]
    return " ".join(w for w in words if w)  # quotes and dashes around a word were PTB tokens of their own


def ngram_counts(words, n=4):
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def bleu4(candidates, references):
    """Corpus BLEU-4 as pycocoevalcap's Bleu(4): {id: tokenised caption}, {id: [tokenised references]}."""
    tiny, small = 1e-15, 1e-9  # pycocoevalcap's smoothing against empty counts
    correct, guess, test_len, ref_len = [0] * 4, [0] * 4, 0, 0
    for i, caption in candidates.items():
        words, refs = caption.split(), [r.split() for r in references[i]]
        best = Counter()
        for r in refs:
            best |= ngram_counts(r)  # each n-gram's count clipped at its most frequent reference
        for g, c in ngram_counts(words).items():
            correct[len(g) - 1] += min(c, best[g])
        for k in range(4):
            guess[k] += max(0, len(words) - k)
        test_len += len(words)
        ref_len += min((abs(len(r) - len(words)), len(r)) for r in refs)[1]  # the closest reference length
    score = math.prod((correct[k] + tiny) / (guess[k] + small) for k in range(4)) ** 0.25
    ratio = (test_len + tiny) / (ref_len + small)
    return score * math.exp(1 - 1 / ratio) if ratio < 1 else score


def cider_d(candidates, references, sigma=6.0):
    """CIDEr-D as pycocoevalcap's Cider: (corpus mean, {id: score}); idf over the references of this set."""
    refs = {i: [ngram_counts(r.split()) for r in references[i]] for i in candidates}
    df = Counter(g for counts in refs.values() for g in set().union(*counts))  # images whose references hold g
    log_images = math.log(len(candidates))

    def vector(counts):  # tf-idf per n-gram order, the norms, and the length the penalty compares
        vec, norm = [{}, {}, {}, {}], [0.0] * 4
        for g, tf in counts.items():
            vec[len(g) - 1][g] = w = tf * (log_images - math.log(max(1.0, df[g])))
            norm[len(g) - 1] += w * w
        length = sum(tf for g, tf in counts.items() if len(g) == 2)  # quirk, kept: bigrams, not words
        return vec, [math.sqrt(x) for x in norm], length

    def similarity(a, b):  # the clipped cosine of each order, times the Gaussian length penalty
        (va, na, la), (vb, nb, lb) = a, b
        out = []
        for k in range(4):
            dot = sum(min(w, vb[k].get(g, 0.0)) * vb[k].get(g, 0.0) for g, w in va[k].items())
            out.append((dot / (na[k] * nb[k]) if na[k] and nb[k] else dot) * math.exp(-(la - lb) ** 2 / (2 * sigma ** 2)))
        return out

    scores = {}
    for i, caption in candidates.items():
        cand = vector(ngram_counts(caption.split()))
        sims = [similarity(cand, vector(r)) for r in refs[i]]
        scores[i] = 10.0 * sum(sum(s) / 4 for s in sims) / len(sims)
    return sum(scores.values()) / len(scores), scores

# -----------------------------------------------------------------------------
# POPE


def pope_says_yes(answer):
    """POPE's rule: 'no' if the first sentence has the word No, no or not; anything else is 'yes'."""
    words = answer.split(".")[0].replace(",", "").split(" ")
    return not any(w in ("No", "no", "not") for w in words)


def pope_scores(predicted_yes, labels_yes):
    """Accuracy, precision, recall, F1 ('yes' positive) and the yes ratio of paired booleans."""
    pairs = list(zip(predicted_yes, labels_yes))
    tp = sum(p and y for p, y in pairs)
    fp = sum(p and not y for p, y in pairs)
    tn = sum(not p and not y for p, y in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + sum(not p and y for p, y in pairs)) if any(y for _, y in pairs) else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / len(pairs), "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": sum(p for p, _ in pairs) / len(pairs)}

# -----------------------------------------------------------------------------
# multiple choice


def choice_letter(answer, options):
    """The option letter a free-form answer picks, or None. `options`: {"A": text, ...}.

    In order: a bare or leading letter ('B', '(B)', 'B. cat'), 'answer is B' / 'Answer: B' / 'option B',
    the one option whose text the answer contains, the one option letter standing alone in the answer.
    """
    text = answer.strip()
    m = re.match(r"\(?([A-Z])\)?(?:$|[.:)]|\s+(?=[A-Z(]|$))", text) or \
        re.search(r"\b(?:answer|option)(?:\s+is)?\s*:?\s*\(?([A-Z])\b", text, flags=re.I)
    if m and m.group(1) in options:
        return m.group(1)
    named = [k for k, v in options.items() if str(v).strip() and str(v).strip().lower() in text.lower()]
    if len(named) == 1:
        return named[0]
    alone = {m.group(1) for m in re.finditer(r"\b([A-Z])\b(\s+[a-z])?", text)  # not the words in 'A man', 'I see'
             if m.group(1) in options and not (m.group(1) in "AI" and m.group(2))}
    return alone.pop() if len(alone) == 1 else None


CIRCULAR = 1_000_000  # MMBench: rotation k of question i has index i + k * 1,000,000


def rotate(record, k):
    """Rotation k of a multiple-choice record: option j shows option (j + k)'s text; the answer follows it."""
    letters = sorted(record["options"])
    texts = [record["options"][c] for c in letters]
    options = {c: texts[(j + k) % len(texts)] for j, c in enumerate(letters)}
    answer = None
    if record.get("answer") in letters:
        answer = letters[(letters.index(record["answer"]) - k) % len(letters)]
    return {**record, "id": int(record["id"]) + k * CIRCULAR, "options": options, "answer": answer}


def circular_accuracy(correct_by_id):
    """{index: right?} over rotations -> the share of questions (index mod 1e6) right in every rotation."""
    groups = {}
    for i, ok in correct_by_id.items():
        groups.setdefault(int(i) % CIRCULAR, []).append(ok)
    return sum(all(g) for g in groups.values()) / len(groups)

# -----------------------------------------------------------------------------
# a benchmark's score: reference records (evals/readers.py) and the answers to them


def score(kind, records, answers):
    """kind 'vqa' | 'caption' | 'pope' | 'choice'; records: the readers' references; answers: {str(id): text}
    covering every record. -> {metric: value in [0, 1] (CIDEr-D unbounded), "n": records scored, ...}."""
    said = [answers[str(r["id"])] for r in records]
    if kind == "vqa":
        right = [vqa_accuracy(a, r["answers"]) for a, r in zip(said, records)]
        out = {"accuracy": mean(right)}
        types = {r.get("answer_type") for r in records} - {None}
        if len(types) > 1:  # the official report's per-answer-type rows (yes/no, number, other, unanswerable)
            out["by_answer_type"] = {t: mean(x for x, r in zip(right, records) if r.get("answer_type") == t)
                                     for t in sorted(types)}
    elif kind == "caption":
        candidates = {str(r["id"]): tokenize(a) for a, r in zip(said, records)}
        references = {str(r["id"]): [tokenize(c) for c in r["captions"]] for r in records}
        out = {"CIDEr": cider_d(candidates, references)[0], "BLEU-4": bleu4(candidates, references)}
    elif kind == "pope":
        out = pope_scores([pope_says_yes(a) for a in said], [r["label"] == "yes" for r in records])
    elif kind == "choice":
        right = {str(r["id"]): choice_letter(a, r["options"]) == r["answer"] for a, r in zip(said, records)}
        out = {"accuracy": mean(right.values())}
        if any(int(r["id"]) >= CIRCULAR for r in records if str(r["id"]).isdigit()):
            out["circular_accuracy"] = circular_accuracy(right)
        categories = {r.get("category") for r in records} - {None}
        if len(categories) > 1:
            out["by_category"] = {c: mean(right[str(r["id"])] for r in records if r.get("category") == c)
                                  for c in sorted(categories)}
    else:
        raise ValueError(f"unknown task kind {kind!r}; one of vqa, caption, pope, choice")
    return {**out, "n": len(records)}


def mean(values):
    values = list(values)
    return sum(values) / len(values) if values else 0.0

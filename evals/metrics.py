"""
The official metrics of the paper's benchmarks, as plain functions of strings: nothing here sees a model.

- VQA accuracy (VQAv2, OK-VQA, TextVQA, VizWiz): evals/vqa.py, one rule per official evaluator.
- CIDEr-D and BLEU-4 on tokenised captions, equal to pycocoevalcap's Cider and Bleu(4) on the same tokens,
  quirks included (CIDEr-D's length penalty counts bigrams; BLEU's 1e-15 / 1e-9 smoothing, 'closest'
  reference length); the tokens are the Java PTB tokenizer's, as evals/ptb.py makes them. NoCaps adds
  CIDEr-D per domain (in, near, out), each domain scored on its own, idf included, as its server does.
- POPE: an answer is "no" when its first sentence has the word No, no or not (POPE's evaluate.py); accuracy,
  precision, recall and F1 with "yes" as the positive class, and the share of "yes".
- Multiple choice: evals/choice.py, VLMEvalKit's matching and MMBench's circular evaluation.
Each result names the evaluator it reproduces ("metric").

References: CIDEr (arXiv 1411.5726) and pycocoevalcap; BLEU (Papineni et al., ACL 2002); POPE (arXiv
2305.10355, its evaluate.py); NoCaps (arXiv 1812.08658) and its evaluation code (nocaps-org/updown-baseline).
"""
import math
from collections import Counter

from evals.choice import choice_scores
from evals.ptb import tokenize
from evals.stem import OKVQAStemmer
from evals.vqa import RULES, vqa_accuracy

# -----------------------------------------------------------------------------
# captions: tokenisation, BLEU-4, CIDEr-D

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
# a benchmark's score: reference records (evals/readers.py) and the answers to them


def score(kind, records, answers, rule=None):
    """kind 'vqa' | 'caption' | 'pope' | 'choice'; records: the readers' references; answers: {str(id): text}
    covering every record; rule: the VQA accuracy rule (evals/vqa.py), by default the one the readers name
    for the benchmark ("evaluator"). -> {metric: value in [0, 1] (CIDEr-D unbounded), "n": records scored,
    "metric": the evaluator reproduced, ...}."""
    said = [answers[str(r["id"])] for r in records]
    if kind == "vqa":
        rule = rule or next((r["evaluator"] for r in records if r.get("evaluator")), "vqa-api")
        if rule not in RULES:
            raise ValueError(f"unknown VQA accuracy rule {rule!r}; one of {', '.join(RULES)}")
        stem = OKVQAStemmer(records) if rule == "okvqa" else None
        right = [vqa_accuracy(a, r["answers"], rule, stem) for a, r in zip(said, records)]
        out = {"accuracy": mean(right), "metric": rule}
        types = {r.get("answer_type") for r in records} - {None}
        if len(types) > 1:  # the official report's per-answer-type rows (yes/no, number, other, unanswerable)
            out["by_answer_type"] = {t: mean(x for x, r in zip(right, records) if r.get("answer_type") == t)
                                     for t in sorted(types)}
    elif kind == "caption":
        candidates = {str(r["id"]): tokenize(a) for a, r in zip(said, records)}
        references = {str(r["id"]): [tokenize(c) for c in r["captions"]] for r in records}
        out = {"CIDEr": cider_d(candidates, references)[0], "BLEU-4": bleu4(candidates, references),
               "metric": "pycocoevalcap (PTB tokens)"}
        domains = sorted({r.get("domain") for r in records} - {None})
        if len(domains) > 1:  # NoCaps' in-, near- and out-domain rows
            out["CIDEr_by_domain"] = {d: cider_d(*subset(candidates, references, records, d))[0] for d in domains}
    elif kind == "pope":
        out = {**pope_scores([pope_says_yes(a) for a in said], [r["label"] == "yes" for r in records]),
               "metric": "POPE evaluate.py"}
    elif kind == "choice":
        out = {**choice_scores(said, records), "metric": "VLMEvalKit matching (exact)"}
    else:
        raise ValueError(f"unknown task kind {kind!r}; one of vqa, caption, pope, choice")
    return {**out, "n": len(records)}


def subset(candidates, references, records, domain):
    ids = {str(r["id"]) for r in records if r.get("domain") == domain}
    return {i: c for i, c in candidates.items() if i in ids}, {i: c for i, c in references.items() if i in ids}


def mean(values):
    values = list(values)
    return sum(values) / len(values) if values else 0.0

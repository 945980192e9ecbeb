"""The benchmarks' metrics against the official evaluators' rules: VQA accuracy as the VQA API, OpenFlamingo,
TextVQA's evaluator and the VizWiz API each compute it (every expected value below was checked against the
official code), CIDEr-D and BLEU-4 against pycocoevalcap, the caption tokenizer against the Java PTB tokenizer
(when Java is present), POPE's rule, and VLMEvalKit's multiple-choice matching and circular evaluation."""
import random
import shutil

import pytest

from evals import choice, metrics, readers
from evals.stem import OKVQAStemmer
from evals.vqa import normalize_answer, process_punctuation, vqa_accuracy

# -----------------------------------------------------------------------------
# VQA accuracy: the VQA API's rules (vqaEval.py), one case each


@pytest.mark.parametrize("text, out, rule", [
    ("yes/no", "yes no", "a mark that touches no space becomes a space"),
    ("hi !", "hi ", "a mark next to a space is deleted"),
    ("a-b - c", "ab  c", "the choice is made per mark for the whole text: one '-' touches a space, all go"),
    ("1,000", "1000", "a digit,digit comma anywhere: every mark is deleted, the digits join"),
    ("red, blue", "red blue", "', ' touches a space: deleted"),
    ("3.5", "3.5", "a period before a digit stays"),
    ("end.", "end", "a period not before a digit is removed"),
    ("2.", "2", "quirk: the period rule never looks behind, so '2.' loses its period"),
    ("don't", "don't", "apostrophes are not in the list"),
])
def test_vqa_punctuation(text, out, rule):
    assert process_punctuation(text) == out, rule


@pytest.mark.parametrize("text, out, rule", [
    ("Two dogs", "2 dogs", "number words to digits, after lower case"),
    ("none", "0", "'none' is a number word: 0"),
    ("The dog", "dog", "articles a / an / the dropped"),
    ("an apple", "apple", "articles"),
    ("dont know", "don't know", "contractions restored"),
    ("whats up", "what's up", "contractions restored"),
    ("  Yes\n", "yes", "newline / tab to space, strip, lower case"),
    ("ten\tpeople", "10 people", "tab to space, then number words"),
])
def test_vqa_normalisation(text, out, rule):
    assert normalize_answer(text) == out, rule


def test_vqa_accuracy_leave_one_out():
    """min(#matches among the other nine / 3, 1) for each of the ten answers left out, averaged."""
    others = ["cat", "dog", "bird", "fish", "cow", "pig", "hen", "ant", "bee", "owl"]
    for k, want in [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]:
        answers = ["yes"] * k + others[:10 - k]
        hand = sum(min((k - (i < k)) / 3, 1) for i in range(10)) / 10  # answer i left out
        assert vqa_accuracy("yes", answers) == pytest.approx(want) == pytest.approx(hand), k


# (prediction, ten answers, accuracy by rule: vqa-api, openflamingo, textvqa, vizwiz), each row checked against
# the official vqaEval.py, OpenFlamingo's vqa_metric.py, mmf's m4c_evaluator.py and the VizWiz API
RULE_CASES = [
    ("yes.", ["yes"] * 10, (0.0, 1.0, 1.0, 1.0)),  # the ten agree: the VQA API compares as typed
    ("Two", ["2"] * 10, (0.0, 1.0, 1.0, 1.0)),
    ("dog", ["a dog"] * 10, (0.0, 1.0, 1.0, 0.0)),  # VizWiz never normalises the human answers
    ("2000", ["2,000"] * 10, (0.0, 1.0, 1.0, 0.0)),
    ("stop", ["STOP"] * 10, (0.0, 1.0, 1.0, 0.0)),
    ("t-shirt", ["t-shirt"] * 10, (1.0, 1.0, 1.0, 0.0)),  # VizWiz: the prediction becomes 't shirt'
    ("dont", ["don't"] * 10, (0.0, 1.0, 1.0, 0.0)),  # VizWiz restores 'don’t', typographic apostrophe
    ("dont", ["dont"] * 5 + ["do not"] * 5, (1.0, 1.0, 1.0, 0.0)),
    ("man's hat", ["man 's hat"] * 10, (0.0, 0.0, 1.0, 0.0)),  # TextVQA splits "'s" off both sides
    ("Yes", ["yes"] * 9 + ["no"], (1.0, 1.0, 1.0, 1.0)),
    ("2", ["two"] * 2 + ["2"] + ["3"] * 7, (0.9, 0.9, 0.9, 0.3)),
    ("a" + "." * 40, ["a"] * 5 + ["b"] * 5, (0.0, 0.0, 0.0, 0.0)),  # quirk: only 32 periods are removed
    ("hello?", ["hello"] * 3 + ["hi"] * 7, (0.9, 0.9, 0.9, 0.9)),
    ("1,000", ["1000"] * 4 + ["one thousand"] * 6, (1.0, 1.0, 1.0, 1.0)),
    ("red, blue", ["red blue"] * 2 + ["red"] * 8, (0.6, 0.6, 0.6, 0.6)),
    ("yes/no", ["yes no"] * 3 + ["yes"] * 7, (0.9, 0.9, 0.9, 0.9)),
    ("The Dog!", ["dog"] * 10, (0.0, 1.0, 1.0, 1.0)),
    ("  yes\n", ["yes"] * 10, (1.0, 1.0, 1.0, 1.0)),
    ("unanswerable", ["unanswerable"] * 7 + ["no"] * 3, (1.0, 1.0, 1.0, 1.0)),
]


@pytest.mark.parametrize("prediction, answers, want", RULE_CASES)
def test_vqa_accuracy_as_each_official_evaluator(prediction, answers, want):
    got = tuple(vqa_accuracy(prediction, answers, rule) for rule in ("vqa-api", "openflamingo", "textvqa", "vizwiz"))
    assert got == pytest.approx(want, abs=1e-9)


def test_okvqa_stems_the_prediction_as_its_annotations_do():
    records = [{"id": 1, "answers": ["race"] * 10, "raw_answers": ["racing"] * 10, "evaluator": "okvqa"},
               {"id": 2, "answers": ["horse"] * 6 + ["pony"] * 4, "raw_answers": ["horses"] * 6 + ["ponies"] * 4,
                "evaluator": "okvqa"}]
    answers = {"1": "racing", "2": "Horses."}
    assert metrics.score("vqa", records, answers) == {"accuracy": 1.0, "metric": "okvqa", "n": 2}
    assert metrics.score("vqa", records, answers, "openflamingo")["accuracy"] == 0.0  # unstemmed: both miss
    assert OKVQAStemmer(records)("racing horses") == "race horse"


# -----------------------------------------------------------------------------
# captions: CIDEr-D and BLEU-4 equal pycocoevalcap on the same tokens


def random_corpus(seed, n_images=25):
    rng = random.Random(seed)
    words = "a man woman dog on the street with red bus sitting next to table two people riding".split()
    sentence = lambda: " ".join(rng.choice(words) for _ in range(rng.choice([1, 2, 3, 5, 8, 9, 12, 16])))
    refs = {i: [sentence() for _ in range(rng.randint(1, 6))] for i in range(n_images)}
    cands = {i: sentence() for i in range(n_images)}
    cands[0], cands[1] = refs[1][0], ""  # a caption equal to a reference of another image, and an empty one
    return cands, refs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cider_d_and_bleu4_equal_pycocoevalcap(seed):
    Cider = pytest.importorskip("pycocoevalcap.cider.cider").Cider
    Bleu = pytest.importorskip("pycocoevalcap.bleu.bleu").Bleu
    cands, refs = random_corpus(seed)
    ref_mean, ref_each = Cider().compute_score(refs, {i: [c] for i, c in cands.items()})
    mean, each = metrics.cider_d(cands, refs)
    assert mean == pytest.approx(ref_mean, abs=1e-6)
    assert [each[i] for i in sorted(each)] == pytest.approx(list(ref_each), abs=1e-6)
    bleu, _ = Bleu(4).compute_score(refs, {i: [c] for i, c in cands.items()}, verbose=0)
    assert metrics.bleu4(cands, refs) == pytest.approx(bleu[3], abs=1e-9)


@pytest.mark.parametrize("raw, tokens", [
    ("A man's hat.", "a man 's hat"),
    ("Don't stop!", "do n't stop"),
    ('He said "hi" (twice); then left.', "he said hi -lrb- twice -rrb- then left"),  # brackets are kept as words
    ("A t-shirt -- 1,000 of them, 3.5 each", "a t-shirt 1,000 of them 3.5 each"),
    ("They're 'here'", "they 're here"),
    ("At 3:45 p.m. in the U.S.", "at 3:45 p.m. in the u.s."),
    ("$5, 100% or #1?", "$ 5 100 % or # 1"),
    ("I cannot, we're gonna", "i can not we 're gon na"),
    ("\u201cWait\u2026\u201d she said", "wait she said"),
    ("Call 1 800 735 2929", "call 1 800\u00a0735\u00a02929"),  # PTB joins a phone number with no-break spaces
])
def test_caption_tokenizer(raw, tokens):
    """What the PTB tokenizer + pycocoevalcap's punctuation filter make of captions."""
    assert metrics.tokenize(raw) == tokens


HARD = ("a man 's hat | A Dog | The U.S. | u.s. army | 5 p.m. | 3:45 | 12:00:00 | $5 | $0.25 | $.50 | 100% | #1 | "
        "#hashtag | @name | cannot | Gonna | gotta | wanna | don't | can't | won't | it's | they're | I'm | we'll | "
        "o'clock | l'oreal | rock 'n' roll | (red) | [x] | {y} | \u201cquoted\u201d | \u2018single\u2019 | don\u2019t | "
        "wait\u2026 | wait... | well-done | t-shirt | yes/no | 1/2 | 1 1/2 | 12/25/2015 | 1,000 | 2.5 | .25 | -5 | "
        "a--b | a - b | at&t | A&W | x*y | a+b | www.google.com | google.com | a@b.com | http://x.com/a | Mr. Smith | "
        "St. Louis | jr. | e.g. | etc. | Inc. | no. 5 | ok. | x.y.z | ph.d. | 50\u00b0 | C++ | c# | 4x4 | 10am | "
        "10:30am | 9-5 | 1 800 735 2929 | (555) 123-4567 | wow!! | what?! | end. | a, b | a; b | 'em | '90s | 90's | "
        "x_y | ma'am | dogs' | fig. 3 | mich. | p.40 | h.264 | \u00a35 | \u2013 dash | STOP | caf\u00e9").split(" | ")


def test_caption_tokenizer_equals_java_ptb():
    """The Java PTBTokenizer pycocoevalcap runs (when Java is present) and ours, token for token, on 2,000
    captions built from the hard cases of real captions and answers."""
    ptb = pytest.importorskip("pycocoevalcap.tokenizer.ptbtokenizer")
    if shutil.which("java") is None:
        pytest.skip("no Java: the stand-in alone is tested")
    rng = random.Random(0)
    captions = [" ".join(rng.choice(HARD) for _ in range(rng.randint(1, 6))) for _ in range(2000)] + HARD
    java = ptb.PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
    differ = [(c, java[i][0], metrics.tokenize(c)) for i, c in enumerate(captions) if java[i][0] != metrics.tokenize(c)]
    assert not differ, differ[:5]

# -----------------------------------------------------------------------------
# POPE and multiple choice


@pytest.mark.parametrize("answer, yes", [
    ("Yes, there is a dog.", True), ("No, there is not.", False), ("There is no dog in the image.", False),
    ("I do not see one", False), ("yes. No wait", True), ("Nope", True),
    ("NO", True),  # quirk, kept: POPE's rule looks for the words No, no, not only
])
def test_pope_yes_rule(answer, yes):
    assert metrics.pope_says_yes(answer) is yes


def test_pope_scores_by_hand():
    s = metrics.pope_scores([True, True, False, False, True], [True, False, False, True, True])
    assert s == pytest.approx({"accuracy": 0.6, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "yes_ratio": 0.6})


OPTIONS = {"A": "a red car", "B": "a blue bus", "C": "two cats", "D": "a dog"}


@pytest.mark.parametrize("answer, letter", [  # each checked against VLMEvalKit's can_infer (2024)
    ("B", "B"), ("(C)", "C"), ("D. a dog", "D"), ("A) a red car", "A"), ("The answer is C.", "C"), ("Answer: B", "B"),
    ("two cats", "C"), ("I think it is B", "B"), ("A man is here", "A"), ("a bird", None), ("", None), ("E", None),
    ("A dog", "A"), ("The answer is B because A is wrong.", None), ("Z", "Z"), ("Cannot determine the answer", "Z"),
    ("b", None), ("B is right", "B"), ("It is a blue bus", "B"), ("a red car or a dog", None), ("**C**", "C"),
    ("[D]", "D"), ("{A}", "A"), ("C;", "C"), ("Option D", "D"), ("B, C", None), ("The dog", None), ("A cat", "A"),
    ("I", None), ("Failed to obtain answer via API", None), ("a dog.", "D"), ("answer: (A)", "A"),
    ("The correct option is (B) a blue bus.", "B"), ("B\nC", None), ("B/C", None),
])
def test_choice_letter_as_vlmevalkit(answer, letter):
    assert choice.choice_letter(answer, OPTIONS) == letter


def test_circular_rotations_and_categories():
    record = {"id": 7, "options": dict(OPTIONS), "answer": "B", "category": "color", "l2_category": "perception"}
    rotations = [choice.rotate(record, k) for k in range(4)]
    assert [r["id"] for r in rotations] == [7, 1_000_007, 2_000_007, 3_000_007]
    assert {r["options"][r["answer"]] for r in rotations} == {"a blue bus"}  # the answer follows its text
    assert [r["answer"] for r in rotations] == ["B", "A", "D", "C"]
    other = [choice.rotate({"id": 8, "options": dict(OPTIONS), "answer": "C", "category": "count",
                            "l2_category": "perception"}, k) for k in range(4)]
    third = [choice.rotate({"id": 9, "options": dict(OPTIONS), "answer": "D", "category": "count",
                            "l2_category": "reasoning"}, k) for k in range(4)]
    records = rotations + other + third
    said = [r["answer"] for r in records]
    said[2] = "Z"  # question 7 fails one rotation; 8 and 9 pass every one
    out = metrics.score("choice", records, {str(r["id"]): a for r, a in zip(records, said)})
    assert out["accuracy"] == pytest.approx(11 / 12) and out["circular_accuracy"] == pytest.approx(2 / 3)
    assert out["by_category"] == {"color": 0.0, "count": 1.0}  # circular per category, as VLMEvalKit reports
    assert out["by_l2_category"] == {"perception": 0.5, "reasoning": 1.0}


def test_partial_leaves_out_a_circular_question_missing_a_rotation():
    records = [choice.rotate({"id": i, "options": dict(OPTIONS), "answer": "B"}, k) for i in (1, 2) for k in range(4)]
    answers = {str(r["id"]): r["answer"] for r in records if r["id"] != 2_000_001}  # question 1's failing rotation
    answers["1"] = "Z"
    kept, _, missing = readers.match(records, answers, "p.json", partial=True)
    assert {r["id"] % 1_000_000 for r in kept} == {2} and missing == 4
    assert metrics.score("choice", kept, answers)["circular_accuracy"] == 1.0

# -----------------------------------------------------------------------------
# NoCaps per domain


def test_nocaps_cider_by_domain_equals_pycocoevalcap_on_each_domain():
    Cider = pytest.importorskip("pycocoevalcap.cider.cider").Cider
    cands, refs = random_corpus(3, n_images=30)
    domains = ["in-domain", "near-domain", "out-domain"]
    records = [{"id": i, "captions": refs[i], "domain": domains[i % 3]} for i in refs]
    out = metrics.score("caption", records, {str(i): c for i, c in cands.items()})
    for k, d in enumerate(domains):
        ids = [i for i in refs if i % 3 == k]
        want, _ = Cider().compute_score({i: refs[i] for i in ids}, {i: [cands[i]] for i in ids})
        assert out["CIDEr_by_domain"][d] == pytest.approx(want, abs=1e-9)


def test_cider_through_java_ptb_equals_ours_on_punctuation_heavy_captions():
    """pycocoevalcap end to end (the Java tokenizer, then Cider and Bleu) against metrics.score on 20 images of
    punctuation-heavy captions."""
    ptb = pytest.importorskip("pycocoevalcap.tokenizer.ptbtokenizer")
    Cider, Bleu = pytest.importorskip("pycocoevalcap.cider.cider").Cider, pytest.importorskip("pycocoevalcap.bleu.bleu").Bleu
    if shutil.which("java") is None:
        pytest.skip("no Java")
    rng = random.Random(1)
    caption = lambda: " ".join(rng.choice(HARD) for _ in range(rng.randint(3, 8)))
    refs = {i: [caption() for _ in range(5)] for i in range(20)}
    cands = {i: rng.choice(refs[i]) if i % 3 == 0 else caption() for i in range(20)}
    tok = ptb.PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": c} for c in refs[i]] for i in refs})
    res = tok.tokenize({i: [{"caption": cands[i]}] for i in cands})
    want_cider, want_bleu = Cider().compute_score(gts, res)[0], Bleu(4).compute_score(gts, res, verbose=0)[0][3]
    got = metrics.score("caption", [{"id": i, "captions": refs[i]} for i in refs], {str(i): c for i, c in cands.items()})
    assert got["CIDEr"] == pytest.approx(want_cider, abs=1e-9) and got["BLEU-4"] == pytest.approx(want_bleu, abs=1e-9)

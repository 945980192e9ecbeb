"""
VQA accuracy as each benchmark's own evaluator computes it. All share the leave-one-out rule (for each of the
ten human answers left out, min(matches among the other nine / 3, 1); the mean of the ten) and the VQA
normalisation (punctuation, lower case, number words, articles, contractions); they differ in what they
normalise and when:

    rule          prediction            human answers                     used by
    vqa-api       normalised only when the ten answers differ (else both  VQA API vqaEval.py (VQAv2 server)
                  compared as typed, stripped)
    openflamingo  always normalised     always normalised                 OpenFlamingo's vqa_metric.py: the
                                                                          paper's few-shot VQAv2 / OK-VQA
    okvqa         stemmed, normalised   always normalised                 the same, OK-VQA (stemmed answers)
    textvqa       EvalAI processor      EvalAI processor                  TextVQA's m4c evaluator
    vizwiz        normalised            never (as typed, not stripped)    VizWiz API (its older contractions)

The EvalAI processor (TextVQA) first lower-cases, deletes every ',' and '?', and splits "'s" off ("man's" ->
"man 's"), then normalises. Quirks kept, as all of them have them: the period rule meant to look behind a
digit only looks ahead ('2.' loses its period), and at most 32 periods are removed (re.UNICODE passed where
the count goes). The VizWiz API's contraction table is the VQA API's first one, whose restored forms carry a
typographic apostrophe (dont -> don’t): a prediction "dont" then matches no typed "don't".

References: VQA (arXiv 1505.00468) and GT-Vision-Lab/VQA vqaEval.py; OpenFlamingo (arXiv 2308.01390),
open_flamingo/eval/vqa_metric.py and ok_vqa_utils.py; TextVQA (arXiv 1904.08920) and mmf's m4c_evaluator.py
(EvalAIAnswerProcessor); VizWiz (arXiv 1802.08218) and its VQA API.
"""
import re

RULES = ("vqa-api", "openflamingo", "okvqa", "textvqa", "vizwiz")
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!"]  # vqaEval.py's list; "." is handled apart (periods below), apostrophes are kept
COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
COMMAS_IN_NUMBER = re.compile(r"(?<=\d)(,)+(?=\d)")  # the EvalAI processor's form of the same test
PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # quirk, kept: meant as a look-behind, it only checks "not before a digit"
MAX_PERIODS = 32  # quirk, kept: the evaluators pass re.UNICODE (32) where re.sub takes its count
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


def curly(text, keep):
    return text if text in keep else text.replace("'", "\u2019")


# The VizWiz API's table: the same pairs, typographic apostrophes everywhere but in these (as it has them)
CONTRACTIONS_CURLY = {curly(k, {"couldn'tve", "hadn'tve"}): curly(v, {"ain't", "aren't", "can't", "could've",
                      "couldn't", "we've", "where's", "who've"}) for k, v in CONTRACTIONS.items()}


def strip_answer(text):
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text, number=COMMA_IN_NUMBER):
    """A mark is deleted everywhere if it touches a space anywhere in the text, or if the text has a digit,digit
    comma ('1,000' -> '1000'); else each is replaced by a space ('yes/no' -> 'yes no'). Then a period not
    before a digit goes (the first 32)."""
    out, joined = text, number.search(text) is not None
    for p in PUNCTUATION:
        out = out.replace(p, "" if (p + " " in text or " " + p in text or joined) else " ")
    return PERIOD.sub("", out, count=MAX_PERIODS)


def process_digits_articles(text, contractions=CONTRACTIONS):
    """Lower case, number words to digits, articles dropped, contractions restored, single spaces."""
    words = [NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(contractions.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(text):
    """The VQA API's normalisation of one answer (newlines and tabs to spaces, strip first)."""
    return process_digits_articles(process_punctuation(strip_answer(text)))


def evalai_normalize(text):
    """The EvalAI answer processor of TextVQA's evaluator: commas and '?' deleted, "'s" split off first."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return process_digits_articles(process_punctuation(strip_answer(text), COMMAS_IN_NUMBER))


def leave_one_out(prediction, answers):
    matches = [a == prediction for a in answers]
    total = sum(matches)
    return sum(min((total - m) / 3, 1.0) for m in matches) / len(answers)  # leave answer i out, for each i


def vqa_accuracy(prediction, answers, rule="vqa-api", stem=None):
    """The accuracy of one prediction against the human answers (ten in the official files), in [0, 1], by
    `rule` (RULES). `stem`: OK-VQA's stemming of the prediction (rule okvqa), a function of a string."""
    if rule == "textvqa":
        return leave_one_out(evalai_normalize(prediction), [evalai_normalize(a) for a in answers])
    if rule == "vizwiz":
        prediction = process_digits_articles(process_punctuation(strip_answer(prediction)), CONTRACTIONS_CURLY)
        return leave_one_out(prediction, answers)
    prediction, answers = strip_answer(prediction), [strip_answer(a) for a in answers]
    if rule == "vqa-api" and len(set(answers)) == 1:
        return leave_one_out(prediction, answers)  # the ten agree: compared as typed
    if rule == "okvqa" and stem is not None:
        prediction = stem(prediction)
    elif rule not in RULES:
        raise ValueError(f"unknown VQA accuracy rule {rule!r}; one of {', '.join(RULES)}")
    return leave_one_out(normalize_answer(prediction), [normalize_answer(a) for a in answers])

"""
OK-VQA's stemming of a prediction, before VQA accuracy (OpenFlamingo's ok_vqa_utils.py, the paper's few-shot
protocol). OK-VQA scores against stemmed answers: each human answer's "answer" field is its "raw_answer"
stemmed ("racing" -> "race", "horses" -> "horse"), so an unstemmed prediction would miss them.

The official stemmer tags parts of speech with NLTK, lemmatises "-ing" words as verbs with WordNet and
singularises plural nouns with the inflection package, plus a table of manual fixes; that needs NLTK's data
files, which this project does not depend on. Here the stemming is learnt from the annotation file itself:
every word of a raw answer whose stemmed answer has as many words gives a word -> stem pair (the most frequent
stem wins), and a prediction's words are mapped through them. On a word the annotations hold this is the
official stem as the dataset's authors applied it; a word they never wrote is left as it is (the official
stemmer may still change it). `eval.py score --metric openflamingo` scores without stemming.

References: OK-VQA (arXiv 1906.00067); OpenFlamingo (arXiv 2308.01390), open_flamingo/eval/ok_vqa_utils.py.
"""
import re
from collections import Counter

WORDS = re.compile(r"\w+(?:'\w+)?|[^\w\s]")  # words and single marks, as a Treebank tokenizer splits them


class OKVQAStemmer:
    """stem(text) -> the text with each word replaced by its stem as OK-VQA's annotations give it."""

    def __init__(self, records):
        pairs = Counter()
        for r in records:
            for raw, stemmed in zip(r.get("raw_answers") or [], r.get("answers") or []):
                a, b = raw.split(), stemmed.split()
                if len(a) == len(b):
                    pairs.update(zip(a, b))
        best = {}
        for (word, stem), n in pairs.most_common():
            best.setdefault(word, stem)  # most_common: the most frequent stem of each word comes first
        self.stems = best

    def __call__(self, text):
        return " ".join(self.stems.get(w.lower(), w) for w in WORDS.findall(text))  # scoring lower-cases after

"""
The caption tokenizer pycocoevalcap runs before BLEU and CIDEr-D, in Python: Stanford CoreNLP 3.4.1's
PTBTokenizer (-preserveLines -lowerCase, a Java program) followed by pycocoevalcap's punctuation filter.
What the Java tokenizer does, and this file with it:

- clitics split off: "don't" -> "do n't", "can't" -> "ca n't", "man's" -> "man 's"; "cannot" -> "can not",
  "gonna" -> "gon na", "'twas" -> "'t was"; "o'clock" and "l'oreal" stay whole;
- $ # % & and other symbols are tokens of their own ("$5" -> "$ 5", "100%" -> "100 %", "#1" -> "# 1"), but
  numbers keep their inner , . : / - ("1,000", "3:45", "12/25/2015", "9-5") and words their inner - / .
  ("t-shirt", "yes/no", "x.com");
- abbreviations keep their period ("u.s.", "p.m.", "mr.", "st.", "x."), other words lose it;
- brackets become -lrb- -rrb- -lsb- -rsb- -lcb- -rcb-; pycocoevalcap's filter, written for upper-case
  tokens, never removes them after -lowerCase, so they are scored as words;
- quotes (typographic too), periods, commas, colons, semicolons, '?', '!', '-', '--', '...' and '…' are
  dropped by the filter; runs such as "?!" or "!!" are tokens and stay.

It is not the whole Java lexer: phone numbers, some rare abbreviations and mixed-case forms such as "A&W"
follow simpler rules here. tests/test_ptb.py runs the Java tokenizer, where Java is present, on a sample
and compares token for token.

References: pycocoevalcap tokenizer/ptbtokenizer.py; Stanford CoreNLP 3.4.1, PTBLexer.flex.
"""
import re

DROPPED = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"}  # pycocoevalcap's filter
BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
TYPOGRAPHY = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2026": "...",
                            "\u00ab": '"', "\u00bb": '"', "\u2013": "--", "\u2014": "--", "\u00a3": "#",
                            "\u20ac": "$", "\u00a0": " "})  # PTB's normalisations (£ -> #, € -> $)
ABBREVIATIONS = ("mr mrs ms dr drs prof st jr sr vs etc inc co cos corp ltd ft mt ave blvd rd bros dept univ assn "
                 "intl gen rev capt sgt col lt gov sen rep est tel ext sq jan feb mar apr jun jul aug sep sept oct "
                 "nov dec mon tue tues wed thu thur thurs fri fig pp op calif fla ariz conn colo minn wis mo ky tenn ala okla "
                 "kan neb nev md vt va ga mich").split()
SPLIT_WORDS = [(re.compile(r"\b(can)(not)\b", re.I), r"\1 \2"), (re.compile(r"\b(gon|got|wan)(na|ta)\b", re.I), r"\1 \2"),
               (re.compile(r"\b(lem|gim)(me)\b", re.I), r"\1 \2"), (re.compile(r"(?<!\w)('t)(is|was)\b", re.I), r"\1 \2")]
CLITIC = r"(?:s|re|ve|ll|d|m)\b"
LETTER = r"[^\W\d_]"
WORD = r"(?:\w|[\u0300-\u036f\u064b-\u065f])"  # word characters, combining marks included
JOINED = re.compile("|".join([  # a phone number or a mixed fraction: one token, its spaces made no-break
    r"(?:\(\d{2,3}\) ?|(?:\d{2,4}[- ])?\d{2,4}[- /])\d{3,4}[- ]?\d{3,5}(?!\d)",
    r"\d{1,4}[- ]\d{1,4}/\d{1,4}(?!\d)|\d{1,4}/\d{1,4}(?![/\w])"]))
TOKEN = re.compile("|".join([
    r"(?<!\w)(?:" + JOINED.pattern + ")",                       # 1 800 735 2929, 1 1/2, (555) 123-4567
    r"(?:https?://|www\.)\S*[^\s.,;:!?)\]]",                      # a web address, whole
    r"[\w.+-]+@\w[\w-]*(?:\.\w[\w-]*)+",                          # an e-mail address
    r"(?-i:[A-Z]+&[A-Z]+)",                                       # A&W, P&G (upper case only)
    rf"{LETTER}(?:\.{LETTER})+\.?(?!\w)",                          # u.s. / p.m. / e.g. / a.m
    rf"(?:{'|'.join(ABBREVIATIONS)})\.(?!{LETTER})|(?:ph|ed)\.d\.",  # mr. st. ph.d.
    r"no\.(?=\s*\d)",                                             # no. 5
    rf"{LETTER}\.(?!{LETTER})",                                   # an initial: j. / x. / p.40
    r"[-+]?\d+(?:[.,:]\d+)+|[-+]?[.:]\d+|[-+]\d+",                # 1,000 3:45 2.0 .25 :30 -5
    rf"n't\b|'{CLITIC}|'em|'n'|'\d0s\b",                          # clitics, 'em, 'n', '90s
    rf"[#@]{LETTER}\w*",                                          # #hashtag, @name
    r"c\+\+|[cf]#",                                               # C++, C#
    r"</?[a-z]\w*>",                                              # an SGML tag: <b>
    rf"ma'am|{LETTER}'(?={LETTER})(?!{CLITIC})\w+|{LETTER}\w*(?:\.{LETTER}\w*)+(?:/[^\W_][\w-]*)*",  # o'clock; x.com/a
    rf"(?!n't\b)[^\W_](?:(?!n't\b){WORD}|[-/](?=[^\W_]))*",          # a word, t-shirt, yes/no
    r"\.{2,}|[?!]+|-{2,}|``|''",                                  # runs of marks
    r"\S",                                                        # any other mark, alone
]), re.I)


def bracketed(token):
    """Brackets as PTB writes them, alone or inside a phone number: '(555) 123' -> '-lrb-555-rrb- 123'."""
    for mark, name in BRACKETS.items():
        token = token.replace(mark, name)
    return token


def tokenize(caption):
    """PTB tokens of one caption, lower case, joined by spaces, without the marks pycocoevalcap drops:
    'A man's hat (red).' -> "a man 's hat -lrb- red -rrb-"."""
    text = caption.replace("\n", " ").translate(TYPOGRAPHY)
    for pattern, repl in SPLIT_WORDS:
        text = pattern.sub(repl, text)
    tokens = (bracketed(t).lower().replace(" ", "\u00a0") for t in TOKEN.findall(text))
    return " ".join(t for t in tokens if t not in DROPPED and t.strip(".") and not t.startswith('"'))

"""Answer scoring: the official VQA accuracy (VQAv2, VizWiz) and multiple choice (MMMU).

`vqa_accuracy` follows the official evaluation script (GT-Vision-Lab/VQA,
`PythonEvaluationTools/vqaEvaluation/vqaEval.py`) step by step, its quirks included, so
that numbers read beside published ones: the prediction is stripped of punctuation, then
lower-cased, number words become digits, articles go and contractions get their
apostrophe; the ground-truth answers (already normalised by the dataset) only lose
punctuation, and only when the annotators disagree. The accuracy is
min(#matching annotators / 3, 1), averaged over the ten leave-one-out subsets of annotators.

`extract_choice` follows MMMU's `parse_multi_choice_response`: "(B)", then a bare " B ",
then an option's text; of several candidates the last one mentioned wins. Where MMMU
then guesses at random, this returns None (scored wrong), so a run is deterministic.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

from xvila.evaluation.stats import EvaluationError

# The official table, curly apostrophes and all: a prediction "dont" becomes "don’t".
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn’t’ve", "couldnt’ve": "couldn’t’ve", "didnt": "didn’t", "doesnt": "doesn’t",
    "dont": "don’t", "hadnt": "hadn’t", "hadnt’ve": "hadn’t’ve", "hadn'tve": "hadn’t’ve", "hasnt": "hasn’t",
    "havent": "haven’t", "hed": "he’d", "hed’ve": "he’d’ve", "he’dve": "he’d’ve", "hes": "he’s", "howd": "how’d",
    "howll": "how’ll", "hows": "how’s", "Id’ve": "I’d’ve", "I’dve": "I’d’ve", "Im": "I’m", "Ive": "I’ve",
    "isnt": "isn’t", "itd": "it’d", "itd’ve": "it’d’ve", "it’dve": "it’d’ve", "itll": "it’ll", "let’s": "let’s",
    "maam": "ma’am", "mightnt": "mightn’t", "mightnt’ve": "mightn’t’ve", "mightn’tve": "mightn’t’ve",
    "mightve": "might’ve", "mustnt": "mustn’t", "mustve": "must’ve", "neednt": "needn’t", "notve": "not’ve",
    "oclock": "o’clock", "oughtnt": "oughtn’t", "ow’s’at": "’ow’s’at", "’ows’at": "’ow’s’at",
    "’ow’sat": "’ow’s’at", "shant": "shan’t", "shed’ve": "she’d’ve", "she’dve": "she’d’ve", "she’s": "she’s",
    "shouldve": "should’ve", "shouldnt": "shouldn’t", "shouldnt’ve": "shouldn’t’ve", "shouldn’tve": "shouldn’t’ve",
    "somebody’d": "somebodyd", "somebodyd’ve": "somebody’d’ve", "somebody’dve": "somebody’d’ve",
    "somebodyll": "somebody’ll", "somebodys": "somebody’s", "someoned": "someone’d", "someoned’ve": "someone’d’ve",
    "someone’dve": "someone’d’ve", "someonell": "someone’ll", "someones": "someone’s", "somethingd": "something’d",
    "somethingd’ve": "something’d’ve", "something’dve": "something’d’ve", "somethingll": "something’ll",
    "thats": "that’s", "thered": "there’d", "thered’ve": "there’d’ve", "there’dve": "there’d’ve",
    "therere": "there’re", "theres": "there’s", "theyd": "they’d", "theyd’ve": "they’d’ve", "they’dve": "they’d’ve",
    "theyll": "they’ll", "theyre": "they’re", "theyve": "they’ve", "twas": "’twas", "wasnt": "wasn’t",
    "wed’ve": "we’d’ve", "we’dve": "we’d’ve", "weve": "we've", "werent": "weren’t", "whatll": "what’ll",
    "whatre": "what’re", "whats": "what’s", "whatve": "what’ve", "whens": "when’s", "whered": "where’d",
    "wheres": "where's", "whereve": "where’ve", "whod": "who’d", "whod’ve": "who’d’ve", "who’dve": "who’d’ve",
    "wholl": "who’ll", "whos": "who’s", "whove": "who've", "whyll": "why’ll", "whyre": "why’re", "whys": "why’s",
    "wont": "won’t", "wouldve": "would’ve", "wouldnt": "wouldn’t", "wouldnt’ve": "wouldn’t’ve",
    "wouldn’tve": "wouldn’t’ve", "yall": "y’all", "yall’ll": "y’all’ll", "y’allll": "y’all’ll",
    "yall’d’ve": "y’all’d’ve", "y’alld’ve": "y’all’d’ve", "y’all’dve": "y’all’d’ve", "youd": "you’d",
    "youd’ve": "you’d’ve", "you’dve": "you’d’ve", "youll": "you’ll", "youre": "you’re", "youve": "you’ve",
}
NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
           "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
# The official pattern is "(?!<=\d)(\.)(?!\d)" - a typo for a look-behind that in effect
# strips every period not followed by a digit; kept as written.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_NUMBER = re.compile(r"(\d)(,)(\d)")


def _strip_punctuation(text: str) -> str:
    out = text
    for p in PUNCT:
        # A mark next to a space, or any text with a "1,000"-style number, loses the mark;
        # otherwise the mark separates words ("yes/no" -> "yes no").
        if (p + " " in text or " " + p in text) or _COMMA_NUMBER.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # The official call passes re.UNICODE (32) where `count` goes: at most 32 periods go.
    return _PERIOD.sub("", out, count=re.UNICODE)


def _digits_articles(text: str) -> str:
    words = [NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(answer: str) -> str:
    """A predicted answer as the official script compares it."""
    return _digits_articles(_strip_punctuation(" ".join(answer.replace("\n", " ").replace("\t", " ").split())))


def _gt_text(item) -> str:
    if isinstance(item, dict):  # the official annotation format: {"answer": ..., ...}
        item = item.get("answer")
    if not isinstance(item, str):
        raise EvaluationError(f"a ground-truth answer must be a string or {{'answer': str}}, not {item!r}")
    return item


def vqa_accuracy(answer: str, gt_answers: Sequence) -> float:
    """The official VQA accuracy of one predicted answer against the annotators' answers
    (strings, or the annotation format's {"answer": ...} dicts): a number in [0, 1]."""
    gts = [_gt_text(a) for a in gt_answers]
    if not gts:
        raise EvaluationError("vqa_accuracy needs at least one ground-truth answer")
    if len(set(gts)) > 1:
        gts = [_strip_punctuation(a) for a in gts]
    pred = normalize_answer(answer)
    scores = []
    for i in range(len(gts)):
        matches = sum(1 for j, gt in enumerate(gts) if j != i and gt == pred)
        scores.append(min(1.0, matches / 3.0))
    return sum(scores) / len(scores)


# ------------------------------------------------------------------ multiple choice
LETTERS = string.ascii_uppercase


def choice_prompt(question: str, options: Sequence[str]) -> str:
    """MMMU's multiple-choice prompt (as LLaVA evaluates it)."""
    lines = [question.strip()] + [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)]
    return "\n".join(lines) + "\nAnswer with the option's letter from the given choices directly."


def extract_choice(reply: str, options: Sequence[str]) -> str | None:
    """The letter a free-form reply chooses among `options` (A, B, ...), or None."""
    letters = LETTERS[: len(options)]
    text = " " + reply.strip().strip(string.punctuation.replace("(", "").replace(")", "")) + " "
    candidates = [c for c in letters if f"({c})" in text]
    if not candidates:
        candidates = [c for c in letters if f" {c} " in text or f" {c}." in text or f" {c}," in text
                      or f" {c}:" in text or f" {c})" in text]
    if candidates:
        # Several letters mentioned ("not A but B"): the last one mentioned is the choice.
        return max(candidates, key=lambda c: max(text.rfind(f"({c})"), text.rfind(f" {c}")))
    if len(text.split()) > 5 or any(o.strip() and o.lower() in text.lower() for o in options):
        found = [(text.lower().rfind(o.lower()), letters[i]) for i, o in enumerate(options) if o.strip()]
        found = [f for f in found if f[0] >= 0]
        if found:
            return max(found)[1]
    return None


def choice_accuracy(reply: str, options: Sequence[str], answer: str) -> float:
    """1.0 when the reply chooses the letter `answer`, else 0.0."""
    if not options:
        raise EvaluationError("a multiple-choice question needs options")
    answer = answer.strip().upper()
    if answer not in LETTERS[: len(options)]:
        raise EvaluationError(f"the answer {answer!r} is not one of the {len(options)} options' letters")
    return 1.0 if extract_choice(reply, options) == answer else 0.0

"""A toy sentiment task in the SST-2 layout, generated from templates, for the task quick-start."""

from __future__ import annotations

import random
import sys
from pathlib import Path

_SUBJECTS = ("the film", "this movie", "the plot", "the acting", "the script", "the soundtrack", "the ending",
             "the dialogue", "the cast", "the story", "the direction", "the camera work", "this sequel",
             "the lead performance", "the pacing", "the humour", "the final act", "the premise")
_POSITIVE = ("wonderful", "moving", "clever", "delightful", "gripping", "charming", "brilliant", "funny",
             "beautiful", "touching", "sharp", "memorable", "warm", "inventive", "thrilling", "superb")
_NEGATIVE = ("dull", "tedious", "clumsy", "boring", "predictable", "lifeless", "shallow", "messy", "bland",
             "forgettable", "painful", "flat", "confusing", "awkward", "tiresome", "weak")
_ADVERBS = ("", "really ", "truly ", "quite ", "remarkably ", "simply ", "rather ", "consistently ")
_TEMPLATES = ("{s} is {a}{w} .", "i found {s} {a}{w} .", "{s} was {a}{w} from start to finish .",
              "honestly , {s} is {a}{w} .", "{s} feels {a}{w} and {w2} .", "what a {w} experience ; {s} is {w2} .",
              "everyone says {s} is {a}{w} , and they are right .")
# Two clauses of opposite sentiment; the label is the main clause's ({w}: after "but", "although",
# "still", before "even though"), so word counting alone cannot solve them.
_CONTRAST = ("{s} is {o} , but {s2} is {a}{w} .", "although {s} is {o} , {s2} is {a}{w} .",
             "{s2} is {a}{w} , even though {s} is {o} .", "{s} was {o} ; still , {s2} was {a}{w} .")


def write_toy_sentiment(out_dir, train_size: int = 500, dev_size: int = 250, seed: int = 0) -> None:
    """A small sentiment task in the SST-2 file layout (``train.tsv``, ``dev.tsv``), from templates.

    Written for the task quick-start: every sentence is generated here (no third-party text). About
    a third of the sentences join two clauses of opposite sentiment ("the plot is dull , but the cast
    is superb ."), and a fifth of the simple ones flip their label with a negation ("is not
    wonderful"), so a model has to read the structure, not count words. Train and dev share no
    sentence.
    """
    rng = random.Random(seed)
    seen: set[str] = set()

    def sentence() -> tuple[str, int]:
        label = rng.randrange(2)
        words, other = (_POSITIVE, _NEGATIVE) if label else (_NEGATIVE, _POSITIVE)
        w, w2 = rng.sample(words, 2)
        s, s2 = rng.sample(_SUBJECTS, 2)
        adverb = rng.choice(_ADVERBS)
        if rng.random() < 0.35:
            return rng.choice(_CONTRAST).format(s=s, s2=s2, a=adverb, w=w, o=rng.choice(other)), label
        text = rng.choice(_TEMPLATES).format(s=s, a=adverb, w=w, w2=w2)
        if " is " in text and rng.random() < 0.2:
            text, label = text.replace(" is ", " is not ", 1), 1 - label
        return text, label

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, size in (("train.tsv", train_size), ("dev.tsv", dev_size)):
        rows = []
        while len(rows) < size:
            text, label = sentence()
            if text not in seen:
                seen.add(text)
                rows.append(f"{text}\t{label}\n")
        (out / name).write_text("sentence\tlabel\n" + "".join(rows), encoding="utf-8")


if __name__ == "__main__":  # python -m mlkd_scale.tasks.glue.toy DIR: the quick-start's toy SST-2
    write_toy_sentiment(sys.argv[1])

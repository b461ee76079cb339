"""Translation scores: sacreBLEU corpus BLEU-4 and ROUGE-L, and the prediction files
that `raylab eval-translations` scores.

    from models.translator.metrics import score_files
    scores = score_files("test_pres.txt", "test_refs.txt", tokenize="13a")
    print(scores.bleu, scores.rouge_l)

BLEU is sacreBLEU's `corpus_bleu` (one reference per sentence, default
smoothing) with its `13a` tokenizer for English or `zh` for Chinese (every CJK
character a token). ROUGE-L is computed here, on the same tokens BLEU sees: the
longest common subsequence F1 (beta = 1) of each sentence pair, averaged over
sentences, times 100. An empty pair scores 1 (both say nothing) and a one-sided
empty one 0. This is the usual sentence-level ROUGE-L; the Uni-Sign code that
wrote the reference files uses a beta = 1.2 variant, so its ROUGE figures are
not comparable to these, while its BLEU figures are (README of the fixtures).

Prediction files hold one line per sentence, paired by sample id:

    sample: <id>, prediction: <text>        (predictions file)
    sample: <id>, ground-truth: <text>      (references file)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

TOKENIZERS = ("13a", "zh")
_KINDS = ("prediction", "ground-truth")


class TranslationFileError(ValueError):
    """A predictions/references file is missing or malformed; the message names the file and line."""


@dataclass(frozen=True)
class TranslationScores:
    bleu: float  # corpus BLEU-4, 0-100
    rouge_l: float  # mean sentence ROUGE-L F1, 0-100
    sentences: int
    tokenize: str


def _check_tokenize(tokenize: str) -> None:
    if tokenize not in TOKENIZERS:
        raise ValueError(f"tokenize must be one of {', '.join(TOKENIZERS)} (got {tokenize!r}).")


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str], tokenize: str = "13a") -> float:
    """sacreBLEU corpus BLEU-4 of `hypotheses` against one reference each (0-100)."""
    import sacrebleu

    _check_tokenize(tokenize)
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references.")
    if not hypotheses:
        return 0.0
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)], tokenize=tokenize).score)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists (O(len(a) * len(b)))."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(hypotheses: Sequence[str], references: Sequence[str], tokenize: str = "13a") -> float:
    """Mean sentence-level ROUGE-L F1 (0-100) on sacreBLEU's `tokenize` tokens."""
    from sacrebleu.metrics import BLEU

    _check_tokenize(tokenize)
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references.")
    if not hypotheses:
        return 0.0
    tokenizer = BLEU(tokenize=tokenize).tokenizer
    total = 0.0
    for hyp, ref in zip(hypotheses, references):
        h, r = tokenizer(hyp.strip()).split(), tokenizer(ref.strip()).split()
        if not h or not r:
            total += float(not h and not r)
            continue
        common = lcs_length(h, r)
        if common:
            precision, recall = common / len(h), common / len(r)
            total += 2 * precision * recall / (precision + recall)
    return 100.0 * total / len(hypotheses)


def read_translations(path: str | Path, kind: str) -> dict[str, str]:
    """`{sample id: text}` from a file of `sample: <id>, <kind>: <text>` lines (blank lines skipped)."""
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS} (got {kind!r}).")
    path = Path(path)
    if not path.is_file():
        raise TranslationFileError(f"the {kind} file {path} does not exist.")
    marker = f", {kind}:"
    texts: dict[str, str] = {}
    first_line: dict[str, int] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise TranslationFileError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}).") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        head, sep, text = line.partition(marker)
        if not line.startswith("sample: ") or not sep or not head[len("sample: "):].strip():
            raise TranslationFileError(
                f"{path} line {number} is malformed: expected 'sample: <id>, {kind}: <text>', got {line[:80]!r}."
            )
        sample_id = head[len("sample: "):].strip()
        if sample_id in texts:
            raise TranslationFileError(
                f"{path} line {number} repeats sample {sample_id!r} already given on line {first_line[sample_id]}."
            )
        texts[sample_id] = text.strip()
        first_line[sample_id] = number
    return texts


def _name_some(ids: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(i) for i in ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def pair_translations(predictions: dict[str, str], references: dict[str, str], pred_path: str | Path, ref_path: str | Path) -> tuple[list[str], list[str]]:
    """Hypotheses and references in the references' order; an id on one side only is an error."""
    only_pred = [i for i in predictions if i not in references]
    only_ref = [i for i in references if i not in predictions]
    if only_pred or only_ref:
        problems = []
        if only_ref:
            problems.append(f"{len(only_ref)} sample(s) of {ref_path} have no prediction in {pred_path} ({_name_some(only_ref)})")
        if only_pred:
            problems.append(f"{len(only_pred)} sample(s) of {pred_path} have no reference in {ref_path} ({_name_some(only_pred)})")
        raise TranslationFileError("; ".join(problems) + ".")
    ids = list(references)
    return [predictions[i] for i in ids], [references[i] for i in ids]


def score_translations(hypotheses: Sequence[str], references: Sequence[str], tokenize: str = "13a") -> TranslationScores:
    return TranslationScores(
        bleu=corpus_bleu(hypotheses, references, tokenize),
        rouge_l=rouge_l(hypotheses, references, tokenize),
        sentences=len(hypotheses),
        tokenize=tokenize,
    )


def score_files(predictions: str | Path, references: str | Path, tokenize: str = "13a") -> TranslationScores:
    """Score a predictions file against a references file (see the module docstring for the format)."""
    _check_tokenize(tokenize)
    hyps, refs = pair_translations(
        read_translations(predictions, "prediction"), read_translations(references, "ground-truth"), predictions, references
    )
    if not refs:
        raise TranslationFileError(f"{references} holds no sentences.")
    return score_translations(hyps, refs, tokenize)

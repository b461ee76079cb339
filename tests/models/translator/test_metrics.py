"""BLEU-4 / ROUGE-L and `raylab eval-translations`: the published Uni-Sign figures
reproduced to two decimals from the fixture files, and every malformed input named."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from models.translator.metrics import (
    TranslationFileError, corpus_bleu, lcs_length, read_translations, rouge_l, score_files,
)
from raylab.cli import app

FIXTURES = Path(__file__).parent / "slt_predictions"
PUBLISHED = [("how2sign", "13a", 14.50, 2349), ("openasl", "13a", 22.64, 976), ("csl_daily", "zh", 25.70, 1176)]


def fixture(name: str, kind: str) -> Path:
    return FIXTURES / f"eval_{name}_pose_only_test_{kind}.txt"


@pytest.mark.parametrize("name,tokenize,bleu,sentences", PUBLISHED)
def test_published_bleu_reproduced_to_two_decimals(name, tokenize, bleu, sentences):
    scores = score_files(fixture(name, "pres"), fixture(name, "refs"), tokenize)
    assert f"{scores.bleu:.2f}" == f"{bleu:.2f}"
    assert scores.sentences == sentences
    assert 0 < scores.rouge_l < 100


def test_cli_prints_the_figures_and_exit_codes():
    runner = CliRunner()
    result = runner.invoke(app, ["eval-translations", str(fixture("csl_daily", "pres")), str(fixture("csl_daily", "refs")), "--tokenize", "zh"])
    assert result.exit_code == 0, result.output
    assert "BLEU-4  25.70" in result.output and "ROUGE-L" in result.output
    # Only the tokenizers the translator documents are accepted; a bad option is a usage error (2).
    result = runner.invoke(app, ["eval-translations", str(fixture("csl_daily", "pres")), str(fixture("csl_daily", "refs")), "--tokenize", "intl"])
    assert result.exit_code == 2 and "--tokenize" in result.output
    result = runner.invoke(app, ["eval-translations", str(fixture("openasl", "pres")), str(fixture("how2sign", "refs"))])
    assert result.exit_code == 2 and "no prediction" in result.output


def test_pairing_is_by_id_not_by_line_order(tmp_path):
    (tmp_path / "p.txt").write_text("sample: b, prediction: the cat sat down\nsample: a, prediction: hello there my friend\n", encoding="utf-8")
    (tmp_path / "r.txt").write_text("sample: a, ground-truth: hello there my friend\nsample: b, ground-truth: the cat sat down\n", encoding="utf-8")
    scores = score_files(tmp_path / "p.txt", tmp_path / "r.txt")
    assert scores.bleu == pytest.approx(100.0) and scores.rouge_l == pytest.approx(100.0)


def test_ids_with_commas_colons_and_empty_predictions(tmp_path):
    (tmp_path / "p.txt").write_text("sample: x-00:00:05.333-00:00:11.166.mp4, prediction: \nsample: a,b, prediction: yes\n", encoding="utf-8")
    texts = read_translations(tmp_path / "p.txt", "prediction")
    assert texts == {"x-00:00:05.333-00:00:11.166.mp4": "", "a,b": "yes"}


@pytest.mark.parametrize("content,message", [
    ("sample: a, prediction: ok\nthis line is wrong\n", "line 2 is malformed"),
    ("sample: a, ground-truth: wrong kind\n", "line 1 is malformed"),
    ("sample: , prediction: no id\n", "line 1 is malformed"),
    ("sample: a, prediction: one\n\nsample: a, prediction: two\n", "line 3 repeats sample 'a' already given on line 1"),
])
def test_malformed_prediction_files_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "p.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(TranslationFileError, match=message) as info:
        read_translations(path, "prediction")
    assert str(path) in str(info.value)


def test_ids_missing_on_either_side_are_named(tmp_path):
    (tmp_path / "p.txt").write_text("sample: a, prediction: x\nsample: extra, prediction: y\n", encoding="utf-8")
    (tmp_path / "r.txt").write_text("sample: a, ground-truth: x\nsample: lost, ground-truth: z\n", encoding="utf-8")
    with pytest.raises(TranslationFileError) as info:
        score_files(tmp_path / "p.txt", tmp_path / "r.txt")
    assert "'lost'" in str(info.value) and "'extra'" in str(info.value)
    with pytest.raises(TranslationFileError, match="does not exist"):
        score_files(tmp_path / "missing.txt", tmp_path / "r.txt")


def test_rouge_l_is_the_lcs_f_measure_on_bleu_tokens():
    assert lcs_length("a b c d e".split(), "a c e x".split()) == 3
    # hyp 4 tokens, ref 5, LCS 3: P = 3/4, R = 3/5, F1 = 2PR/(P+R) = 2/3.
    assert rouge_l(["a c e x"], ["a b c d e"]) == pytest.approx(100 * 2 / 3)
    assert rouge_l(["same words"], ["same words"]) == pytest.approx(100.0)
    assert rouge_l(["nothing shared"], ["at all"]) == 0.0
    # zh: every character is a token, so unspaced Chinese scores by characters.
    assert rouge_l(["今天星期五"], ["今 天 星 期 几"], tokenize="zh") == pytest.approx(80.0)
    assert rouge_l(["今天星期五"], ["今 天 星 期 几"], tokenize="13a") == 0.0


def test_corpus_bleu_known_values():
    assert corpus_bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert corpus_bleu(["completely different words here"], ["the cat sat on the mat"]) == pytest.approx(0.0)
    assert corpus_bleu(["今天星期五。"], ["今 天 星 期 五 。"], tokenize="zh") == pytest.approx(100.0)
    with pytest.raises(ValueError, match="tokenize"):
        corpus_bleu(["a"], ["a"], tokenize="bogus")

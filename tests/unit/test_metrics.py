from __future__ import annotations

import pytest

from summarizer.metrics import MecabTokenizer, rouge

KO = "#Person1#은 #Person2#에게 숨쉬기가 힘든 이유를 묻는다."


def test_identical_korean_scores_100():
    s = rouge([KO], [KO], "mecab")
    assert s["rouge1"] == s["rouge2"] == s["rougeL"] == pytest.approx(100)
    assert s["rouge_sum"] == pytest.approx(300) and s["final"] == pytest.approx(100)


def test_default_rouge_tokenizer_would_drop_hangul():
    # Why the project needs mecab: rouge_score's own tokenizer keeps only [a-z0-9].
    assert rouge(["안녕 하세요"], ["안녕 하세요"], "default")["rouge1"] == 0


def test_hand_computed_whitespace_values():
    # pred "a b c d", ref "a b e": unigram overlap 2 -> P 2/4, R 2/3, F1 4/7;
    # bigram overlap 1 ("a b") -> P 1/3, R 1/2, F1 2/5; LCS 2 -> F1 4/7.
    s = rouge(["a b c d"], ["a b e"], "whitespace")
    assert s["rouge1"] == pytest.approx(400 / 7)
    assert s["rouge2"] == pytest.approx(40)
    assert s["rougeL"] == pytest.approx(400 / 7)


def test_mean_over_examples_and_competition_final():
    s = rouge(["a b", "x"], ["a b", "y"], "whitespace")
    assert s["rouge1"] == pytest.approx(50)
    # The competition's formula: mean of the three F1 x 100 (0.5500/0.3477/0.4357 -> 44.45)
    assert round((55.00 + 34.77 + 43.57) / 3, 2) == 44.45


def test_special_tokens_kept_whole():
    assert MecabTokenizer(True).tokenize("#Person1#이 웃는다")[:2] == ["#Person1#", "이"]
    assert MecabTokenizer(False).tokenize("#Person1#이")[:4] == ["#", "Person", "1", "#"]
    # Split tags inflate a wrong summary's score through the shared '#', 'Person' tokens.
    split = rouge(["#Person1#이 간다"], ["#Person2#가 온다"], "mecab", keep_special_tokens=False)
    whole = rouge(["#Person1#이 간다"], ["#Person2#가 온다"], "mecab", keep_special_tokens=True)
    assert split["rouge1"] > whole["rouge1"]


def test_several_references_take_the_best():
    s = rouge(["a b c"], [["x y z", "a b c"]], "whitespace")
    assert s["rouge1"] == pytest.approx(100)


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError):
        rouge(["a"], ["a", "b"], "whitespace")


def test_score_rows_average_to_score_and_each_row_is_its_own_score():
    from summarizer.config import TaskConfig
    from summarizer.metrics import score, score_rows

    task = TaskConfig()
    preds = ["the cat sat on the mat", "a dog barked", "nothing alike here"]
    refs = ["the cat sat on a mat", "the dog barked loudly", "completely different words"]
    rows = score_rows(task, preds, refs, "default")
    total = score(task, preds, refs, "default")
    assert len(rows) == 3
    for key, value in total.items():
        assert abs(value - sum(r[key] for r in rows) / 3) < 1e-9
    assert rows[2]["rouge_sum"] == 0.0 < rows[1]["rouge_sum"] < rows[0]["rouge_sum"]
    assert rows[1] == score(task, preds[1:2], refs[1:2], "default")

"""pass@k, cons@k, standard error and the paired bootstrap against hand-computed cases."""

import math
import random

import pytest

from thinkforge.scoring import majority_correct, mean_se, paired_bootstrap, pass_at_k, score_samples


def comb_pass_at_k(n, c, k):
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@pytest.mark.parametrize("n, c, k, expected", [
    (4, 0, 1, 0.0), (4, 4, 1, 1.0), (4, 1, 1, 0.25), (4, 1, 4, 1.0), (4, 2, 2, 1 - 1 / 6), (5, 1, 2, 0.4),
])
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_matches_combinatorial_formula():
    rng = random.Random(0)
    for _ in range(500):
        n = rng.randint(1, 64)
        c, k = rng.randint(0, n), rng.randint(1, n)
        assert pass_at_k(n, c, k) == pytest.approx(comb_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_needs_enough_samples():
    with pytest.raises(ValueError, match="at least 8 samples"):
        pass_at_k(4, 1, 8)


def test_mean_se():
    assert mean_se([1.0, 0.0, 1.0, 0.0]) == pytest.approx((0.5, math.sqrt((4 * 0.25 / 3) / 4)))
    assert mean_se([0.3]) == (0.3, 0.0)


def test_majority_vote():
    assert majority_correct(["4", "5", "4", None], [True, False, True, False])
    assert not majority_correct(["5", "5", "4"], [False, False, True])
    assert not majority_correct([None, None], [False, False])
    # A tie goes to the answer seen first.
    assert majority_correct(["4", "5"], [True, False])


def _samples(table):
    return [{"problem_id": pid, "correct": ok, "extracted": ans, "num_tokens": 10, "finish_reason": fr}
            for pid, rows in table.items() for ok, ans, fr in rows]


def test_score_samples_hand_computed():
    m = score_samples(_samples({
        "a": [(True, "1", "stop"), (True, "1", "stop"), (False, "2", "length"), (False, None, "length")],
        "b": [(False, "3", "stop"), (False, "3", "stop"), (True, "4", "stop"), (False, "5", "stop")],
    }), ks=[1, 2, 4])
    assert m["n_problems"] == 2 and m["k"] == 4
    assert m["pass@1"] == pytest.approx((0.5 + 0.25) / 2)
    assert m["pass@1_se"] == pytest.approx(math.sqrt(((0.5 - 0.375) ** 2 + (0.25 - 0.375) ** 2) / 1 / 2))
    assert m["cons@4"] == 0.5  # a: majority "1" correct; b: majority "3" wrong
    assert m["pass@2"] == pytest.approx((comb_pass_at_k(4, 2, 2) + comb_pass_at_k(4, 1, 2)) / 2)
    assert m["pass@4"] == 1.0
    assert m["truncation_rate"] == 0.25


def test_paired_bootstrap_detects_a_real_gain_and_not_noise():
    base = {str(i): 0.0 for i in range(40)}
    better = {str(i): (1.0 if i % 2 else 0.25) for i in range(40)}
    g = paired_bootstrap(base, better, samples=1000)
    assert g["delta"] == pytest.approx(0.625) and g["ci_low"] > 0.5
    same = paired_bootstrap(better, better, samples=1000)
    assert same["ci_low"] == same["ci_high"] == 0.0
    with pytest.raises(ValueError, match="no problem scored in both"):
        paired_bootstrap({"a": 1.0}, {"b": 1.0})


def test_pass_at_k_stable_where_binomials_overflow_floats():
    from fractions import Fraction

    n, c, k = 4096, 7, 600  # C(4096, 600) ~ 1e800: beyond any float
    with pytest.raises(OverflowError):
        float(math.comb(n, k))
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)


def test_votes_ignore_whitespace_and_dollars_and_use_normalized_votes():
    assert majority_correct(["1/2", "$1/2$", " 1 / 2", "3"], [True, True, True, False])
    m = score_samples([
        {"problem_id": "a", "correct": True, "extracted": "033", "vote": "33"},
        {"problem_id": "a", "correct": True, "extracted": "33", "vote": "33"},
        {"problem_id": "a", "correct": False, "extracted": "7", "vote": "7"},
    ])
    assert m["cons@3"] == 1.0


def test_errors_truncation_lengths_and_groups():
    samples = [
        {"problem_id": "a", "correct": True, "extracted": "1", "num_tokens": 10, "finish_reason": "stop",
         "subject": "Algebra", "level": 1},
        {"problem_id": "a", "correct": False, "extracted": None, "num_tokens": 0, "finish_reason": "error",
         "subject": "Algebra", "level": 1},
        {"problem_id": "b", "correct": False, "extracted": "2", "num_tokens": 30, "finish_reason": "length",
         "subject": "Geometry", "level": 3},
        {"problem_id": "b", "correct": False, "extracted": "2", "num_tokens": 20, "finish_reason": "stop",
         "subject": "Geometry", "level": 3},
    ]
    m = score_samples(samples, ks=[1, 2])
    assert m["error_rate"] == 0.25 and m["truncation_rate"] == 0.25
    assert m["mean_tokens"] == 20.0  # failed samples have no length
    assert m["by_subject"] == {"Algebra": 0.5, "Geometry": 0.0} and m["by_level_n"] == {"1": 1, "3": 1}
    assert m["pass@2"] == 0.5 and m["per_problem"] == {"a": 0.5, "b": 0.0}


def test_cons_votes_by_answer_equivalence_class():
    """`\\frac12` and `0.5` are one answer: one class, two votes (the shared verifier's equivalence)."""
    # gold 1/2: two correct answers written differently outvote one wrong answer seen first
    assert majority_correct(["3", "\\frac12", "0.5"], [False, True, True])
    # gold 3: two equivalent wrong answers outvote the one correct answer seen first
    assert not majority_correct(["3", "0.5", "\\frac{1}{2}"], [True, False, False])
    assert not majority_correct(["3", "1/2", "\\dfrac{1}{2}", "x^2+1", "1+x^2", "1+x^2"],
                                [True, False, False, False, False, False])
    # through score_samples, as the evaluate stage and `thinkforge score` call it
    m = score_samples([
        {"problem_id": "a", "correct": False, "extracted": "3"},
        {"problem_id": "a", "correct": True, "extracted": "\\frac{1}{2}"},
        {"problem_id": "a", "correct": True, "extracted": "0.5"},
        {"problem_id": "b", "correct": True, "extracted": "4"},
        {"problem_id": "b", "correct": False, "extracted": "\\sqrt{8}"},
        {"problem_id": "b", "correct": False, "extracted": "2\\sqrt{2}"},
    ])
    assert m["cons@3"] == 0.5


def test_cons_asks_the_verifier_only_about_distinct_wrong_answers():
    asked = []

    def equivalent(pairs):
        asked.extend(pairs)
        return [False] * len(pairs)

    assert majority_correct(["8", "7", " 8", "07", "a", "b", "a"], [False, True, False, True, False, False, False],
                            equivalent=equivalent) is False  # "8" x2, correct x2, "a" x2: "8" came first
    assert sorted(asked) == [("8", "a", "math"), ("8", "b", "math"), ("a", "b", "math")]
    asked.clear()
    assert majority_correct(["1", "2", "3", "2"], [True, False, False, False], equivalent=equivalent) is False
    assert asked == [], "distinct integers differ without asking"

import numpy as np
import pytest

from shopmtl.train.sampling import SourceSampler, source_probs


def test_proportional_and_uniform_limits():
    np.testing.assert_allclose(source_probs([100, 300], "proportional"), [0.25, 0.75])
    np.testing.assert_allclose(source_probs([100, 300], "round_robin"), [0.5, 0.5])
    # T = 1 is proportional; a huge T tends to uniform
    np.testing.assert_allclose(source_probs([100, 300], "temperature", 1.0), [0.25, 0.75])
    np.testing.assert_allclose(source_probs([100, 300], "temperature", 1e9), [0.5, 0.5],
                               atol=1e-6)


def test_temperature_two_is_square_root():
    # sqrt(100) = 10, sqrt(900) = 30
    np.testing.assert_allclose(source_probs([100, 900], "temperature", 2.0), [0.25, 0.75])


def test_round_robin_cycles():
    s = SourceSampler([5, 50, 500], "round_robin")
    assert [s.next() for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]


def test_draw_frequencies_match_probabilities():
    s = SourceSampler([100, 900], "temperature", 2.0, seed=3)
    draws = s.schedule(20_000)
    share = np.bincount(draws, minlength=2) / len(draws)
    np.testing.assert_allclose(share, [0.25, 0.75], atol=0.01)


def test_schedule_is_resumable_and_seeded():
    a = SourceSampler([10, 20, 30], "proportional", seed=1)
    full = a.schedule(3000)
    # steps 1500.. drawn on their own equal the tail of the full sequence
    np.testing.assert_array_equal(a.schedule(1500, start=1500), full[1500:])
    b = SourceSampler([10, 20, 30], "proportional", seed=1)
    np.testing.assert_array_equal([b.next() for _ in range(50)], full[:50])
    c = SourceSampler([10, 20, 30], "proportional", seed=2)
    assert not np.array_equal(c.schedule(3000), full)


@pytest.mark.parametrize(("sizes", "method", "t", "msg"), [
    ([], "proportional", 2.0, "at least one"),
    ([3, 0], "proportional", 2.0, "at least one training batch"),
    ([3, 4], "temperature", 0.0, "temperature must be > 0"),
    ([3, 4], "sqrt", 2.0, "unknown sampling method"),
])
def test_bad_arguments(sizes, method, t, msg):
    with pytest.raises(ValueError, match=msg):
        source_probs(sizes, method, t)

import pytest

from circuit_breakers.evaluation.stats import wilson_interval


@pytest.mark.parametrize("k,n,low,high", [
    # Reference values: statsmodels proportion_confint(k, n, method="wilson").
    (5, 10, 0.2365931, 0.7634069),
    (0, 10, 0.0, 0.2775328),
    (10, 10, 0.7224672, 1.0),
    (1, 20, 0.0088814, 0.2361312),
    (81, 100, 0.7222115, 0.8748525),  # hand-computed with z = 1.96
])
def test_wilson_known_values(k, n, low, high):
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(low, abs=1e-4) and hi == pytest.approx(high, abs=1e-4)


def test_wilson_edge_cases():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)

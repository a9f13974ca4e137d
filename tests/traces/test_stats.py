"""Trace statistics on a hand-built trace."""

from __future__ import annotations

import pytest

from tests.traces.helpers import make_trace
from traces.stats import (
    co_activation,
    consecutive_overlap,
    frequency_entropy,
    reuse_distance,
    working_set_profile,
)

# One request, 2 layers, 4 experts, top-2.
ROWS = [[[0, 1], [2, 3]],
        [[0, 1], [2, 3]],
        [[0, 2], [2, 3]]]


def test_entropy():
    ent = frequency_entropy(make_trace(ROWS, 4))
    assert ent[1]["entropy_bits"] == pytest.approx(1.0)  # experts 2 and 3, equally often
    assert ent[1]["normalized"] == pytest.approx(0.5)


def test_consecutive_overlap_and_baselines():
    ov = consecutive_overlap(make_trace(ROWS, 4))
    assert ov[0]["observed"] == pytest.approx((1.0 + 0.5) / 2)
    assert ov[0]["random_uniform"] == pytest.approx(2 / 4)
    # Inclusion probabilities of layer 0: [1, 2/3, 1/3, 0] -> sum of squares 14/9, over K=2.
    assert ov[0]["independent_same_frequency"] == pytest.approx(7 / 9)
    assert ov[1]["observed"] == pytest.approx(1.0)


def test_overlap_ignores_request_boundaries():
    ov = consecutive_overlap(make_trace(ROWS, 4, request=[0, 1, 2]))
    assert ov[0]["observed"] != ov[0]["observed"]  # nan: no consecutive tokens of one request


def test_reuse_distance():
    reuse = reuse_distance(make_trace(ROWS, 4))
    assert reuse["count"] == 7 and reuse["median"] == 1.0
    assert reuse["histogram"]["<=1"] == 7


def test_co_activation_and_working_set():
    co = co_activation(make_trace(ROWS, 4))
    assert co["next_layer_precision"] == [1.0]  # layer 1 is always {2, 3}
    assert co["chance"] == 0.5
    assert working_set_profile(make_trace(ROWS, 4)) == [3.0, 2.0]

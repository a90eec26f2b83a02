"""DAPO's soft overlong punishment (Eq. 13) at its breakpoints, with typed-in values."""
import pytest

from e3rl.core.shaping import overlong_penalty


@pytest.mark.parametrize("length, expected", [(0, 0.0), (12, 0.0), (13, -0.25), (14, -0.5), (15, -0.75),
                                              (16, -1.0), (17, -1.0), (40, -1.0)])
def test_penalty_ramps_over_the_buffer_then_saturates(length, expected):
    # max_len 16, buffer 4: free up to 12 tokens, then -1/4 per token, -1 from 16 on
    assert overlong_penalty(length, max_len=16, buffer=4) == pytest.approx(expected)


def test_factor_scales_it():
    assert overlong_penalty(14, 16, 4, factor=0.5) == pytest.approx(-0.25)
    assert overlong_penalty(17, 16, 4, factor=0.5) == pytest.approx(-0.5)
    assert overlong_penalty(12, 16, 4, factor=0.5) == 0.0


def test_buffer_zero_is_off():
    assert [overlong_penalty(n, 16, 0) for n in (0, 16, 17, 100)] == [0.0] * 4

"""The unusual-input sweep: no case may return a wrong answer, crash, give an error that names
nothing, or change the cache when it is refused (``longattn.eval.sweep``)."""

import pytest
import torch

from longattn.eval.sweep import FAILING, OUTCOMES, run_sweep
from longattn.eval.sweep_cases import all_cases

CASES = all_cases()


def _param(i, case):
    return pytest.param(i, id=f"{case.area}-{i}")


@pytest.fixture(scope="module")
def outcomes():
    return run_sweep()


@pytest.mark.parametrize("index", [_param(i, c) for i, c in enumerate(CASES)])
def test_case(outcomes, index):
    record = outcomes[index]
    assert record["name"] == CASES[index].name
    if record["outcome"] in FAILING:
        pytest.fail(
            f"[{record['outcome']}] {record['repro']}\n    {record['detail']}", pytrace=False
        )


def test_the_sweep_is_wide():
    assert len(CASES) >= 300
    assert len({c.name for c in CASES}) == len(CASES)
    assert {c.area for c in CASES} >= {"impl", "shape", "layout", "dtype", "nan", "positions",
                                       "scale", "cache", "decode", "method", "sparse",
                                       "calibration", "cli"}  # fmt: skip


def test_the_classifier_tells_outcomes_apart():
    from longattn.cache import KVCache
    from longattn.eval.sweep import Case, classify

    def mutate_then_fail(ctx):
        ctx["cache"].append(0, torch.ones(1, 1, 1, 4), torch.ones(1, 1, 1, 4))
        raise ValueError("refused")

    def filled():
        cache = KVCache(1)
        cache.append(0, torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4))
        return {"cache": cache}

    def raise_(exc):
        def call(ctx):
            raise exc

        return call

    samples = {
        "state_changed": Case("t", "a", filled, mutate_then_fail),
        "crash": Case("t", "b", dict, raise_(IndexError("index 3"))),
        "clear_error": Case("t", "c", dict, raise_(ValueError("window=-3")), names=("window",)),
        "unclear_error": Case("t", "d", dict, raise_(ValueError("bad")), names=("window",)),
        "silent_wrong": Case("t", "e", dict, lambda ctx: 1, lambda ctx, r: "wrong"),
        "ok": Case("t", "f", dict, lambda ctx: 1, lambda ctx, r: None),
    }
    assert set(samples) == set(OUTCOMES)
    for want, case in samples.items():
        assert classify(case)[0] == want
    raw = Case("t", "g", dict, raise_(ValueError("not enough values to unpack (expected 4)")))
    assert classify(raw)[0] == "crash"

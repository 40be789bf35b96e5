"""HiP's plan with the C++ key maxima against main's plan (PyTorch maxima) on the benchmark inputs.

    PYTHONPATH=. python docs/runs/issue14/hip_native_equal_layouts.py /path/to/main/longattn/methods/hip.py

The old file is loaded beside the new one (its ``@register`` dropped); both plan the same view of
``make_qkv(1, 8, 8, T, T, 64, seed=0)`` (the synthetic bench's inputs) at budget 0.2 and 0.1.
Prints whether the layouts are identical and, where not, how many blocks differ.
"""

import importlib.util
import pathlib
import sys
import types

import torch

from longattn import from_string
from longattn.call import make_call
from longattn.prefill import make_view
from longattn.testing import make_qkv


def old_hip(path: str) -> types.ModuleType:
    source = pathlib.Path(path).read_text().replace('@register("hip")\n', "")
    spec = importlib.util.spec_from_loader("hip_main", loader=None)
    module = importlib.util.module_from_spec(spec)
    exec(compile(source, path, "exec"), module.__dict__)  # noqa: S102
    return module


def main() -> None:
    old = old_hip(sys.argv[1])
    for length in (16384, 32768):
        for dtype in (torch.float32, torch.bfloat16):
            q, k, v = make_qkv(1, 8, 8, length, length, 64, dtype=dtype, seed=0)
            for budget in (0.2, 0.1):
                new = from_string(f"hip:budget={budget}")
                view = make_view(make_call(q, k, v, new))
                assert view.key_maxima is not None
                got = new.plan(view)
                expected = old.HiP(budget=budget).plan(view)
                same = torch.equal(got, expected)
                diff = int((got != expected).sum())
                print(f"{length} {dtype} budget={budget} identical layouts: {same} "
                      f"blocks {int(got.sum())} (main {int(expected.sum())}) differing {diff}")  # fmt: skip


if __name__ == "__main__":
    main()

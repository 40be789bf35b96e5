import pytest
import torch

from longattn import from_string
from longattn.testing import METHOD_EXAMPLES

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

EXAMPLE_SPECS = [spec for specs in METHOD_EXAMPLES.values() for spec in specs]


@pytest.fixture(params=EXAMPLE_SPECS)
def example_method(request):
    return from_string(request.param)

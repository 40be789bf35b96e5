import pytest

from longattn import from_string
from longattn.testing import METHOD_EXAMPLES

EXAMPLE_SPECS = [spec for specs in METHOD_EXAMPLES.values() for spec in specs]


@pytest.fixture(params=EXAMPLE_SPECS)
def example_method(request):
    return from_string(request.param)

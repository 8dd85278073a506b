"""The Examples in the public modules' docstrings run and print what they show."""
import doctest
import importlib

import pytest

PUBLIC_MODULES = ["entropy_kernels", "entropy_kernels.loss", "entropy_kernels.backends", "entropy_kernels.options",
                  "entropy_kernels.counting", "entropy_kernels.reference"]
# Modules whose docstrings must carry examples (a doctest run that finds none would pass silently).
WITH_EXAMPLES = {"entropy_kernels.loss", "entropy_kernels.backends"}


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} doctest examples failed in {name}"
    if name in WITH_EXAMPLES:
        assert result.attempted > 0, f"no docstring examples found in {name}"

import os
from pathlib import Path

import pytest

from rtjax.data import DataNotFoundError, data_root


def pytest_collection_modifyitems(config, items):
    """Tests that read the real data (through `data_dir`) carry the `realdata` marker."""
    for item in items:
        if "data_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.realdata)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real data folder; a hard failure in CI, a skip elsewhere when absent."""
    try:
        return data_root()
    except DataNotFoundError as err:
        if os.environ.get("CI"):
            pytest.fail(str(err))
        pytest.skip(str(err))

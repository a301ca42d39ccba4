import os
from pathlib import Path

import pytest

from rtjax.data import DataNotFoundError, data_root


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real data folder; a hard failure in CI, a skip elsewhere when absent."""
    try:
        return data_root()
    except DataNotFoundError as err:
        if os.environ.get("CI"):
            pytest.fail(str(err))
        pytest.skip(str(err))

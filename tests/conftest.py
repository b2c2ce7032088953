import os
import sys
from pathlib import Path

import pytest

# The module's files sit at the repository root, as CodeProject.AI expects of a module folder.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

# Nothing in the tests may reach Hugging Face: anything that tries lands on a closed loopback port and fails at once.
# Tests of the download path point HF_ENDPOINT at their local stand-in instead.
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"

from models import gemma3_path, smollm2_path  # noqa: E402


@pytest.fixture(scope="session")
def smollm2() -> Path:
    return smollm2_path()


@pytest.fixture(scope="session")
def gemma3() -> Path:
    return gemma3_path()

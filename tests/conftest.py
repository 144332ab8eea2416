import pytest

from tiny_models import char_tokenizer


@pytest.fixture(scope="session")
def char_tok():
    return char_tokenizer()

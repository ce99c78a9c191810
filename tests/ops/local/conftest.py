# the model-path tests of the exact terms run them inside tiny transformers models
from tests.hf.conftest import tiny_bert, tiny_llama  # noqa: F401

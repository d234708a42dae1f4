"""Fixtures shared by the test files: one CPU thread for small matmuls, the benchmark's tiny tokenizer and samples."""
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from bench.synthetic import SHAPES, Synth, make_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    # Small CPU matmuls with 2 intra-op threads run ~30x slower than with 1 on 2-vCPU machines (OpenMP
    # barrier cost); the numbers checked with it do not depend on the thread count.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(0)


@pytest.fixture(scope="module")
def synth(tok):
    return Synth(tok, SHAPES["tiny"]["vocab_size"], seed=0)

"""Index tensors copied to the GPU on a side stream: the compute stream reads them only after they arrive, and their
memory is not reused while it may still read them."""
from __future__ import annotations

import pytest
import torch

from lib_consistency.common.async_index import device_index, index_tensor


def test_on_the_cpu_the_index_is_returned_as_is():
    index = torch.tensor([3, 1, 2])
    assert device_index(index, "cpu") is index
    assert torch.equal(index_tensor((3, 1, 2), "cpu"), index)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run where one is lent)")
def test_indices_arrive_before_a_busy_stream_reads_them_and_are_not_recycled_early():
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(1 << 20, generator=generator)
    gpu_values = values.cuda()
    expected, results = [], []
    torch.cuda.synchronize()
    for step in range(20):
        torch.cuda._sleep(2_000_000)  # the compute stream is busy while the copies are issued
        index = torch.randint(0, values.numel(), (50_000 + step,), generator=generator)
        expected.append(values[index])
        results.append(gpu_values.index_select(0, device_index(index, "cuda")))  # the index dies here
    assert all(torch.equal(got.cpu(), want) for got, want in zip(results, expected))
    assert torch.equal(index_tensor([5, 0], torch.device("cuda")).cpu(), torch.tensor([5, 0]))

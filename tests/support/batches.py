"""Comparing torch loader batches: tensors exactly (NaN equal to NaN, same dtype), the rest by value."""

from __future__ import annotations

from typing import Any


def assert_batch_equal(got: Any, want: Any, where: str = "batch") -> None:
    """Deep equality of two batches as `collate_speech_batch` or the batch mode make them."""
    import torch

    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), (where, type(got))
        assert got.dtype == want.dtype and got.shape == want.shape, (where, got.dtype, want.dtype, got.shape,
                                                                     want.shape)
        assert torch.equal(got.isnan(), want.isnan()) if got.is_floating_point() else True, where
        same = got.nan_to_num(0.0) == want.nan_to_num(0.0) if got.is_floating_point() else got == want
        assert bool(same.all()), where
    elif isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), (where, sorted(got), sorted(want))
        for key in want:
            assert_batch_equal(got[key], want[key], f"{where}.{key}")
    else:
        assert got == want, where

"""One table of tolerances per dtype: (rtol, atol). Checks never pick tolerances per case."""

import torch

TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (3e-2, 3e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """``actual`` (computed in ``dtype``) against a float64 ``expected``.

    The absolute tolerance scales with the result's magnitude: results are sums of
    many products, whose rounding error grows with their size.
    """
    rtol, atol = TOLERANCES[dtype]
    scale = expected.detach().abs().max().item() + 1.0
    torch.testing.assert_close(actual.detach().double(), expected.detach().double(), rtol=rtol, atol=atol * scale)

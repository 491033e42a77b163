"""One table of tolerances per dtype: (rtol, atol). Checks never pick tolerances per case."""

import torch

TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-5),
    torch.bfloat16: (3e-2, 3e-2),
}

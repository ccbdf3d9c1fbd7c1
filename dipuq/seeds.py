"""One way to turn a seed into a random stream: ``generator(seed, *keys)``.

Every random draw in dipuq (a pipeline stage, a sampler chain, an experiment's scan) comes from a
generator that is a pure function of the run seed and a few keys naming what it is for, so a
stage or a chain draws the same numbers whatever ran before it, on any rank.

    >>> a = generator(0, 3)
    >>> b = generator(0, 3)
    >>> bool(torch.equal(torch.randn(2, generator=a), torch.randn(2, generator=b)))
    True
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

__all__ = ["generator"]


def _word(key: int | str) -> int:
    if isinstance(key, str):
        return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")
    return int(key) % 2**63


def generator(seed: int | str, *keys: int | str, device: str | torch.device | None = None) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` (default CPU) seeded from ``(seed, *keys)``.

    Integer keys enter as they are (mod 2⁶³), string keys as 32 bits of their SHA-256; the two
    32-bit words NumPy's ``SeedSequence`` makes of them seed the generator.
    """
    state = np.random.SeedSequence([_word(seed), *(_word(k) for k in keys)]).generate_state(2, dtype=np.uint32)
    gen = torch.Generator(device=device or "cpu")
    gen.manual_seed((int(state[0]) << 31) ^ int(state[1]))
    return gen

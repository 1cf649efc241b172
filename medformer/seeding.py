"""Where randomness comes from: public seeds for what must be reproducible, secret ones for what a
privacy guarantee rests on.

Two kinds, never mixed:

* **Seeded** (:func:`derived_seed`, :func:`round_seed`): model init, data partitions, shuffling, MAE
  masks, rotations, augmentations and every draw of a run without differential privacy. They follow
  from the scenario seed, so a killed run resumes bit for bit, and anyone holding the seed (the
  server, the other sites) can replay them. That is fine: none of them protects anything.
* **Secret** (:func:`secret_generator`, :func:`secret_numpy_rng`): DP-SGD's Gaussian noise and
  Poisson sampling at a site, and client-level DP noise on the server. Seeded afresh from the
  operating system's CSPRNG (``os.urandom``) by the party that adds the noise, never stored, logged
  or sent, so nobody else can regenerate the noise and subtract it. A DP run therefore does not
  resume bit-identically; its accountant does (the privacy spent keeps counting).
"""
from __future__ import annotations

import hashlib
import os

import numpy as np
import torch


def derived_seed(*parts: object) -> int:
    """A 64-bit seed derived from ``parts`` (SHA-256 of their ``/``-joined text): reproducible."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little")


def round_seed(seed: int, name: str, rnd: int) -> int:
    """A site's seed for a round: fixed by (scenario seed, site, round), so a resumed run replays
    exactly what an uninterrupted one does. Public: never use it for DP noise or sampling."""
    return derived_seed(seed, name, rnd)


def secret_seed(bits: int = 64) -> int:
    """``bits`` bits from the operating system's CSPRNG (``os.urandom``)."""
    return int.from_bytes(os.urandom((bits + 7) // 8), "little") >> (-bits % 8)


def secret_generator(device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator seeded with 64 secret bits from ``os.urandom``, for DP noise and Poisson
    sampling. Make a fresh one per use; never store, log or send it or its seed.

    ``device``: where it draws. DP-SGD's noise is drawn on the model's device (torch needs the
    generator there); Poisson sampling always draws on the CPU."""
    return torch.Generator(device=device).manual_seed(secret_seed(64))


def secret_numpy_rng() -> np.random.Generator:
    """A numpy generator (PCG64) seeded with 128 secret bits from ``os.urandom``: client-level DP noise."""
    return np.random.default_rng(secret_seed(128))

"""The GPU fast path: inference copies of an ε-model (bf16 / fp8, compiled) and the training network's swaps.

It wraps or replaces modules of a ``ddim.models.UNet`` from outside; nothing below this package imports it."""

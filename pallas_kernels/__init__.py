"""Decode-attention kernels over jaxkv's cache layouts, with plain-jnp references beside them.

`pallas_kernels.dispatch` is the only entry point jaxkv calls: it picks the Pallas kernel for the
platform and cache type, and falls back to the XLA reference where no kernel applies.
"""

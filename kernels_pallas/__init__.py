"""Pallas kernels for jaxllm's hot spots, each beside a pure-JAX reference (see the kernels issue)."""

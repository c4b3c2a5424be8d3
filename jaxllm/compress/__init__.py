"""Compressing a trained model: passes over its params tree (pruning; `jaxllm compress`)."""

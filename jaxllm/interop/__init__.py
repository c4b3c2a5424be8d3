"""Hugging Face interop: configs and weights in and out."""

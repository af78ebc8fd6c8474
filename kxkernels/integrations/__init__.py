"""Swapping kxkernels ops into existing models (``kxkernels.integrations.transformers``)."""

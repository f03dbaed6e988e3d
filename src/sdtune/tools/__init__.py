"""Layer 5: tools over the layers below (dataset prep, LoRA tools, conversions, the built-in model build)."""

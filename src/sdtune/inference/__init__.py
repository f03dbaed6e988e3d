"""Layer 3: generation from loaded parts: diffusers pipelines, samplers, seeded grids, PNG infotext."""

"""Layer 0: errors, events, atomic writes, seeding. Imports nothing else from sdtune."""

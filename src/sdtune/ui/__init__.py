"""The web UI (``sdtune ui``): datasets, training forms generated from the config schemas, live runs, results.

Gradio is imported only where components are built (``app``, ``forms.build_components``), so the schema-to-form
logic, the path rules and the job manager import without it.
"""

"""The base class of every sdtune config model.

Conventions every config model follows (the CLI, the web UI form and the error messages rely on them):

* Unknown keys are errors (``extra="forbid"``): a typo such as ``lrr`` must not be silently ignored.
* Every field carries an *attribute docstring* -- a string literal right under the field. Pydantic turns it
  into the field's ``description``, which becomes the help text of ``sdtune`` and of the generated web form,
  so write it for users: what the setting does and the values people typically use.
* Every numeric or string field gives an example in ``Field(examples=[...])``. The error formatter shows
  ``examples[0]`` as the "e.g." fix when a value is rejected.
* Assignments are validated too (``validate_assignment=True``), so code that adjusts a config after loading
  cannot put it into a state that loading would have rejected.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A pydantic model that rejects unknown keys, validates assignments and documents fields in place.

    Example::

        class Optimizer(StrictModel):
            lr: float = Field(1e-4, gt=0, examples=[1e-4])
            \"\"\"Learning rate. 1e-4 suits most LoRA runs; 5e-3 is common for embeddings.\"\"\"
    """

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)

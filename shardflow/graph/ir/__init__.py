"""The typed step IR: instructions (``instr.py``) in a ``StepIR`` (``step.py``), built by the layout pass
and rewritten by one module per pass; ``graph/lower.py`` runs them in order."""

"""The typed step IR: instructions (``instr.py``) in a ``StepIR`` (``step.py``), built by the layout pass
and rewritten by one module per pass; ``graph/lower.py`` runs them in order and ``verify.py`` checks the
invariants after each. What each pass reads and writes of a ``StepIR``:

=================  ==========================================  ============================================
pass               reads                                        writes
=================  ==========================================  ============================================
``layouts``        the joint graph, the plan's layouts          ``body``, ``consts``, ``storages``, ``refs``,
                                                                ``param_alias``, ``stage_outputs``
``prefetch``       ``Gather`` instructions and their chains     ``GatherStart``/finish in ``body``; moves
                                                                the gathered storage (``refs``, ``storages``)
``buckets``        the layout pass's ``Gradient`` records       ``Launch`` in ``body``, the handles' storages
``release``        ``body``, ``param_alias``                    ``units``, ``release_lines``, ``releases``
``placement``      ``body``, ``refs``, ``storages``, releases   ``Op.blocks`` in ``body``, ``placed``
``liveness``       everything above                             nothing (returns the memory timeline)
``codegen``        everything above                             nothing (returns the generated functions)
=================  ==========================================  ============================================
"""

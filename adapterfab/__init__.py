"""adapterfab: an adapter factory on Ray.

The shared core lives here (ids, spec, settings, state, storage, registry, keys, base models, methods,
CLI); the pipeline stages live in ``pipelines/`` (``adapterfab.pipelines``), training in ``jobs/``
(``adapterfab.jobs``) and serving in ``serve/`` (``adapterfab.serve``).
"""

__version__ = "0.1.0"

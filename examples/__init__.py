"""Runnable example apps, shipped in the package so that ``treadle demo`` and
``treadle --app treadle.examples.document_pipeline:pipeline`` work from a plain
``pip install treadle``, not only from a source checkout."""

"""Command-line tools: ``python -m indexcache_train.tools VERB ...`` (see ``__main__``).

One module per verb (``layout_cli`` for ``layout``); :mod:`presets` holds the built-in models.
"""

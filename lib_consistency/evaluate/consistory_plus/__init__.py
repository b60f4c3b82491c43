"""The ConsiStory+ benchmark through a running WebUI (``python -m lib_consistency.evaluate.consistory_plus``).

An optional tool, not used by the extension at run time: ``sets`` (the benchmark file as stories), ``webui`` (the
HTTP client), ``runner`` (resumable generation), ``table`` (scoring every run of an output folder, Table 1's
shape), ``cli``. Scores come from ``lib_consistency.evaluate``; extras in
``lib_consistency/evaluate/requirements.txt``.
"""

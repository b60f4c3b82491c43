"""Consistency evaluation of stories the WebUI generated (``python -m lib_consistency.evaluate``).

An optional tool, not used by the extension at run time: ``infotext`` (reading the WebUI's PNGs, grouping frames
into stories), ``metrics`` (CLIP-T, CLIP-I, DreamSim on embeddings; the CLIP embedder), ``models`` (loading CLIP,
DreamSim and background removal offline), ``scoring`` (one evaluator over stories), ``report`` (tables, contact
sheets, progress), ``cli``. Its extra packages are listed in ``lib_consistency/requirements-eval.txt``.
"""

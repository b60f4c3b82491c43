"""Quality: how consistent the stories the WebUI generated are (``python -m lib_consistency.evaluate``); speed is
``lib_consistency.bench``.

An optional tool, not used by the extension at run time: ``infotext`` (reading the WebUI's PNGs, grouping frames
into stories), ``metrics`` (CLIP-T, CLIP-I, DreamSim on embeddings; the CLIP embedder), ``models`` (loading CLIP,
DreamSim and background removal offline), ``scoring`` (one evaluator over stories), ``report`` (tables, contact
sheets, progress), ``cli``; ``consistory_plus``: the ConsiStory+ benchmark run through a WebUI and scored here. Its
extra packages are listed in ``lib_consistency/evaluate/requirements.txt``.
"""

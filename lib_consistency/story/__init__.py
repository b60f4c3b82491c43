"""The story: its text format (``format``: parse, validate, errors with line numbers), the run plan of one
generation (``run``: frames, batches, seeds, the conditioning of each frame), the editor's frames preview
(``preview``) and the example stories (``examples``)."""

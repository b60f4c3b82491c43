"""StorySync: subject tokens of each frame (``subject_tokens``), subject masks from cross-attention
(``subject_masks``), sharing masked to the subject (``masked_sharing``), Regional Feature Harmonization
(``harmonization``), and the per-generation state that runs them with Base Layout Interpolation (``state``).
Host-free; the surfaces in ``surfaces/`` bring it to the model, ``hosts/prepass.py`` runs BLI's vanilla pre-pass
(``hosts/lockstep.py``: its rows beside the story's)."""

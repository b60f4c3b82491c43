"""StoryDiffusion (Zhou et al., 2024): consistent self-attention across a batch (``consistent_self_attention``: token
sampling, sharing plans, schedule, layers), its per-generation state (``state``) and the reference bank for longer
stories (``reference_bank``). Host-free; the surfaces in ``surfaces/`` bring it to the model."""

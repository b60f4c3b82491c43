"""One-Prompt-One-Story (Liu et al., ICLR 2025): prompt consolidation and its token plan (``token_plan``),
Singular-Value Reweighting with Naive Prompt Reweighting (``svr``), Identity-Preserving Cross-Attention with its
per-generation state (``ipca``). Host-free; the surfaces in ``surfaces/`` bring IPCA to the model."""

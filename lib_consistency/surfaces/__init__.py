"""Surfaces: the ways the methods reach attention. Each surface adapts one kind of attention call -- its shapes, its
row layout, where its keys and values come from -- and calls the methods' own functions, so no method is written
twice:
- ``attention_modules``: instance-level ``forward`` hooks on torch attention modules (A1111's ldm/sgm UNet, diffusers
  UNets in the tests and benches), over the install/remove mechanics of ``instance_hooks``;
- ``forge_patches``: Forge's and Forge Neo's attention replace and output patches on projected q/k/v.
Every surface tells a ``reach.Reach`` that it ran, which the host's guard checks after every UNet call. A new way in
(a diffusion transformer's joint text+image attention, say) is one new module here calling the same method
functions: ``ConsistencyState.contexts_for``, ``identity_keys``, ``StorySyncState.self_attention`` /
``harmonize_output`` / ``add_maps``."""

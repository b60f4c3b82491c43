"""Pieces every method and surface uses: the host's row layout (``row_layout``), layer and step addresses with
seeds made from them (``addresses``), index tensors without a device sync (``async_index``), atomic file writes
(``atomic_file``)."""

"""Volumes and what is made of them before a network sees them: storage, import, the built-in
phantom, slab split, normalisation, tiling, 2.5D context, task targets, training crops."""

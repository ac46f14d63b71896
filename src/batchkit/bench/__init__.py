"""``batchkit bench``: measure batched serving against naive serving and other batchers.

Run it as ``batchkit bench`` or ``python -m batchkit.bench`` (see ``--help``);
needs the ``bench`` extra (rich, matplotlib) and torch.
"""

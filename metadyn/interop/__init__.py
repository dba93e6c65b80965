"""Adapters to the peer libraries' episode formats: learn2learn tasksets and torchmeta batch dicts.

Optional packages are imported only where used; a missing one is an error naming metadyn's ``peers``
extra (``scripts/install_peers.sh`` installs learn2learn 0.2.0 and higher 0.2.1 on Python 3.11).
"""

from metadyn.interop.episodes import (
    TasksetEpisodes,
    from_torchmeta_batch,
    import_peer,
    split_task,
    to_learn2learn_taskset,
    to_torchmeta_batch,
)

__all__ = ["TasksetEpisodes", "from_torchmeta_batch", "import_peer", "split_task", "to_learn2learn_taskset",
           "to_torchmeta_batch"]

"""
Downloads, in parts you can read one at a time:

 - C{download.py}: L{Download}, which wires the parts below together for one
   file, L{Downloads} (the downloads in progress) and L{Bans};
 - C{finder.py}: connecting to the peers that offer a file, the manifest
   race, and what each holds;
 - C{scheduler.py}: the pure C{plan(ledger, sources, now)}: what to ask of
   whom (windows sized by each source's rate, runs of chunks, the endgame);
 - C{requests.py}: each source's stream, its requests and cancels;
 - C{status.py}: the counts, rate and ETA, as data;
 - C{lifecycle.py}: the stages of a download, as a state machine.

Which chunk is where is L{twisted_p2p.chunkmap.ChunkLedger}'s business.
"""

from twisted_p2p.download.download import (
    Bans,
    Download,
    DownloadFailed,
    Downloads,
)

__all__ = ["Bans", "Download", "DownloadFailed", "Downloads"]

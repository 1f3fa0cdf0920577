"""
Every size, count and time limit of twisted-p2p, in one place, with its reason.

Nothing here imports Twisted: this module is the bottom of the house.
"""

#: Bytes in one chunk.  256 KiB keeps a chunk frame small enough to verify and
#: write in one step and gives a 64 MiB file 256 chunks to spread over sources.
CHUNK_SIZE = 256 * 1024

#: Wire protocol version, carried by every datagram and every TCP request.
PROTOCOL_VERSION = 1

#: Largest discovery datagram we send or accept.  An announce is ~200 bytes
#: plus its name and the peers it passes on; 1232 bytes fit IPv6's minimum
#: MTU of 1280 with the IPv6 and UDP headers, so no datagram is ever
#: fragmented.  (Twisted reads 8192 bytes per datagram: anything larger
#: arrives truncated, and is dropped here as oversized.)
MAX_DATAGRAM = 1232

#: Largest TCP frame (length prefix excluded): one chunk plus its header.
MAX_FRAME = CHUNK_SIZE + 4096

#: Largest JSON header inside a frame.
MAX_HEADER = 64 * 1024

#: Chunk hashes sent per manifest page: 8192 x 32 bytes = 256 KiB < MAX_FRAME.
MANIFEST_PAGE = 8192

#: Files one peer's catalog lists, and the most we keep of another's.  The
#: catalog is fetched in pages, so this bounds memory and round trips, not
#: frame size.  A shared tree of 100,000 files (5,000 folders of photos,
#: say) is offered whole: ~330 pages of CATALOG_PAGE_BYTES, fetched in about
#: a second on a LAN (tests/benchmarks/run --only folders), and no more
#: than MAX_CATALOG_ENTRIES keeps in memory.
MAX_CATALOG_FILES = 100_000

#: JSON bytes of catalog entries in one catalog page.  An entry is at most
#: ~900 bytes (a 255-byte name, escaped to \uXXXX, is at most 765), so a page
#: always holds at least one and stays far under MAX_HEADER.
CATALOG_PAGE_BYTES = 32 * 1024

#: Remote text (an error message) is cut to this many characters before a
#: user sees it.
MAX_REMOTE_TEXT = 200

#: Largest file we index or download: 2**40 bytes (1 TiB) -- 4 million chunks.
MAX_FILE_SIZE = 1 << 40

#: Chunks one "get" request may name.
MAX_CHUNKS_PER_REQUEST = 64

#: A transfer connection that says nothing for this long is dropped (seconds).
#: A chunk stream, which never hears anything, counts chunks sent instead.
IDLE_TIMEOUT = 60.0

#: Requests the sender port queues on one connection behind the one it is
#: answering; past this it stops reading the connection until one is answered.
MAX_QUEUED_REQUESTS = 8

#: Connections one host may hold open to each of our TCP ports.  A
#: downloader uses one request connection per download on T+1, and a sender
#: one stream per download on T; a host past this is refused, so it cannot
#: hold thousands of half-sent frames in our memory.
MAX_CONNECTIONS_PER_HOST = 64

#: A connection that has sent nothing for this long (seconds), and holds
#: nothing open (no stream, no request being answered, no hello yet on a
#: data connection), may be closed to make room for a new connection when
#: its host is at MAX_CONNECTIONS_PER_HOST, or the process near its
#: descriptor limit: the least recently active goes first.  So idle
#: connections and slowloris clients (a frame never finished counts as
#: nothing sent) cannot keep out an honest peer of the same host, and a
#: connection at work is never the one closed.
EVICTABLE_AFTER = 2.0

#: File descriptors never given to accepted connections: they are kept for
#: what the peer opens itself (the files it serves, the streams and catalog
#: fetches it connects, its log and state files).  Past the process's
#: limit less this, a new connection makes room by closing an idle one
#: anywhere, or is refused; the peer never runs out in the middle of work.
DESCRIPTOR_RESERVE = 128

#: A data connection must present its token within this many seconds.
HELLO_TIMEOUT = 10.0

#: Largest header line of a frame on a data connection (a hello or a chunk
#: header is under 100 bytes); before the hello, the largest frame.  After
#: it a frame is at most this plus the run its stream was asked for.
MAX_DATA_HEADER = 1024

#: Bytes of chunks a sender hands to one sending batch (sent with sendfile
#: until the socket is full, on the reactor's thread if they are in the page
#: cache, else by a worker thread): the most one stream sends in one turn
#: of the reactor.  Chunks not yet in a
#: batch can still be cancelled.
STREAM_BATCH_BYTES = 4 * 1024 * 1024

#: The most chunks one frame of a data connection may carry, when they
#: follow each other: 4 MiB.  Larger frames cost both sides less per byte
#: (one head, one sendfile, one read into one buffer, one job for a worker
#: and one wake-up back); the hash unit stays the chunk.  The receiver says
#: how large it wants them, stream by stream (a "get"'s C{run}), and the
#: sender keeps to that.  Measured on loopback, 1 GiB from one seeder,
#: interleaved: runs of 16 chunks against 4 took the downloader's CPU from
#: 1.90 to 1.44 s/GiB and the rate from 588 to 767 MB/s.
MAX_RUN = 16

#: Under an upload cap, a frame takes at most this long to pay for (at
#: least a chunk): a frame is paid for whole before it goes, so longer ones
#: would send in lumps, and the last of a download would wait for its whole
#: frame.  With runs of 16 chunks for everyone, four seeders capped at
#: 8 MB/s fell from 1.00 to 0.93 of four times one's rate.
PACED_FRAME_SECONDS = 0.125

#: The run a sender keeps to when a "get" names none (what a peer that
#: knows no C{run} expects), and on a sealed stream: sealing needs a buffer
#: of a frame's size for each stream being sent.
DEFAULT_RUN = 4

#: Buffer bytes the data connections of one download may hold while each
#: reads a frame: a download drawing on more than 4 sources asks each for
#: shorter runs (L{twisted_p2p.download.scheduler.run_for}), so that its
#: memory does not grow with their number.  Measured with 8 MiB (runs of 8
#: for 4 sources), 4 uncapped seeders on loopback gave 0.72-0.76 of one
#: (which got 16), and 0.92-0.94 with 16 MiB, in interleaved pairs of
#: runs; their download's peak RSS is 12-16 MiB over one source's.
FRAME_READ_BUDGET = 16 * 1024 * 1024

#: The receive buffer a data connection asks the kernel for (SO_RCVBUF; Linux
#: doubles it for its own bookkeeping), where the system allows that much
#: (C{net.core.rmem_max}); else the kernel's autotuning, which starts each new
#: connection at 128 KiB.  With a small window a sender soon waits for us, and
#: on one host the kernel then sends its queued bytes inside our C{recv}: on
#: the downloader's reactor thread.  Measured on loopback, 96 MiB from one and
#: from four seeders: see the README's "Performance".
DATA_RECEIVE_BUFFER = 4 * 1024 * 1024

#: Streams (data connections) one request connection may open.
MAX_STREAMS_PER_CONNECTION = 4

#: Chunks asked on one stream and not yet sent: 64 MiB, well over any
#: window a requester keeps.
MAX_STREAM_QUEUE = 256

#: Downloads the record of partial downloads in the state dir remembers;
#: the oldest are forgotten first (their data stays on disk and resumes on
#: a plain "download"), and a damaged or planted record loads no more.
MAX_RECORDED_PARTIALS = 200

#: A console line longer than this is rejected.
MAX_COMMAND_LINE = 4096

#: A control-socket client that sends no request within this many seconds
#: is dropped (p2ppeer-ctl sends its request at once).
CONTROL_REQUEST_TIMEOUT = 10.0

#: Control-socket connections that may wait for their request at once; a
#: new one past this closes the one that has waited longest, so that idle
#: connections can never keep p2ppeer-ctl out (nor hold the descriptors
#: the network side needs).
MAX_CONTROL_WAITING = 32

#: Longest shared file name, in UTF-8 bytes (the usual filesystem limit).
MAX_NAME_BYTES = 255

#: Longest shared path (C{photos/2026/a.jpg}), in UTF-8 bytes: a quarter of
#: Linux's PATH_MAX, so that the downloads folder's own path fits in front
#: of it; a catalog entry with one, escaped, is still ~3 KiB.
MAX_PATH_BYTES = 1024

#: Most parts (folders and the file) in a shared path: deeper trees are not
#: indexed, and a peer offering one is not believed.
MAX_PATH_DEPTH = 16

#: Files of one folder (or pattern) download fetched at once; the others
#: wait their turn, so that 200 files make 4 request connections to each
#: source rather than 200 (MAX_CONNECTIONS_PER_HOST, MAX_UPLOADS).
PARALLEL_FILES = 4

#: How often the shared and downloads folders are checked for changes (s).
RESCAN_INTERVAL = 10.0

#: Chunks a source may have in flight at first, before its rate is known:
#: 4 MiB, enough to keep a LAN peer busy for a round trip or two.
INITIAL_WINDOW = 16

#: Fewest and most chunks a source may have in flight once its rate is
#: known.  Its window covers WINDOW_SECONDS of its rate: enough to keep it
#: busy across a round trip and the time our request takes to be answered,
#: and not so much that the last chunks wait behind a slow source.
MIN_WINDOW = 2
MAX_WINDOW = 64
WINDOW_SECONDS = 0.25

#: Fewest chunks asked in one "get" while more than that are left to ask:
#: fewer, larger requests (a request costs both sides more than a chunk).
MIN_ASK = 4

#: Near the end, an idle source takes over ("steals") a chunk still waiting
#: at another source when it would deliver it in less than this share of the
#: time the other would take; the other is told to cancel it.
STEAL_MARGIN = 0.7

#: A source has already sent (or is sending) the chunks at the head of its
#: queue: about this many seconds of its rate, and a frame.  Those are not
#: taken over: a cancel would come too late, and both copies would travel.
#: A fast source's are many (a sending batch and the socket buffers on both
#: sides hold megabytes); measured on loopback, 0.05 s wasted 5% of a file
#: fetched from 8 uncapped seeders, 0.3 s under 1%.
STEAL_IN_FLIGHT_SECONDS = 0.3

#: Frames of one download, of the longest run it asked for, whose bytes
#: may wait to be verified and written at once; past that its data
#: connections stop being read, until half of it is done.  Two: both worker
#: threads have one, and a third is read meanwhile (8 MiB with runs of 16
#: chunks).  Before runs grew past 4 chunks this was 5 frames of 1 MiB; 7
#: had put the 2 GiB download's peak RSS over its 64 MiB target once the
#: libraries under the peer grew (the idle peer was at 56 MiB), and 5
#: measured as fast.
VERIFY_FRAMES = 2

#: Bytes of free chunk buffers a peer keeps between downloads, so that the
#: next download, or the next file of a folder, reads into pages that are
#: there already: a fresh buffer is zeroed and faulted in, which cost the
#: reactor thread about a twentieth of a 96 MiB download's time.  Enough
#: for one download from a single source (a frame read, two verified); a
#: buffer counts by the chunks it holds (a sealed frame's tag aside).
KEEP_BUFFER_BYTES = 3 * MAX_RUN * CHUNK_SIZE

#: Threads that verify and write arriving chunks and send chunks from disk.
WORKER_THREADS = 2

#: A request that has made no progress (no chunk arrived) for this long is
#: given up, and its chunks go back into the queue for other sources
#: (seconds).  Every chunk that arrives starts the count again.
REQUEST_TIMEOUT = 10.0

#: Simultaneous incoming requests one peer serves; more get "busy".
MAX_UPLOADS = 32

#: Share of the upload slots one address may hold: a quarter of them, but
#: at least MIN_UPLOADS_PER_HOST (all of them, when there are fewer): 8 of
#: the default 32.  A host asking for more streams is "busy", so that one
#: host, however it behaves, leaves most slots to the others.
UPLOADS_PER_HOST_SHARE = 4
MIN_UPLOADS_PER_HOST = 8

#: When every upload slot is taken, a stream that has sent nothing for this
#: long (seconds) while chunks wait on it, not held back by our own upload
#: rate, gives its slot to the new request: its requester is not reading,
#: and must not hold a slot an honest peer could use.  (Alone, such a
#: stream lasts until IDLE_TIMEOUT.)
UPLOAD_RECLAIM_AFTER = 5.0

#: Verification failures after which a peer is banned for the session.
MAX_STRIKES = 3

#: Seconds the address of a banned peer stays banned too, so that a liar
#: that comes back under a new peer id from the same address is not asked
#: again; not for ever, as an address may pass to someone else.
BAN_ADDRESS_SECONDS = 600.0

#: Requests of one download that may time out on one source before it is
#: no longer asked.
MAX_TIMEOUTS = 3

#: Seconds a source rests after a request to it timed out, so that its
#: chunks go to the others first.
TIMEOUT_REST = 5.0

#: First and longest rest after a "busy" answer (doubling in between).
BUSY_BACKOFF_MIN = 0.25
BUSY_BACKOFF_MAX = 8.0

#: Near the end, a chunk whose request has made no progress for this long is
#: asked of another source too (seconds); the first copy to arrive wins.
ENDGAME_STALL = 2.0

#: Requests a chunk may be in at once (the endgame's duplicates included).
ENDGAME_COPIES = 2

#: Seconds between asking a partial holder which chunks it has now.
HAVE_REFRESH = 2.0

#: Chunks described by one "have" answer: a 128 KiB bitmap, under MAX_FRAME.
HAVE_PAGE = 8 * 128 * 1024

#: Burst of the upload token bucket, in bytes: two chunks, so a stream is
#: never held back to less than a chunk at a time, and the rate stays true
#: over any second.
UPLOAD_BURST = 2 * CHUNK_SIZE

# -- Peer table and network catalog bounds (spoofed announces cannot grow
# -- memory or CPU without limit).

#: Peers kept in the peer table.  Announces are unauthenticated datagrams, so
#: anyone on the LAN can invent peer ids; beyond this many, new ids are
#: dropped (and counted) while the peers already known are still refreshed.
MAX_PEERS = 256

#: Peers kept per source address, by default (C{--max-peers-per-host}):
#: peers on one host share its address, and a test rig or a host full of
#: containers may run dozens; a quarter of the table still leaves one
#: address unable to fill it.
MAX_PEERS_PER_HOST = 64

#: Addresses kept per peer (IPv4 and IPv6, a host on several LANs); more
#: are ignored, so nobody can grow one entry without limit.
MAX_ADDRESSES_PER_PEER = 8

#: Characters of a peer's name kept (it is remote text, shown in listings).
MAX_PEER_NAME = 64

#: Other peers one announce passes on (peer exchange); as many as fit in
#: MAX_DATAGRAM are sent, a different slice each time.
MAX_EXCHANGE_PEERS = 32

#: Peers heard of through peer exchange that we remember having contacted,
#: so that each is tried at most once per peer timeout.
MAX_EXCHANGE_CANDIDATES = 256

#: Introductions (a unicast announce to a peer heard of through peer
#: exchange): a burst of this many, refilled at EXCHANGE_INTRO_RATE per
#: second, so that a peer passing on invented addresses cannot make us
#: flood anyone.
EXCHANGE_INTRO_BURST = 32
EXCHANGE_INTRO_RATE = 8.0

#: A peer that learns of a peer beyond its broadcast domains tells its own
#: LAN at once rather than at the next interval, but at most this often (s).
EARLY_ANNOUNCE_INTERVAL = 1.0

#: Goodbyes remembered, so that the second goodbye of a peer that has left
#: (over its other address) is not taken for a spoofed one.
MAX_DEPARTED = 256

#: Our own addresses remembered (heard when our announces come back to
#: us), so that we never introduce ourselves to ourselves.
MAX_OWN_ADDRESSES = 64

#: C{--peer} targets: each is sent an announce every interval.
MAX_PEER_TARGETS = 64

#: Unicast replies to newcomers (new ids or restarts): a burst of this many,
#: refilled at NEWCOMER_REPLY_RATE per second.  A newcomer that is not
#: answered still hears our next periodic announce.
NEWCOMER_REPLY_BURST = 32
NEWCOMER_REPLY_RATE = 8.0

#: Catalog entries kept across all peers (~40 MB, and under a second to
#: list); a peer whose catalog would go over this keeps only what fits.
MAX_CATALOG_ENTRIES = 100_000

#: Catalog fetches under way at once: each may hold a catalog of up to
#: MAX_CATALOG_FILES entries in memory until it is stored.
CATALOG_FETCHES = 8

#: Sources of a download that race for its manifest at once; the others
#: wait for the winner (or for a racer to fail, and take its place), then
#: ask only which chunks they hold.  Each racer fetches the whole manifest
#: before the race is decided: 8 sources of a 1 TiB file fetched 8 x 128
#: MiB of hashes.  Two keep a slow or lying first source from holding the
#: download up.
MANIFEST_RACERS = 2

#: Seconds the manifest race may go without a page arriving before the
#: sources waiting join it anyway: racers that stall (silent, or slow to
#: answer) hold the download up no longer than that.
MANIFEST_RACE_PATIENCE = 1.0

#: Seconds a peer has to answer each manifest or "have" call of a download
#: before it is left out of it (its connection closed), so that a silent
#: peer costs the others nothing.
ANSWER_TIMEOUT = 10.0

#: Seconds a whole catalog fetch may take, and each of its answers (a page
#: of 32 KiB is answered in milliseconds by any live peer): a peer whose
#: port accepts and never answers gives its place up soon.
CATALOG_FETCH_TIMEOUT = 20.0
CATALOG_ANSWER_TIMEOUT = 5.0

#: Seconds to wait for a TCP connection to a peer.
CONNECT_TIMEOUT = 5.0

#: First and longest wait before a failed catalog fetch is tried again
#: (doubling in between), so an unreachable peer costs little.
CATALOG_RETRY_MIN = 2.0
CATALOG_RETRY_MAX = 60.0

# -- Private groups.

#: A sealed discovery datagram is taken only if its time is within this
#: many seconds of ours (s): a datagram replayed later than that is dropped
#: even by a peer that has restarted and forgotten the counters it saw.
#: Members' clocks must agree this closely.
DATAGRAM_TIME_WINDOW = 60.0

#: Counters of a sender's run accepted out of order, below the highest one
#: seen (its datagrams to several links may arrive reordered).
REPLAY_WINDOW = 64

#: Runs (peer id and instance) whose counters are remembered.  Only
#: members of the group can add one; the least recently heard goes first.
MAX_REPLAY_RECORDS = 4096

#: Seconds a TLS handshake (and the check of the peer's certificate) may
#: take before the connection is dropped: a stranger cannot hold one open.
HANDSHAKE_TIMEOUT = 10.0

# -- Distribution (T+2 and T+3).

#: Chunks named in one offer on a distributee port: 4 MiB of room asked at
#: once, so a refusal (no room, held already) is known before the bytes go.
MAX_OFFER_CHUNKS = 64

#: Chunks one distributor connection may hold room for at once (offered and
#: accepted, not yet pushed): a connection cannot sit on a cache's space.
MAX_OFFERED_CHUNKS = 64

#: Chunks all the connections from one address may hold room for at once
#: (distribution pushes per peer): twice what one connection may, so that a
#: host opening MAX_CONNECTIONS_PER_HOST connections to our distributee port
#: cannot reserve the whole cache and keep the honest distributors out; an
#: offer past it is refused as "busy", and the room comes back as its
#: chunks are pushed or its connections close.
MAX_OFFERED_CHUNKS_PER_HOST = 2 * MAX_OFFERED_CHUNKS

#: Chunks a distributor offers at a time (then pushes those accepted).
OFFER_GROUP = 16

#: Chunk copies one distribution round may plan for this peer, pushes or a
#: pull answer (distribution pushes per round).  2048 copies of 256 KiB are
#: 512 MiB, 51 MB/s over a 10 s round: more than background distribution
#: should take of a LAN, so it binds only a peer with no upload cap.  It
#: keeps a plan's time (tens of ms at most) and memory bounded whatever the
#: files and peers.
MAX_ROUND_COPIES = 2048

#: Pulls (on our distributor port) whose pushes may be under way at once
#: for one address, and for all addresses.  A pull costs us pushes of up to
#: MAX_ROUND_COPIES chunks, to the asker's own address; a host that pulls
#: again under invented peer ids before those are done is told "busy", so
#: that a pull storm cannot queue pushes without end, nor a distributee that
#: never answers hold more than one of the PUSHES_AT_ONCE places.
MAX_PULLS_PER_HOST = 1
MAX_PULLS_AT_ONCE = 8

#: Frames a distribution connection may send ahead of our answers; a
#: distributor waits for each answer, so more is a misbehaving peer, and
#: the connection is dropped (each frame may be a 256 KiB chunk in memory,
#: and a host may hold 64 connections).
MAX_DISTRIBUTION_QUEUE = 2

#: Seconds a chunk pushed (or on its way) counts as held by its target
#: before that target's catalog shows it: long enough for its catalog to be
#: fetched again, short enough that a chunk lost on the way is sent again.
PENDING_PUSH_SECONDS = 60.0

#: Seconds from a change of the cache to the new revision being announced:
#: the chunks of a burst of pushes are told in one announce, not one each.
CACHE_ANNOUNCE_DELAY = 1.0

#: Peers a distributor pushes to at once.
PUSHES_AT_ONCE = 4

#: Seconds after which a push whose target has not answered leaves its
#: place among PUSHES_AT_ONCE (it waits on, up to
#: DISTRIBUTION_ANSWER_TIMEOUT, outside the limit), and the round stops
#: waiting for it: targets that never answer cannot hold up the others.
SLOW_ANSWER = 5.0

#: Seconds a target that did not answer within DISTRIBUTION_ANSWER_TIMEOUT
#: is given no more pushes (unless it pulls, which shows it answers).
SILENT_TARGET_REST = 600.0

#: Seconds a distribution waits between looks at whether downloads still
#: use the uploads (they go first).
DISTRIBUTION_YIELD = 0.25

#: While downloads are being served, distribution still sends one chunk
#: every this many seconds (1 MiB/s at most, all its pushes together), so
#: that a peer that is always serving spreads its files all the same.
DISTRIBUTION_TRICKLE = 1.0

#: Seconds a manifest fetch may take when a push for a new file comes.
MANIFEST_FETCH_TIMEOUT = 10.0

#: Seconds a distributor waits for the answer to an offer (the target may
#: first fetch the manifest from up to three peers) or a push, before it
#: gives up on that target for this round.
DISTRIBUTION_ANSWER_TIMEOUT = 45.0

"""
L{ReplicaPlanner}: which chunks of our files go to which peers, with no
reactor.  The invariants are properties over random networks; a few plain
tests pin the behaviour a reader would look for first.
"""

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from twisted_p2p.manifest import CHUNK_SIZE, Manifest
from twisted_p2p.replication import (
    MAX_REPLICAS,
    MAX_ROUND_COPIES,
    FileShape,
    PeerView,
    Push,
    ReplicaPlanner,
    eviction_order,
)

FILE = "f" * 64
OTHER_FILE = "e" * 64
ME = "0" * 32
PEERS = [f"{i:032x}" for i in range(1, 11)]
AMPLE = 1 << 40

# -- a network, and the view each of its whole holders has of it ----------


class Network(dict):
    """
    Peer id -> (free, holdings) for every peer, and the L{shapes} of the
    files.
    """

    def __init__(self, shapes, peers=()):
        dict.__init__(self, peers)
        self.shapes = shapes


def view_of(network, own_id):
    """
    What C{own_id} knows: its files (those it holds whole) and every other
    peer.
    """
    _, own_holdings = network[own_id]
    files = {f: network.shapes[f] for f, held in own_holdings.items() if held is None}
    peers = [
        PeerView(peer_id, free, holdings)
        for peer_id, (free, holdings) in network.items()
        if peer_id != own_id
    ]
    return files, peers


def held_by(network, peer_id, file_id, index):
    _, holdings = network[peer_id]
    if file_id not in holdings:
        return False
    held = holdings[file_id]
    if held is None:
        return True
    if isinstance(held, bytes):
        return index // 8 < len(held) and bool(held[index // 8] & (1 << (index % 8)))
    return index in held


def copies(network, file_id, index):
    return sum(held_by(network, p, file_id, index) for p in network)


def need(network, replicas, file_id, index):
    return max(0, replicas + 1 - copies(network, file_id, index))


def planned(plan):
    """
    Every (target, file, index) planned, in order.
    """
    return [(p.target, p.file_id, i) for p in plan for i in p.chunks]


@st.composite
def networks(draw, distributors=1, ample=False, others_whole=True):
    """
    A network of a few peers and files.  The first C{distributors} peers
    hold every file whole; each other peer holds some of each file's
    chunks, as a set or a bitmap (some of them hostile: past the end), or
    (if C{others_whole}) now and then the whole file.

    @param ample: every peer has room for everything.
    """
    chunk_size = draw(st.sampled_from([1, 7, 10]))
    shapes = {}
    file_ids = st.sampled_from([FILE, OTHER_FILE, "d" * 64])
    for file_id in draw(st.lists(file_ids, min_size=1, unique=True)):
        shapes[file_id] = FileShape(draw(st.integers(1, 40 * chunk_size)), chunk_size)
    ids = draw(st.lists(st.sampled_from(PEERS), min_size=distributors, max_size=8, unique=True))
    network = Network(shapes)
    for position, peer_id in enumerate(ids):
        if position < distributors:
            network[peer_id] = (None if not ample else AMPLE, {f: None for f in shapes})
            continue
        if ample:
            free = AMPLE
        else:
            free = draw(st.one_of(st.none(), st.integers(0, 60 * chunk_size)))
        holdings = {}
        for file_id, shape in shapes.items():
            kind = draw(st.sampled_from(["none", "set", "bitmap", "whole"]))
            if kind == "set":
                holdings[file_id] = set(
                    draw(st.lists(st.integers(-3, shape.chunk_count + 3), max_size=10))
                )
            elif kind == "bitmap":
                holdings[file_id] = draw(st.binary(max_size=(shape.chunk_count + 7) // 8 + 2))
            elif kind == "whole" and others_whole and draw(st.integers(0, 4)) == 0:
                holdings[file_id] = None
        network[peer_id] = (free, holdings)
    return network


replicas = st.integers(0, 4)


def check_plan(network, own_id, replicas, plan, pending=()):
    """
    The invariants every plan keeps; returns the bytes it plans.
    """
    shapes = network.shapes
    items = planned(plan)
    assert len(items) == len(set(items)), "a copy is planned twice"
    pending_at = {(p, f, i) for p, f, i in pending}
    per_target = Counter()
    per_chunk = Counter()
    for target, file_id, index in items:
        free, _ = network[target]
        assert target != own_id
        assert free is not None and free > 0
        assert not held_by(network, target, file_id, index)
        assert (target, file_id, index) not in pending_at
        per_target[target] += shapes[file_id].chunk_length(index)
        per_chunk[file_id, index] += 1
    for push in plan:
        assert isinstance(push, Push)
        assert push.size == sum(shapes[push.file_id].chunk_length(i) for i in push.chunks)
    for target, size in per_target.items():
        already = sum(
            shapes[f].chunk_length(i)
            for p, f, i in pending_at
            if p == target and f in shapes and not held_by(network, p, f, i)
        )
        assert size <= network[target][0] - already, "over a target's free space"
    for (file_id, index), count in per_chunk.items():
        extra = sum(1 for p, f, i in pending_at if (f, i) == (file_id, index))
        assert count <= need(network, replicas, file_id, index) - extra, "more copies than needed"
    return sum(per_target.values())


# -- properties ------------------------------------------------------------


@given(networks(), replicas)
def test_a_plan_keeps_every_invariant(network, replicas):
    own_id = next(iter(network))
    files, peers = view_of(network, own_id)
    planner = ReplicaPlanner(own_id, files, peers, replicas)
    plan = planner.plan()
    assert check_plan(network, own_id, replicas, plan) <= planner.deficit()


@given(networks(), replicas)
def test_the_deficit_is_the_missing_copies(network, replicas):
    own_id = next(iter(network))
    files, peers = view_of(network, own_id)
    expected = sum(
        need(network, replicas, f, i) * shape.chunk_length(i)
        for f, shape in files.items()
        for i in range(shape.chunk_count)
    )
    assert ReplicaPlanner(own_id, files, peers, replicas).deficit() == expected


@given(networks(ample=True, others_whole=False), replicas)
def test_deficits_are_filled_exactly_when_there_is_room(network, replicas):
    own_id = next(iter(network))
    files, peers = view_of(network, own_id)
    plan = ReplicaPlanner(own_id, files, peers, replicas).plan(limit=10**9)
    per_chunk = Counter((f, i) for _, f, i in planned(plan))
    for file_id, shape in files.items():
        for index in range(shape.chunk_count):
            candidates = [
                p for p in network
                if p != own_id and not held_by(network, p, file_id, index)
            ]
            expected = min(need(network, replicas, file_id, index), len(candidates))
            assert per_chunk[file_id, index] == expected


@given(networks(), replicas, st.integers(0, 500), st.integers(0, 20))
def test_budget_and_limit_bound_a_round(network, replicas, budget, limit):
    own_id = next(iter(network))
    files, peers = view_of(network, own_id)
    plan = ReplicaPlanner(own_id, files, peers, replicas).plan(budget=budget, limit=limit)
    check_plan(network, own_id, replicas, plan)
    assert sum(p.size for p in plan) <= budget
    assert len(planned(plan)) <= limit


@given(networks(distributors=2), replicas)
def test_distributors_with_one_view_never_fill_the_same_gap(network, replicas):
    first, second = list(network)[:2]
    plans = []
    for own_id in (first, second):
        files, peers = view_of(network, own_id)
        plans.append(ReplicaPlanner(own_id, files, peers, replicas).plan())
    both = planned(plans[0]) + planned(plans[1])
    assert len(both) == len(set(both))
    # Together they are one plan: within every target's room, never more
    # copies than needed (a gap of one copy is filled by one of them only).
    check_plan(network, first, replicas, plans[0] + plans[1])
    mine = {(f, i) for _, f, i in planned(plans[0])}
    theirs = {(f, i) for _, f, i in planned(plans[1])}
    assert not mine & theirs


@given(networks(distributors=3, ample=True, others_whole=False), st.integers(3, 5))
def test_distributors_together_fill_every_gap(network, replicas):
    ids = list(network)[:3]
    union = []
    for own_id in ids:
        files, peers = view_of(network, own_id)
        union += planned(ReplicaPlanner(own_id, files, peers, replicas).plan(limit=10**9))
    per_chunk = Counter((f, i) for _, f, i in union)
    for file_id, shape in network.shapes.items():
        for index in range(shape.chunk_count):
            candidates = [
                p for p in network
                if not held_by(network, p, file_id, index)
            ]
            expected = min(need(network, replicas, file_id, index), len(candidates))
            assert per_chunk[file_id, index] == expected


@given(networks(), replicas, st.randoms(use_true_random=False))
def test_the_order_of_the_view_does_not_matter(network, replicas, random):
    own_id = next(iter(network))
    files, peers = view_of(network, own_id)
    shuffled = list(peers)
    random.shuffle(shuffled)
    files_reversed = dict(reversed(list(files.items())))
    assert (
        ReplicaPlanner(own_id, files, peers, replicas).plan()
        == ReplicaPlanner(own_id, files_reversed, shuffled, replicas).plan()
    )


@given(networks(), replicas, st.integers(0, 40))
def test_what_else_a_peer_lists_does_not_matter(network, replicas, others):
    # A peer that also lists files this one does not offer (more of them
    # than this one's files: the planner then walks this one's files,
    # not the peer's list) is planned for the same.
    own_id = next(iter(network))
    files, peers = view_of(network, own_id)
    padded = [
        PeerView(p.peer_id, p.free,
                 {**{f"{n:064x}": None for n in range(others)}, **p.holdings})
        for p in peers
    ]
    assert (
        ReplicaPlanner(own_id, files, peers, replicas).plan()
        == ReplicaPlanner(own_id, files, padded, replicas).plan()
    )
    assert (
        ReplicaPlanner(own_id, files, peers, replicas).deficit()
        == ReplicaPlanner(own_id, files, padded, replicas).deficit()
    )


@given(networks(), replicas, st.data())
def test_pending_copies_count_as_held(network, replicas, data):
    own_id = next(iter(network))
    files, peers = view_of(network, own_id)
    first = ReplicaPlanner(own_id, files, peers, replicas).plan()
    items = planned(first)
    pending = data.draw(st.lists(st.sampled_from(items), unique=True)) if items else []
    second = ReplicaPlanner(own_id, files, peers, replicas, pending=pending).plan()
    check_plan(network, own_id, replicas, second, pending=pending)


# -- plain cases ------------------------------------------------------------


def test_a_fresh_file_gets_its_copies_spread_over_the_peers():
    shape = FileShape(1000 * CHUNK_SIZE)
    peers = [PeerView(p, AMPLE) for p in PEERS]
    planner = ReplicaPlanner(ME, {FILE: shape}, peers, 2)
    plan = planner.plan(limit=10**9)
    shares = Counter()
    for push in plan:
        shares[push.target] += len(push.chunks)
    assert sum(shares.values()) == 2000
    assert sum(p.size for p in plan) == planner.deficit() == 2 * shape.size
    # Ten targets, 200 copies each on average.
    assert set(shares) == set(PEERS)
    assert all(100 <= share <= 300 for share in shares.values()), shares
    # Two copies of one chunk never go to one peer, and chunks go in order.
    for push in plan:
        assert list(push.chunks) == sorted(push.chunks)


def test_rarest_chunks_go_first():
    shape = FileShape(4 * CHUNK_SIZE)
    holder = PeerView(PEERS[0], None, {FILE: {0, 1}})
    target = PeerView(PEERS[1], AMPLE)
    plan = ReplicaPlanner(ME, {FILE: shape}, [holder, target], 2).plan()
    (push,) = plan
    assert push.target == PEERS[1]
    assert push.chunks == (2, 3, 0, 1)


def test_nothing_to_do_when_every_chunk_has_its_copies():
    shape = FileShape(3 * CHUNK_SIZE)
    peers = [PeerView(PEERS[0], AMPLE, {FILE: None}), PeerView(PEERS[1], AMPLE, {FILE: b"\x07"})]
    planner = ReplicaPlanner(ME, {FILE: shape}, peers + [PeerView(PEERS[2], AMPLE)], 2)
    assert planner.deficit() == 0
    assert planner.plan() == []


def test_never_to_peers_that_host_nothing_or_are_full():
    shape = FileShape(3 * CHUNK_SIZE)
    peers = [PeerView(PEERS[0], None), PeerView(PEERS[1], 0), PeerView(PEERS[2], CHUNK_SIZE - 1)]
    assert ReplicaPlanner(ME, {FILE: shape}, peers, 2).plan() == []


def test_a_short_last_chunk_fits_where_a_full_one_would_not():
    shape = FileShape(2 * CHUNK_SIZE + 10)
    peers = [PeerView(PEERS[0], None, {FILE: {0, 1}}), PeerView(PEERS[1], 10)]
    (push,) = ReplicaPlanner(ME, {FILE: shape}, peers, 1).plan()
    assert push == Push(PEERS[1], FILE, (2,), 10)


def test_a_peer_out_of_room_for_a_chunk_gets_no_more_this_round():
    # It could take the short last chunk, but the ring drops a peer at the
    # first chunk it has no room for, so that a full peer costs no more walks.
    shape = FileShape(2 * CHUNK_SIZE + 10)
    peers = [PeerView(PEERS[0], CHUNK_SIZE + 5)]
    (push,) = ReplicaPlanner(ME, {FILE: shape}, peers, 1).plan()
    assert push == Push(PEERS[0], FILE, (0,), CHUNK_SIZE)


def test_a_manifest_is_a_shape():
    manifest = Manifest.build(CHUNK_SIZE + 1, [b"a" * 32, b"b" * 32])
    plan = ReplicaPlanner(ME, {manifest.file_id: manifest}, [PeerView(PEERS[0], AMPLE)], 1).plan()
    assert plan == [Push(PEERS[0], manifest.file_id, (0, 1), CHUNK_SIZE + 1)]


def test_the_round_limit_holds_by_default():
    shape = FileShape(5000 * CHUNK_SIZE)
    plan = ReplicaPlanner(ME, {FILE: shape}, [PeerView(p, AMPLE) for p in PEERS], 2).plan()
    assert len(planned(plan)) == MAX_ROUND_COPIES


def test_the_budget_stops_the_round():
    shape = FileShape(10 * CHUNK_SIZE)
    plan = ReplicaPlanner(ME, {FILE: shape}, [PeerView(p, AMPLE) for p in PEERS], 2).plan(
        budget=3 * CHUNK_SIZE + 5
    )
    assert sum(p.size for p in plan) == 3 * CHUNK_SIZE


def test_a_file_shared_by_two_peers_is_pushed_by_both_half_and_half():
    shape = FileShape(1000 * CHUNK_SIZE)
    network = Network({FILE: shape}, {ME: (None, {FILE: None}), PEERS[0]: (None, {FILE: None})})
    for p in PEERS[1:]:
        network[p] = (AMPLE, {})
    counts = []
    for own_id in (ME, PEERS[0]):
        files, peers = view_of(network, own_id)
        counts.append(len(planned(ReplicaPlanner(own_id, files, peers, 2).plan(limit=10**9))))
    # Two whole holders: each chunk needs one copy more, from one of them.
    assert sum(counts) == 1000
    assert all(400 <= c <= 600 for c in counts), counts


def test_wanted_answers_a_pull_with_the_askers_share():
    shape = FileShape(100 * CHUNK_SIZE)
    peers = [PeerView(p, AMPLE) for p in PEERS[:4]]
    planner = ReplicaPlanner(ME, {FILE: shape}, peers, 1)
    pushed_to_first = {p.chunks for p in planner.plan(limit=10**9) if p.target == PEERS[0]}
    assert {planner.wanted(PEERS[0], AMPLE, limit=10**9)[FILE]} == pushed_to_first
    # Room for two chunks: its two first ones.
    small = planner.wanted(PEERS[0], 2 * CHUNK_SIZE)
    assert small[FILE] == next(iter(pushed_to_first))[:2]
    assert planner.wanted(PEERS[0], 0) == {}
    assert planner.wanted(ME, AMPLE) == {}
    # A peer the view does not know is taken to hold nothing.
    stranger = "a" * 32
    assert sum(len(c) for c in planner.wanted(stranger, AMPLE, limit=10**9).values()) > 0


def test_the_view_is_checked():
    with pytest.raises(ValueError):
        ReplicaPlanner(ME, {}, [], MAX_REPLICAS + 1)
    with pytest.raises(ValueError):
        ReplicaPlanner(ME, {}, [], -1)
    with pytest.raises(ValueError):
        ReplicaPlanner(ME, {}, [PeerView(PEERS[0]), PeerView(PEERS[0])], 1)
    # A view naming ourselves is ignored, and so is an empty file.
    planner = ReplicaPlanner(
        ME, {FILE: FileShape(0)}, [PeerView(ME, AMPLE, {FILE: None})], 1
    )
    assert planner.plan() == []


# -- eviction ----------------------------------------------------------------


def test_eviction_takes_the_most_copied_first():
    counts = {(FILE, 0): 1, (FILE, 1): 5, (FILE, 2): 3, (OTHER_FILE, 0): 4}
    order = eviction_order(counts, lambda f, i: counts[f, i], salt=ME)
    assert order == [(FILE, 1), (OTHER_FILE, 0), (FILE, 2), (FILE, 0)]


def test_eviction_ties_depend_on_the_cache():
    chunks = [(FILE, i) for i in range(50)]
    orders = {tuple(eviction_order(chunks, lambda f, i: 2, salt=p)) for p in PEERS}
    assert len(orders) == len(PEERS)
    assert eviction_order(chunks, lambda f, i: 2, salt=ME) == eviction_order(
        reversed(chunks), lambda f, i: 2, salt=ME
    )

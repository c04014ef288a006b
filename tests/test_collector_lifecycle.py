"""The collector's lifecycle bookkeeping as pure code: workers, tracking, rolling windows."""

from __future__ import annotations

from qdash_mp.collector.tracking import Tracking
from qdash_mp.collector.windows import Windows
from qdash_mp.collector.workers import MAX_QUEUES_PER_WORKER, Workers
from qdash_mp.histogram import NBUCKETS, bucket_of, count_values, summary


def test_worker_lifecycle_connected_batch_gone_expired() -> None:
    w = Workers(retention=600)
    tok = w.connect("c1", 42, "h1", "worker-1", True, now=100.0)
    w.batch("c1", 101.0, ["mail"], {"mail": 2}, [("mail", "j1", "send", 100.5)])
    (v,) = w.views()
    assert (v.id, v.pid, v.host, v.name, v.state, v.can_requeue) == (
        "c1", 42, "h1", "worker-1", "connected", True,
    )  # fmt: skip
    assert v.queues == ("mail",)
    assert v.connected_at == 100.0
    assert v.last_seen == 101.0
    assert [(j.queue, j.id, j.name, j.started_at) for j in v.active] == [
        ("mail", "j1", "send", 100.5)
    ]
    assert w.active_by_queue() == {"mail": 2}
    # absent gauges/jobs = unchanged; seen() moves last_seen
    w.batch("c1", 102.0, ["sms"], None, None)
    w.seen("c1", 103.0)
    (v,) = w.views()
    assert v.queues == ("mail", "sms")
    assert v.last_seen == 103.0
    assert len(v.active) == 1
    w.disconnect("c1", tok, now=104.0)
    (v,) = w.views()
    assert v.state == "gone"
    assert v.active == ()
    assert v.last_seen == 104.0
    assert w.active_by_queue() == {}
    assert w.expire(104.0 + 599) == 0
    assert len(w) == 1
    assert w.expire(104.0 + 600) == 1
    assert w.views() == []


def test_gauges_replace_and_zero_drops() -> None:
    w = Workers()
    w.connect("a", 1, "h", "", False, 0.0)
    w.connect("b", 2, "h", "", False, 0.0)
    w.batch("a", 1.0, [], {"q": 3, "r": 1}, None)
    w.batch("b", 1.0, [], {"q": 2}, None)
    assert w.active_by_queue() == {"q": 5, "r": 1}
    w.batch("a", 2.0, [], {"q": 0}, [])
    assert w.active_by_queue() == {"q": 2}


def test_reconnect_same_id_is_connected_again_and_old_end_is_ignored() -> None:
    w = Workers()
    old = w.connect("c", 1, "h", "n", False, 0.0)
    w.batch("c", 1.0, ["q"], {"q": 1}, None)
    new = w.connect("c", 1, "h", "n", False, 2.0)  # reconnect before the old end is seen
    w.disconnect("c", old, 3.0)
    (v,) = w.views()
    assert v.state == "connected"
    assert v.connected_at == 2.0
    assert v.queues == ("q",)
    w.disconnect("c", new, 4.0)
    assert w.views()[0].state == "gone"
    w.connect("c", 1, "h", "n", False, 5.0)
    assert w.views()[0].state == "connected"


def test_gone_worker_batches_are_ignored_and_queues_bounded() -> None:
    w = Workers()
    t = w.connect("c", 1, "h", "n", False, 0.0)
    w.batch("c", 0.0, (f"q{i}" for i in range(MAX_QUEUES_PER_WORKER + 5)), None, None)
    assert len(w.views()[0].queues) == MAX_QUEUES_PER_WORKER
    w.disconnect("c", t, 1.0)
    w.batch("c", 2.0, [], {"x": 1}, None)
    assert w.active_by_queue() == {}


def test_views_order_connected_then_recently_gone() -> None:
    w = Workers()
    ta = w.connect("a", 1, "h", "", False, 1.0)
    tb = w.connect("b", 2, "h", "", False, 2.0)
    w.connect("c", 3, "h", "", False, 3.0)
    w.disconnect("a", ta, 4.0)
    w.disconnect("b", tb, 5.0)
    assert [v.id for v in w.views()] == ["c", "b", "a"]


def test_tracking_exact_small_run() -> None:
    t = Tracking()
    ev = [("p", "q", f"j{i}", "job", 10.0 + i, None) for i in range(5)]
    ev += [("s", "q", "j0", "job", 20.0, None), ("d", "q", "j0", "job", 21.0, 1.0)]
    ev += [("s", "q", "j1", "job", 22.0, None), ("f", "q", "j1", "job", 23.0, 0.5)]
    t.apply(ev)
    t.apply(ev)  # resent: no duplicates
    assert [j.id for j in t.pending("q", 0, 50)] == ["j2", "j3", "j4"]
    assert t.pending("q", 0, 50)[0].to_dict() == {
        "id": "j2", "queue": "q", "name": "job", "state": "pending", "enqueued_at": 12.0,
        "started_at": None, "finished_at": None, "runtime": None,
    }  # fmt: skip
    recent = t.recent("q", 0, 50)
    rows = [(j.id, j.state, j.enqueued_at, j.started_at, j.finished_at, j.runtime) for j in recent]
    assert rows == [
        ("j1", "failed", 11.0, 22.0, 23.0, 0.5),
        ("j0", "processed", 10.0, 20.0, 21.0, 1.0),
    ]  # fmt: skip
    assert t.pending("other", 0, 50) == []
    assert t.recent("other", 0, 50) == []
    assert [j.id for j in t.pending("q", 1, 1)] == ["j3"]


def test_tracking_bounded_for_a_large_run() -> None:
    t = Tracking(max_pending=100, max_recent=10, max_queues=2)
    t.apply(("p", "q", f"j{i}", "n", float(i), None) for i in range(1000))
    assert t.counts("q") == (100, 0)
    assert [j.id for j in t.pending("q", 0, 2)] == ["j900", "j901"]
    assert t.dropped == 900
    t.apply(("d", "q", f"j{i}", "n", float(i), 0.1) for i in range(900, 1000))
    assert t.counts("q") == (0, 10)
    assert [j.id for j in t.recent("q", 0, 3)] == ["j999", "j998", "j997"]
    t.apply([("p", "r", "x", "n", 0.0, None), ("p", "s", "y", "n", 0.0, None)])
    assert t.queues() == ["q", "r"]
    assert t.dropped == 901


def test_windows_count_deltas_from_the_baseline() -> None:
    win = Windows()
    rt0 = [0] * NBUCKETS
    count_values(rt0, [0.5] * 7)
    win.prime({"q": (rt0, [0] * NBUCKETS)})
    assert win.summaries("q", 100)["1m"]["runtime"]["count"] == 0
    rt1 = list(rt0)
    values = [0.01, 0.02, 0.03, 0.5]
    count_values(rt1, values)
    wt = [0] * NBUCKETS
    wt[bucket_of(2.0)] = 2
    win.update(100, {"q": (rt1, wt), "new": (rt1, wt)})
    s = win.summaries("q", 100)
    exp = [0] * NBUCKETS
    count_values(exp, values)
    assert s["1m"]["runtime"] == summary(exp).as_dict()
    assert s["1m"]["wait"]["count"] == 2
    assert s["1h"]["runtime"]["count"] == 4
    assert win.summaries("new", 100)["5m"]["runtime"]["count"] == 11  # new: counts from zero
    assert win.summaries("q", 103)["1m"]["runtime"]["count"] == 0  # rolled out
    assert win.summaries("q", 103)["5m"]["runtime"]["count"] == 4
    assert win.summaries("nope", 100)["1h"]["wait"]["count"] == 0

"""Queue figures read from a real Redis, and the rules that mark a queue stuck."""

import redis.asyncio as aioredis

from shared.queues import ConsumerReport, GroupReport, problems_of, queues_report, stream_report


async def test_a_streams_figures_are_read_from_redis(redis_url, namespace):
    client = aioredis.Redis.from_url(redis_url)
    stream = f"{namespace}:referrals"
    try:
        ids = [await client.xadd(stream, {"n": str(i)}) for i in range(5)]
        await client.xgroup_create(stream, "notifications", id="0")
        await client.xgroup_create(stream, "intake", id="0")
        await client.xreadgroup("notifications", "n-1", {stream: ">"}, count=3)  # 3 delivered, none acked
        await client.xack(stream, "notifications", ids[0])
        await client.xadd(stream + ".dlq", {"n": "poison"})

        report = await stream_report(client, stream)
        assert (report.length, report.dead_letters) == (5, 1)
        groups = {g.name: g for g in report.groups}
        assert (groups["notifications"].pending, groups["notifications"].lag) == (2, 2)
        assert groups["notifications"].oldest_pending_ms is not None
        assert [(c.name, c.pending) for c in groups["notifications"].consumers] == [("n-1", 2)]
        assert (groups["intake"].pending, groups["intake"].lag, groups["intake"].consumers) == (0, 5, [])
        assert groups["intake"].problems == ["no_live_consumer"]  # five entries wait and nobody reads
        assert not groups["notifications"].stuck

        everything = await queues_report(client, namespace)
        assert [r.stream for r in everything] == [
            f"{namespace}:{s}" for s in ("needs", "referrals", "deliveries", "access", "inbound")
        ]
    finally:
        await client.aclose()


def group(pending=0, lag=0, oldest=None, idle=(100,)):
    return GroupReport("g", pending, lag, oldest, [ConsumerReport(f"c{i}", 0, ms) for i, ms in enumerate(idle)])


def test_the_rules_that_mark_a_queue_stuck():
    assert problems_of(group(), None) == []
    assert problems_of(group(pending=1, idle=(60_000,)), None) == ["no_live_consumer"]
    assert problems_of(group(lag=5000), None) == ["lag"]
    assert problems_of(group(pending=2, oldest=10 * 60_000), None) == ["old_pending"]
    assert problems_of(group(pending=3), group(pending=2)) == ["pending_growing"]
    assert problems_of(group(pending=2), group(pending=3)) == []

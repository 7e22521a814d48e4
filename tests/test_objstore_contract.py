"""The ObjectStore contract, run against memfs, localfs, LocalStack S3 and moto alike."""

from __future__ import annotations

import asyncio
import time

import pytest

from simplequeue import keys
from simplequeue.objstore import (
    InvalidKey,
    ObjectNotFound,
    ObjectStore,
    PreconditionFailed,
    StoreUnavailable,
    store_from_url,
)
from simplequeue.objstore.base import KEY_PART_MAX, check_key, content_etag
from tests.conftest import OpenStore


async def test_get_missing_key_raises_object_not_found(store: ObjectStore) -> None:
    with pytest.raises(ObjectNotFound):
        await store.get("topics/nothing.json")


async def test_put_then_get_returns_bytes_and_same_etag(store: ObjectStore) -> None:
    data = bytes(range(256)) * 10
    etag = await store.put("a/b.json", data)
    assert await store.get("a/b.json") == (data, etag)


async def test_put_overwrites_and_changes_etag(store: ObjectStore) -> None:
    first = await store.put("k", b"one")
    second = await store.put("k", b"two")
    assert first != second
    assert await store.get("k") == (b"two", second)


async def test_create_only_succeeds_on_missing_key(store: ObjectStore) -> None:
    etag = await store.put_if("k", b"v1", if_none_match=True)
    assert await store.get("k") == (b"v1", etag)


async def test_create_only_fails_on_existing_key_and_keeps_data(store: ObjectStore) -> None:
    etag = await store.put("k", b"v1")
    with pytest.raises(PreconditionFailed):
        await store.put_if("k", b"v2", if_none_match=True)
    assert await store.get("k") == (b"v1", etag)


async def test_if_match_with_current_etag_writes(store: ObjectStore) -> None:
    etag = await store.put("k", b"v1")
    new = await store.put_if("k", b"v2", if_match=etag)
    assert new != etag
    assert await store.get("k") == (b"v2", new)


async def test_if_match_with_stale_etag_fails_and_keeps_data(store: ObjectStore) -> None:
    stale = await store.put("k", b"v1")
    current = await store.put_if("k", b"v2", if_match=stale)
    with pytest.raises(PreconditionFailed):
        await store.put_if("k", b"v3", if_match=stale)
    assert await store.get("k") == (b"v2", current)


async def test_if_match_on_missing_key_fails(store: ObjectStore) -> None:
    etag = await store.put("k", b"v1")
    await store.delete("k")
    with pytest.raises(PreconditionFailed):
        await store.put_if("k", b"v2", if_match=etag)
    with pytest.raises(ObjectNotFound):
        await store.get("k")


async def test_of_writes_sent_at_once_under_one_condition_exactly_one_lands(
    store: ObjectStore,
) -> None:
    """Group commit rests on it: of conditional writes sent at once under one
    ETag (or to a missing key), one lands and every other is refused. moto's
    threaded server checked the ETag, then wrote, unlocked: several landed (a
    lost update, and a job claimed twice in three_committers on moto);
    moto/start.sh serves its requests one at a time. (On a loaded machine a
    write may also time out, its outcome unknown: one of those may be the
    one that landed, never a second.)"""
    etag = None
    body = bytes(512 * 1024)  # moto's window between check and write grew with the body
    for n in range(4):
        bodies = [b"%d-%d" % (n, i) + body for i in range(12)]
        writes = [store.put_if("k", b, if_match=etag, if_none_match=etag is None) for b in bodies]
        outcomes = await asyncio.gather(*writes, return_exceptions=True)
        landed = [i for i, o in enumerate(outcomes) if isinstance(o, str)]
        unknown = [i for i, o in enumerate(outcomes) if isinstance(o, StoreUnavailable)]
        refused = [o for o in outcomes if isinstance(o, PreconditionFailed)]
        assert len(landed) + len(unknown) + len(refused) == 12, outcomes
        data, etag = await store.get("k")
        assert len(landed) <= 1 and data in [bodies[i] for i in landed or unknown], outcomes
        assert not landed or outcomes[landed[0]] == etag, outcomes


async def test_put_if_needs_exactly_one_condition(store: ObjectStore) -> None:
    with pytest.raises(ValueError):
        await store.put_if("k", b"v")
    with pytest.raises(ValueError):
        await store.put_if("k", b"v", if_match="x", if_none_match=True)
    with pytest.raises(ObjectNotFound):
        await store.get("k")


async def test_put_if_after_writes_the_objects_then_the_key(store: ObjectStore) -> None:
    objects = {"t/seg-a.json": b"a" * 3000, "t/seg-b.json": b"b", "u/seg-c.json": b"c"}
    etag = await store.put_if_after(objects, "t.json", b"head1", if_none_match=True)
    assert await store.get("t.json") == (b"head1", etag)
    for key, body in objects.items():
        assert (await store.get(key))[0] == body
    again = await store.put_if_after({}, "t.json", b"head2", if_match=etag)
    assert await store.get("t.json") == (b"head2", again)


async def test_put_if_after_leaves_an_existing_object_as_it_is(store: ObjectStore) -> None:
    """An object that exists was written by an earlier try: kept, and the key
    is still written."""
    kept = await store.put("t/seg-a.json", b"first")
    etag = await store.put_if_after(
        {"t/seg-a.json": b"second", "t/seg-b.json": b"b"}, "t.json", b"head", if_none_match=True
    )
    assert await store.get("t/seg-a.json") == (b"first", kept)
    assert (await store.get("t/seg-b.json"))[0] == b"b"
    assert await store.get("t.json") == (b"head", etag)


async def test_put_if_after_fails_on_the_keys_condition_alone(store: ObjectStore) -> None:
    """PreconditionFailed is about the key: the objects were written, the
    key keeps its bytes."""
    current = await store.put("t.json", b"head1")
    with pytest.raises(PreconditionFailed):
        await store.put_if_after(
            {"t/seg-a.json": b"a"}, "t.json", b"head2", if_match=content_etag(b"other")
        )
    with pytest.raises(PreconditionFailed):
        await store.put_if_after({"t/seg-b.json": b"b"}, "t.json", b"head3", if_none_match=True)
    assert await store.get("t.json") == (b"head1", current)
    assert (await store.get("t/seg-a.json"))[0] == b"a"
    assert (await store.get("t/seg-b.json"))[0] == b"b"


async def test_put_if_after_with_a_bad_object_key_writes_nothing(store: ObjectStore) -> None:
    with pytest.raises(InvalidKey):
        await store.put_if_after({"../x": b"a"}, "t.json", b"head", if_none_match=True)
    with pytest.raises(ValueError):
        await store.put_if_after({"t/seg-a.json": b"a"}, "t.json", b"head")
    with pytest.raises(ObjectNotFound):
        await store.get("t.json")


async def test_a_missing_key_beside_keys_under_its_name_is_not_found(store: ObjectStore) -> None:
    """On localfs "a" with "a/b" stored is a folder: get() raised
    StoreUnavailable (EISDIR), an outage retried for ever, where the key is
    missing (review finding)."""
    await store.put("a/b", b"x")
    await store.put("c", b"y")
    for missing in ("a", "c/d", "c/d/e"):
        with pytest.raises(ObjectNotFound):
            await store.get(missing)
        with pytest.raises(PreconditionFailed):
            await store.put_if(missing, b"v", if_match=content_etag(b"x"))
        await store.delete(missing)
    assert await store.list() == ["a/b", "c"]


async def test_delete_removes_and_tolerates_missing(store: ObjectStore) -> None:
    await store.put("k", b"v")
    await store.delete("k")
    await store.delete("k")
    with pytest.raises(ObjectNotFound):
        await store.get("k")


async def test_list_filters_by_prefix_and_sorts(store: ObjectStore) -> None:
    for key in ["topics/b.json", "topics/a.json", "topics/a/seg-1.json", "broker.json"]:
        await store.put(key, b"{}")
    assert await store.list("topics/") == [
        "topics/a.json",
        "topics/a/seg-1.json",
        "topics/b.json",
    ]
    assert await store.list("topics/a/") == ["topics/a/seg-1.json"]
    assert await store.list("nothing/") == []
    assert "broker.json" in await store.list()


async def test_list_top_leaves_out_what_is_under_a_further_slash(store: ObjectStore) -> None:
    """A listing of topics listed every segment of every topic (a LIST request
    per 1,000 objects on S3, every 2 s with a status page open, and at every
    take-over): list_top lists a folder's own objects, as S3's delimiter does."""
    keys = ["topics/b.json", "topics/a.json", "topics/a/seg-1.json", "topics/a/x/y.json"]
    for key in [*keys, "topics-not/c.json", "broker.json"]:
        await store.put(key, b"{}")
    assert await store.list_top("topics/") == ["topics/a.json", "topics/b.json"]
    assert await store.list_top("topics/a") == ["topics/a.json"]
    assert await store.list_top("topics/a/") == ["topics/a/seg-1.json"]
    assert await store.list_top("nothing/") == []
    assert await store.list_top("") == ["broker.json"]


async def test_list_folders_names_the_folders_holding_keys_under_a_prefix(
    store: ObjectStore,
) -> None:
    """The sweep finds which topics have objects beside their head (a topic of
    one object has no orphans) in one listing, not a listing per topic."""
    keys = ["topics/b.json", "topics/a.json", "topics/a/seg-1.json", "topics/c/x/y.json"]
    for key in [*keys, "topics-not/d/e.json", "broker.json"]:
        await store.put(key, b"{}")
    assert await store.list_folders("topics/") == ["topics/a/", "topics/c/"]
    assert await store.list_folders("topics/c/") == ["topics/c/x/"]
    assert await store.list_folders("topics/a/") == []
    assert await store.list_folders("nothing/") == []


async def test_sweeping_leftovers_removes_no_key(store: ObjectStore) -> None:
    keys = ["topics/a.json", "topics/a/seg-1.json", "broker.json"]
    for key in keys:
        await store.put(key, b"{}")
    assert await store.sweep_leftovers(0.0) == 0  # no write was cut short
    assert await store.list() == sorted(keys)


@pytest.mark.parametrize("key", ["", "../x", "/abs", "a//b", "a/../b", ".hidden", "a/.b", "a b"])
async def test_unsafe_keys_are_rejected_and_nothing_is_written(
    store: ObjectStore, key: str
) -> None:
    with pytest.raises(InvalidKey):
        await store.put(key, b"v")
    with pytest.raises(InvalidKey):
        await store.get(key)
    assert await store.list() == []


async def test_a_key_part_is_stored_up_to_its_limit_and_invalid_past_it(
    store: ObjectStore,
) -> None:
    """check_key took parts up to 1,024 characters, but localfs's temp and
    journal names add up to 47 bytes to a part, within a file name's 255: a
    part of 218-255 characters failed every put with StoreUnavailable
    (ENAMETOOLONG, an outage), and so did a get of a missing key with a part
    of 247 or more (review finding). simplequeue's own keys stay valid."""
    longest = "k" * KEY_PART_MAX
    etag = await store.put(f"t/{longest}", b"v1")
    for n in (2, 3):  # rewritten with If-Match within a second: localfs journals it
        etag = await store.put_if(f"t/{longest}", f"v{n}".encode(), if_match=etag)
    assert await store.get(f"t/{longest}") == (b"v3", etag)
    with pytest.raises(ObjectNotFound):
        await store.get("m" * KEY_PART_MAX)
    for n in (KEY_PART_MAX + 1, 250, 1000):
        with pytest.raises(InvalidKey):
            await store.put("k" * n, b"v")
        with pytest.raises(InvalidKey):
            await store.get("m" * n)
    assert await store.list() == [f"t/{longest}"]
    check_key(keys.head("t" * 128))
    check_key(keys.segment("t" * 128, "p123456789-0123456789ab"))
    check_key(keys.registration("b" * 128))


async def test_now_is_the_stores_time_which_agrees_with_ours_on_one_machine(
    store: ObjectStore,
) -> None:
    await store.put("k", b"v")
    assert abs(store.now() - time.time()) < 2
    assert store.now() <= store.now()


async def test_twenty_concurrent_conditional_writers_one_winner_per_round(
    open_store: OpenStore,
) -> None:
    # Each writer has its own handle, as separate brokers would.
    handles = [await open_store() for _ in range(20)]
    etag = await handles[0].put("race", b"round-0")
    for round_no in range(1, 6):

        async def attempt(i: int, h: ObjectStore, expected: str, r: int = round_no) -> str | None:
            try:
                return await h.put_if("race", f"round-{r}-w{i}".encode(), if_match=expected)
            except PreconditionFailed:
                return None

        results = await asyncio.gather(*(attempt(i, h, etag) for i, h in enumerate(handles)))
        winners = [(i, e) for i, e in enumerate(results) if e is not None]
        assert len(winners) == 1, f"round {round_no}: {len(winners)} winners"
        winner, new_etag = winners[0]
        assert await handles[0].get("race") == (
            f"round-{round_no}-w{winner}".encode(),
            new_etag,
        )
        etag = new_etag


async def test_concurrent_create_only_has_one_winner(open_store: OpenStore) -> None:
    handles = [await open_store() for _ in range(20)]

    async def attempt(i: int, h: ObjectStore) -> bool:
        try:
            await h.put_if("once", f"w{i}".encode(), if_none_match=True)
            return True
        except PreconditionFailed:
            return False

    wins = await asyncio.gather(*(attempt(i, h) for i, h in enumerate(handles)))
    assert sum(wins) == 1
    data, _ = await handles[0].get("once")
    assert data == f"w{wins.index(True)}".encode()


async def test_second_handle_sees_first_handles_writes(open_store: OpenStore) -> None:
    a, b = await open_store(), await open_store()
    etag = await a.put("shared", b"hello")
    assert await b.get("shared") == (b"hello", etag)


def test_store_from_url_picks_backend_by_scheme(tmp_path: object) -> None:
    from simplequeue.objstore.localfs import LocalStore
    from simplequeue.objstore.memfs import MemStore
    from simplequeue.objstore.s3 import S3Store

    assert isinstance(store_from_url("mem://"), MemStore)
    assert isinstance(store_from_url(f"file://{tmp_path}"), LocalStore)
    s3 = store_from_url("s3://bucket/some/prefix?endpoint_url=http://127.0.0.1:1&region=eu-west-1")
    assert isinstance(s3, S3Store)
    assert s3.settings.bucket == "bucket"
    assert s3.settings.prefix == "some/prefix"
    assert s3.settings.endpoint_url == "http://127.0.0.1:1"
    assert s3.settings.region == "eu-west-1"


@pytest.mark.parametrize("prefix", ["q?a=1", "q#1", "q&x", "50%", "a b/c"])
def test_an_s3_store_url_opens_the_same_prefix(prefix: str) -> None:
    """ObjectStore.url: "A URL that store_from_url() would open to reach the
    same data". S3Store.url pasted the prefix in unquoted and store_from_url()
    did not unquote it: a prefix with '?' or '#' (legal in S3 keys, and
    --prefix takes any) opened another prefix (review of s3, round 23)."""
    from simplequeue.objstore.s3 import S3Settings, S3Store

    store = S3Store(
        S3Settings(bucket="bucket", prefix=prefix, endpoint_url="http://h:1", region="eu-west-1")
    )
    again = store_from_url(store.url)
    assert isinstance(again, S3Store)
    assert (again.settings.prefix, again.settings.endpoint_url, again.settings.region) == (
        prefix,
        "http://h:1",
        "eu-west-1",
    )


@pytest.mark.parametrize(
    "url",
    [
        "ftp://x",
        "file://relative/dir",
        "s3://",
        "s3://b/p?colour=red",
        "s3://b/p?endpoint_url=localhost:9000",  # no scheme: botocore refused it at first use
        "nothing",
    ],
)
def test_store_from_url_rejects_bad_urls(url: str) -> None:
    with pytest.raises(ValueError):
        store_from_url(url)


async def test_named_mem_stores_share_data_and_anonymous_ones_do_not() -> None:
    a, b = store_from_url("mem://shared-test"), store_from_url("mem://shared-test")
    await a.put("k", b"v")
    assert (await b.get("k"))[0] == b"v"
    with pytest.raises(ObjectNotFound):
        await store_from_url("mem://").get("k")

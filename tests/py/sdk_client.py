"""The official Dapr Python SDK against Outrigger's bridge, unmodified: run by tests/it/grpc.rs.

Usage: sdk_client.py SCENARIO [ARGS...]; the SDK finds the sidecar through DAPR_GRPC_PORT /
DAPR_HTTP_PORT (set by the test). Every check raises on failure; the last line printed is
{"ok": true, ...} on success.
"""

import json
import os
import sys
import time

import grpc
from dapr.clients import DaprClient
from dapr.clients.exceptions import DaprGrpcError
from dapr.clients.grpc._state import Concurrency, StateItem, StateOptions
from dapr.clients.grpc._request import TransactionalStateOperation, TransactionOperationType


def expect(cond, what):
    if not cond:
        raise AssertionError(what)


def code_of(call):
    """The gRPC status code name a call fails with (None when it succeeds)."""
    try:
        call()
    except DaprGrpcError as e:
        return e.code().name, e.details()
    except grpc.RpcError as e:
        return e.code().name, e.details()
    except Exception as e:
        # The SDK wraps a refused stream: "Error while initializing stream: <RpcError>".
        cause = e.__cause__
        if isinstance(cause, grpc.RpcError):
            return cause.code().name, cause.details()
        raise
    return None, None


def state(d, store):
    d.save_state(store, "k1", "v1")
    got = d.get_state(store, "k1")
    expect(got.data == b"v1", f"get k1: {got.data!r}")
    etag = got.etag
    expect(etag, "an etag on get")
    # First-write with the current etag passes; a stale etag is a conflict (ABORTED).
    d.save_state(store, "k1", "v2", etag=etag)
    code, details = code_of(lambda: d.save_state(store, "k1", "v3", etag=etag))
    expect(code == "ABORTED", f"stale etag: {code} {details}")
    # Last-write ignores the etag.
    d.save_state(
        store, "k1", "v4", etag=etag,
        options=StateOptions(concurrency=Concurrency.last_write),
    )
    expect(d.get_state(store, "k1").data == b"v4", "last-write")
    # Bulk save and bulk get, a missing key among them.
    d.save_bulk_state(store, [StateItem("b1", "one"), StateItem("b2", '{"n":2}')])
    items = {i.key: i for i in d.get_bulk_state(store, ["b1", "b2", "nope"]).items}
    expect(items["b1"].data == b"one", f"bulk b1: {items['b1'].data!r}")
    expect(items["b2"].data == b'{"n":2}', f"bulk b2: {items['b2'].data!r}")
    expect(items["nope"].data == b"", "bulk missing key")
    # A transaction: all or nothing.
    d.execute_state_transaction(store, [
        TransactionalStateOperation(key="t1", data="x"),
        TransactionalStateOperation(operation_type=TransactionOperationType.delete, key="b1"),
    ])
    expect(d.get_state(store, "t1").data == b"x", "tx upsert")
    expect(d.get_state(store, "b1").data == b"", "tx delete")
    cur = d.get_state(store, "t1").etag
    code, _ = code_of(lambda: d.execute_state_transaction(store, [
        TransactionalStateOperation(key="t2", data="y"),
        TransactionalStateOperation(key="t1", data="z", etag=str(int(cur) + 7)),
    ]))
    expect(code == "ABORTED", f"tx with a stale etag: {code}")
    expect(d.get_state(store, "t2").data == b"", "a failed tx wrote nothing")
    # Delete with and without an etag.
    code, _ = code_of(lambda: d.delete_state(store, "t1", etag=str(int(cur) + 7)))
    expect(code == "ABORTED", f"delete with a stale etag: {code}")
    d.delete_state(store, "t1", etag=cur)
    expect(d.get_state(store, "t1").data == b"", "deleted")
    # A value with a ttl says when it expires.
    d.save_state(store, "ttl", "short", state_metadata={"ttlInSeconds": "60"})
    got = d.get_state(store, "ttl")
    expect(got.data == b"short", "ttl value")
    raw = d._stub.GetState(__import__("dapr.proto").proto.api_v1.GetStateRequest(store_name=store, key="ttl"))
    expect("ttlExpireTime" in raw.metadata, f"ttlExpireTime: {dict(raw.metadata)}")
    # Errors as daprd maps them.
    code, details = code_of(lambda: d.get_state("no-such-store", "k"))
    expect(code == "INVALID_ARGUMENT" and "no-such-store" in details, f"unknown store: {code} {details}")
    code, _ = code_of(lambda: d.save_state(store, "", "v"))
    expect(code == "INVALID_ARGUMENT", f"empty key: {code}")
    return {"store": store}


def pubsub(d, name):
    topic = "orders-" + str(os.getpid())
    sub = d.subscribe(pubsub_name=name, topic=topic, dead_letter_topic=topic + "-dead")
    dead = d.subscribe(pubsub_name=name, topic=topic + "-dead")
    try:
        # A second stream on the same topic is refused.
        code, _ = code_of(lambda: d.subscribe(pubsub_name=name, topic=topic).next_message())
        expect(code == "ALREADY_EXISTS", f"a duplicate subscription: {code}")
        for i in range(3):
            d.publish_event(name, topic, json.dumps({"n": i}), data_content_type="application/json")
        # n=1 is answered RETRY once (redelivered), n=2 DROP (to the dead-letter topic).
        seen, retried, deadline = {}, False, time.time() + 30
        while len(seen) < 3 and time.time() < deadline:
            m = sub.next_message()
            if m is None:
                continue
            n = m.data()["n"]
            expect(m.topic() == topic and m.pubsub_name() == name, "topic and pubsub")
            if n == 1 and not retried:
                retried = True
                sub.respond_retry(m)
                continue
            if n == 2:
                sub.respond_drop(m)
            else:
                sub.respond_success(m)
            seen[n] = m.id()
        expect(sorted(seen) == [0, 1, 2] and retried, f"delivered: {seen}, retried {retried}")
        m, deadline = None, time.time() + 30
        while m is None and time.time() < deadline:
            m = dead.next_message()
        expect(m is not None and m.data()["n"] == 2, "the dropped event on the dead-letter topic")
        expect(m.topic() == topic + "-dead", f"the dead-letter event's topic: {m.topic()}")
        dead.respond_success(m)
        # Metadata lists the streaming subscription (the SDK's wrapper drops subscriptions: ask
        # through its own generated stub).
        from dapr.proto import api_v1
        raw = d._stub.GetMetadata(api_v1.GetMetadataRequest())
        subs = [s for s in raw.subscriptions if s.topic == topic]
        expect(subs and subs[0].type == 3 and subs[0].dead_letter_topic == topic + "-dead",
               f"metadata: {subs}")
    finally:
        sub.close()
        dead.close()
    # Bulk publish (the SDK tries BulkPublishEvent, then the Alpha1 name).
    res = d.publish_events(name, topic + "-bulk", ["a", "b"], data_content_type="text/plain")
    expect(not res.failed_entries, f"bulk publish: {res.failed_entries}")
    code, _ = code_of(lambda: d.publish_event("no-such-pubsub", topic, "x"))
    expect(code == "INVALID_ARGUMENT", f"unknown pubsub: {code}")
    return {"pubsub": name, "delivered": len(seen)}


def misc(d, callee):
    # Secrets from a local file store.
    s = d.get_secret("secrets", "db")
    expect(s.secret == {"user": "admin", "password": "s3cret"}, f"secret: {s.secret}")
    bulk = d.get_bulk_secret("secrets").secrets
    expect(bulk["db"]["user"] == "admin", f"bulk secrets: {bulk}")
    code, _ = code_of(lambda: d.get_secret("nope", "db"))
    expect(code == "INVALID_ARGUMENT", f"unknown secret store: {code}")
    # Metadata, and extended metadata set over gRPC.
    d.set_metadata("team", "payments")
    md = d.get_metadata()
    expect(md.application_id == "pyapp", f"app id: {md.application_id}")
    names = {c.name for c in md.registered_components}
    expect({"statestore", "secrets"} <= names, f"components: {names}")
    expect(md.extended_metadata.get("team") == "payments", f"extended: {md.extended_metadata}")
    # Invocation over gRPC (InvokeService) of an app id that names a cluster.
    r = d.invoke_method(callee, "echo/path", data=b"ping", http_verb="POST", content_type="text/plain")
    expect(b"ping" in r.data, f"invoke: {r.data!r}")
    code, _ = code_of(lambda: d.invoke_method("nobody", "x", data=b"", http_verb="GET"))
    expect(code is not None, "invoking an unknown app id fails")
    # Building blocks we do not serve say so.
    # Served, but no binding of that name is configured here.
    code, details = code_of(lambda: d.invoke_binding("b", "create", "x"))
    expect(code == "INTERNAL" and "output binding b" in details, f"binding: {code} {details}")
    # Served, but no lock store is configured here.
    code, details = code_of(lambda: d.try_lock("store", "res", "me", 10))
    expect(code == "FAILED_PRECONDITION" and "lock" in details, f"lock: {code} {details}")
    return {"metadata": md.application_id}


def shutdown(d):
    d.shutdown()
    return {"shutdown": True}


def lock(d, store):
    from dapr.clients.grpc._response import UnlockResponseStatus as S

    expect(d.try_lock(store, "order-1", "alice", 60).success, "alice takes the lock")
    expect(not d.try_lock(store, "order-1", "bob", 60).success, "bob does not")
    expect(d.unlock(store, "order-1", "bob").status == S.lock_belongs_to_others, "bob's unlock")
    expect(d.unlock(store, "order-1", "alice").status == S.success, "alice's unlock")
    expect(d.unlock(store, "order-1", "alice").status == S.lock_does_not_exist, "unlock twice")
    # As a context manager: released on exit.
    with d.try_lock(store, "order-2", "carol", 60) as held:
        expect(held, "carol takes order-2")
        expect(not d.try_lock(store, "order-2", "dave", 60), "dave waits")
    expect(d.try_lock(store, "order-2", "dave", 60).success, "released on exit")
    code, details = code_of(lambda: d.try_lock("nope", "r", "o", 5))
    expect(code == "INVALID_ARGUMENT", f"unknown store: {code} {details}")
    code, details = code_of(lambda: d.try_lock(store, "a||b", "o", 5))
    expect(code == "INTERNAL" and "||" in details, f"a key with the separator: {code} {details}")
    return {}


def configuration(d, store, redis_port):
    import subprocess
    import threading

    def redis_set(key, value):
        subprocess.run(["redis-cli", "-p", redis_port, "SET", key, value], check=True,
                       capture_output=True)

    redis_set("orderconfig", "v1||1")
    got = d.get_configuration(store, ["orderconfig", "missing"])
    item = got.items["orderconfig"]
    expect((item.value, item.version) == ("v1", "1"), f"get: {got.items}")
    expect("missing" not in got.items, f"missing key: {got.items}")
    seen, changed = [], threading.Event()

    def handler(sub_id, response):
        for key, it in response.items.items():
            seen.append((sub_id, key, it.value, it.version))
            changed.set()

    sub_id = d.subscribe_configuration(store, ["orderconfig"], handler)
    expect(sub_id, f"a subscription id: {sub_id!r}")
    redis_set("orderconfig", "v2||2")
    # Bounded wait: the change reaches the handler (no timing assertion beyond the bound).
    expect(changed.wait(10), f"the change reached the handler: {seen}")
    expect(seen[0] == (sub_id, "orderconfig", "v2", "2"), f"change: {seen}")
    expect(d.unsubscribe_configuration(store, sub_id), "unsubscribe")
    code, details = code_of(lambda: d.get_configuration("nope", ["a"]))
    expect(code == "INVALID_ARGUMENT", f"unknown store: {code} {details}")
    return {"changes": len(seen)}


def binding(d, name):
    r = d.invoke_binding(name, "create", b"ping", binding_metadata={"path": "/hook", "x-team": "pay"})
    echoed = json.loads(r.data)
    expect((echoed["method"], echoed["path"], echoed["body"]) == ("POST", "/hook", "ping"), f"{echoed}")
    expect("x-team: pay" in echoed["headers"], f"headers: {echoed['headers']}")
    expect(r.binding_metadata.get("statusCode") == "200", f"metadata: {r.binding_metadata}")
    code, details = code_of(lambda: d.invoke_binding(name, "get", binding_metadata={"path": "/status/503"}))
    expect(code == "INTERNAL" and "503" in details, f"a 503: {code} {details}")
    return {}


def main():
    scenario, args = sys.argv[1], sys.argv[2:]
    with DaprClient() as d:
        out = {
            "state": state, "pubsub": pubsub, "misc": misc, "shutdown": shutdown, "lock": lock,
            "configuration": configuration, "binding": binding,
        }[scenario](d, *args)
    out["ok"] = True
    print(json.dumps(out))


if __name__ == "__main__":
    main()

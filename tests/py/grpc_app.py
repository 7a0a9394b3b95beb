"""An app built with the official `dapr-ext-grpc` (in the `dapr` wheel), unmodified: it serves
Dapr's AppCallback gRPC service on APP_PORT. Run by tests/it/grpc.rs as the supervised app of a
sidecar with `app.protocol: grpc`. It writes what it receives, one JSON line each, to OUT.
"""

import json
import os

from cloudevents.sdk.event import v1
from dapr.clients.grpc._response import TopicEventResponse
from dapr.ext.grpc import App, BindingRequest, InvokeMethodRequest, InvokeMethodResponse

app = App()
# Dapr's app health check (AppCallbackHealthCheck), which the sidecar's `grpc: dapr` probe calls.
app.register_health_check(lambda: None)
out = os.environ["OUT"]
retried = set()


def record(**kv):
    with open(out, "a") as f:
        f.write(json.dumps(kv) + "\n")


@app.subscribe(pubsub_name="pubsub", topic="orders", dead_letter_topic="orders-dead")
def orders(event: v1.Event) -> TopicEventResponse:
    data = json.loads(event.Data())
    # "retry-me" is answered RETRY once, "drop-me" DROP (to the dead-letter topic).
    if data.get("id") == "retry-me" and "retry-me" not in retried:
        retried.add("retry-me")
        record(topic="orders", id=data["id"], status="retry")
        return TopicEventResponse("retry")
    if data.get("id") == "drop-me":
        record(topic="orders", id=data["id"], status="drop")
        return TopicEventResponse("drop")
    record(topic="orders", id=data.get("id"), status="success", type=event.EventType())
    return TopicEventResponse("success")


@app.subscribe(pubsub_name="pubsub", topic="orders-dead")
def dead(event: v1.Event) -> TopicEventResponse:
    record(topic="orders-dead", id=json.loads(event.Data()).get("id"), status="success")
    return TopicEventResponse("success")


@app.binding("tick")
def tick(request: BindingRequest):
    # An input binding (bindings.cron): OnBindingEvent, listed by ListInputBindings.
    record(binding="tick", readTimeUTC=request.binding_metadata.get("readTimeUTC"))


@app.method(name="hello")
def hello(request: InvokeMethodRequest) -> InvokeMethodResponse:
    return InvokeMethodResponse(b"hi " + request.data, "text/plain; charset=UTF-8")


app.run(int(os.environ["APP_PORT"]))

// End-to-end check of the bridge with the official Dapr JavaScript SDK over HTTP.
// `node e2e.mjs server`: a DaprServer on APP_PORT answering the invoked methods `hello`,
// `publish` (publishes to pubsub/orders through its sidecar) and `received` (what its
// subscription to pubsub/orders got).
// `node e2e.mjs client`: state save/get/delete/transaction, publish, an invocation of the app
// `server`, and a round trip through the server's pub/sub, via the sidecar at DAPR_HTTP_PORT;
// prints one JSON line and exits 0 when everything held.
// `node e2e.mjs grpc-client`: the same SDK in gRPC mode (state, publish, metadata) against the
// sidecar's gRPC API at DAPR_GRPC_PORT.
import { CommunicationProtocolEnum, DaprClient, DaprServer, HttpMethod } from "@dapr/dapr";
import assert from "node:assert/strict";

const daprHost = "127.0.0.1";
const daprPort = process.env.DAPR_HTTP_PORT;
const mode = process.argv[2];

if (mode === "server") {
  const server = new DaprServer({
    serverHost: "127.0.0.1",
    serverPort: process.env.APP_PORT,
    communicationProtocol: CommunicationProtocolEnum.HTTP,
    clientOptions: { daprHost, daprPort },
  });
  // Pub/sub: the app subscribes (the sidecar asks GET /dapr/subscribe once the app is up),
  // publishes through its own sidecar when invoked, and reports what it received.
  const received = [];
  await server.pubsub.subscribe("pubsub", "orders", async (data) => {
    received.push(data && data.data !== undefined && data.specversion ? data.data : data);
  });
  await server.invoker.listen(
    "publish",
    async (data) => {
      const body = typeof data.body === "string" ? JSON.parse(data.body) : data.body;
      await server.client.pubsub.publish("pubsub", "orders", body);
      return { published: true };
    },
    { method: HttpMethod.POST },
  );
  // Bulk publish (the SDK sends `entryID`, matched as daprd's Go decoder does) to a topic of
  // its own, so `received` keeps only the single publishes.
  const bulkReceived = [];
  await server.pubsub.subscribe("pubsub", "bulk-orders", async (data) => {
    bulkReceived.push(data && data.data !== undefined && data.specversion ? data.data : data);
  });
  await server.invoker.listen(
    "publishBulk",
    async () => server.client.pubsub.publishBulk("pubsub", "bulk-orders", [{ n: 1 }, { n: 2 }]),
    { method: HttpMethod.POST },
  );
  await server.invoker.listen("received", async () => ({ received, bulkReceived }), {
    method: HttpMethod.GET,
  });
  await server.invoker.listen(
    "hello",
    async (data) => {
      const body = typeof data.body === "string" ? JSON.parse(data.body) : data.body;
      return { hello: body.name, appId: process.env.APP_ID };
    },
    { method: HttpMethod.POST },
  );
  await server.start();
  console.log("server started");
} else if (mode === "client") {
  const client = new DaprClient({
    daprHost,
    daprPort,
    communicationProtocol: CommunicationProtocolEnum.HTTP,
  });
  await client.start();
  const store = "statestore";
  const saved = await client.state.save(store, [
    { key: "order-1", value: { item: "book", qty: 2 } },
    { key: "greeting", value: "hello" },
  ]);
  assert.deepEqual(saved, {}, `save failed: ${JSON.stringify(saved)}`);
  assert.deepEqual(await client.state.get(store, "order-1"), { item: "book", qty: 2 });
  assert.equal(await client.state.get(store, "greeting"), "hello");
  const bulk = await client.state.getBulk(store, ["order-1", "greeting"]);
  assert.equal(bulk.length, 2);
  assert.deepEqual(await client.state.delete(store, "greeting"), {});
  assert.equal(await client.state.get(store, "greeting"), "");
  await client.state.transaction(store, [
    { operation: "upsert", request: { key: "order-2", value: { item: "pen" } } },
    { operation: "delete", request: { key: "order-1" } },
  ]);
  assert.deepEqual(await client.state.get(store, "order-2"), { item: "pen" });
  assert.equal(await client.state.get(store, "order-1"), "");
  const answer = await client.invoker.invoke("server", "hello", HttpMethod.POST, { name: "js" });
  assert.deepEqual(answer, { hello: "js", appId: "server" });
  // Publish on the client's own sidecar (embedded in-memory pubsub): accepted.
  await client.pubsub.publish("pubsub", "audit", { who: "js" });
  // Through the server: its sidecar delivers the event to its subscription.
  let got = [];
  for (let i = 0; i < 50 && got.length === 0; i++) {
    await client.invoker.invoke("server", "publish", HttpMethod.POST, { orderId: 7 });
    for (let j = 0; j < 10 && got.length === 0; j++) {
      await new Promise((r) => setTimeout(r, 100));
      got = (await client.invoker.invoke("server", "received", HttpMethod.GET)).received;
    }
  }
  assert.deepEqual(got[0], { orderId: 7 }, `received: ${JSON.stringify(got)}`);
  // publishBulk through the server's sidecar: accepted whole, and both entries delivered.
  const bulkAnswer = await client.invoker.invoke("server", "publishBulk", HttpMethod.POST, {});
  assert.deepEqual(bulkAnswer.failedMessages, [], `publishBulk: ${JSON.stringify(bulkAnswer)}`);
  let bulkGot = [];
  for (let i = 0; i < 100 && bulkGot.length < 2; i++) {
    await new Promise((r) => setTimeout(r, 100));
    bulkGot = (await client.invoker.invoke("server", "received", HttpMethod.GET)).bulkReceived;
  }
  assert.deepEqual(
    bulkGot.map((e) => e.n).sort(),
    [1, 2],
    `bulk received: ${JSON.stringify(bulkGot)}`,
  );
  const metadata = await client.metadata.get();
  assert.equal(metadata.id, "client");
  console.log(JSON.stringify({ ok: true, answer, received: got }));
  await client.stop();
  process.exit(0);
} else if (mode === "grpc-client") {
  // The same SDK in gRPC mode, against the bridge's gRPC API at DAPR_GRPC_PORT.
  const client = new DaprClient({
    daprHost,
    daprPort: process.env.DAPR_GRPC_PORT,
    communicationProtocol: CommunicationProtocolEnum.GRPC,
  });
  await client.start();
  const store = "statestore";
  await client.state.save(store, [
    { key: "g-1", value: { item: "book", qty: 2 } },
    { key: "g-2", value: "hello" },
  ]);
  assert.deepEqual(await client.state.get(store, "g-1"), { item: "book", qty: 2 });
  assert.equal(await client.state.get(store, "g-2"), "hello");
  const bulk = await client.state.getBulk(store, ["g-1", "g-2", "missing"]);
  assert.equal(bulk.length, 3, JSON.stringify(bulk));
  // (The SDK's gRPC transaction takes string values only: Buffer.from(value).)
  await client.state.transaction(store, [
    { operation: "upsert", request: { key: "g-3", value: "pen" } },
    { operation: "delete", request: { key: "g-1" } },
  ]);
  assert.equal(await client.state.get(store, "g-3"), "pen");
  assert.equal(await client.state.get(store, "g-1"), "");
  await client.state.delete(store, "g-3");
  assert.equal(await client.state.get(store, "g-3"), "");
  const published = await client.pubsub.publish("pubsub", "audit", { who: "js-grpc" });
  assert.equal(published.error, undefined, JSON.stringify(published));
  const metadata = await client.metadata.get();
  assert.equal(metadata.id, "client");
  console.log(JSON.stringify({ ok: true, grpc: true }));
  await client.stop();
  process.exit(0);
} else {
  console.error("usage: node e2e.mjs server|client|grpc-client");
  process.exit(64);
}

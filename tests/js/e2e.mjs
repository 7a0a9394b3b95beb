// End-to-end check of the bridge with the official Dapr JavaScript SDK over HTTP.
// `node e2e.mjs server`: a DaprServer on APP_PORT answering the invoked method `hello`.
// `node e2e.mjs client`: state save/get/delete/transaction and an invocation of the app `server`
// through the sidecar at DAPR_HTTP_PORT; prints one JSON line and exits 0 when everything held.
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
  const metadata = await client.metadata.get();
  assert.equal(metadata.id, "client");
  console.log(JSON.stringify({ ok: true, answer }));
  await client.stop();
  process.exit(0);
} else {
  console.error("usage: node e2e.mjs server|client");
  process.exit(64);
}

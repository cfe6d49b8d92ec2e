// The README's example: run `node clients/node/examples/quickstart.mjs` against `scripts/run.sh`'s daemon.
import { Client, CubeNameTaken } from "memos-client";

// 127.0.0.1:50051 (or $MEMOS_TARGET); the local admin's token file (or $MEMOS_TOKEN / $MEMOS_TOKEN_FILE).
const client = new Client();
try {
  await client.allocCube("agent-1-node");
} catch (error) {
  if (!(error instanceof CubeNameTaken)) throw error; // a second run uses the cube the first made
}
const mount = await client.mount("agent-1-node", { writable: true });
await mount.write(["The user prefers metric units"], { tags: ["preference"] });
const { revision } = await mount.commit("learned a preference");
console.log(`revision ${revision?.number} at ${revision?.create_time?.toISOString()}`);
for (const hit of await mount.search("which units?", { k: 3 })) {
  console.log(hit.score.toFixed(3), hit.item?.text);
}
await mount.activate();
const reply = client.generate("Which units should I use?", [mount], { maxTokens: 16 });
for await (const delta of reply) process.stdout.write(delta);
console.log(`\nTTFT ms: ${(reply.summary?.ttft_us ?? 0) / 1000}, reused tokens: ${reply.summary?.reused_tokens}`);
await mount.unmount();
client.close();

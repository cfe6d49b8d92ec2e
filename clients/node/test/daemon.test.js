// The typed client against a real memosd: MEMOS_TEST_TARGET and MEMOS_TEST_DATA_DIR name it.
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { mkdtempSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { after, before, describe, test } from "node:test";

import {
  AuthenticationFailed, Client, CubeEmpty, CubeNotFound, InvalidField, JobFinished, MemosError, MountReadOnly, NotFound,
  ResourceExhausted, WireError,
} from "../src/index.js";
import { DATA_DIR, NO_DAEMON, TARGET, newClient, uniqueName } from "./helpers.js";

describe("against a real daemon", { skip: NO_DAEMON }, () => {
  /** @type {Client} */
  let client;
  before(() => { client = newClient(); });
  after(() => client.close());

  test("alloc, mount, write, commit, search and read 150 items of 32 KB: past grpc-js's 4 MiB default", async () => {
    const cube = await client.allocCube(uniqueName("big"));
    const mount = await client.mount(cube.name, { writable: true });
    // 150 items at the daemon's default max_item_bytes (32 KiB): one Read answer of ~4.8 MB.
    const items = Array.from({ length: 150 }, (_, i) => `item ${i} ${"memory ".repeat(4570)}`.slice(0, 32_000));
    const ids = await mount.write(items, { tags: ["bulk"] });
    assert.equal(ids.length, 150);
    assert.equal(mount.info.staged_adds, 150);
    const { revision } = await mount.commit("150 large items");
    assert.equal(revision?.number, 1);
    assert.equal(mount.info.base_revision, 1);
    const hits = await mount.search("item 7 memory", { k: 5, mode: "lexical" });
    assert.equal(hits.length, 5);
    assert.ok(hits.every((hit) => hit.item?.tags.includes("bulk") && typeof hit.score === "number"));

    const read = await mount.read(ids);
    assert.deepEqual(read.map((item) => item.text), items);
    assert.ok(read.every((item) => item.born_revision === 1 && item.write_time instanceof Date));

    // The same Read through grpc-js's default receive limit fails: the client's limit is what makes it work.
    const small = newClient({ channelOptions: { "grpc.max_receive_message_length": 4 * 1024 * 1024 } });
    try {
      await assert.rejects(small.read(mount, ids), (e) => e instanceof ResourceExhausted && e.reason === "");
    } finally {
      small.close();
    }
  });

  test("log, diff and rollback, with Dates and numbers", async () => {
    const cube = await client.allocCube(uniqueName("history"));
    const mount = await client.mount(cube.name, { writable: true });
    const [first] = await mount.write(["first version"]);
    await mount.commit("one");
    await mount.write([{ item_id: first, text: "second version" }, "another item"]);
    await mount.commit("two", { author: "node" });

    const log = await client.log(cube.name);
    assert.deepEqual(log.map((r) => [r.number, r.message, r.kind]),
      [[2, "two", "REVISION_KIND_COMMIT"], [1, "one", "REVISION_KIND_COMMIT"]]);
    assert.equal(log[0].author, "node");
    assert.ok(log.every((r) => r.create_time instanceof Date && Math.abs(Date.now() - r.create_time.getTime()) < 600_000));
    assert.deepEqual((await client.log(cube.name, { limit: 1 })).map((r) => r.number), [2]);

    const diff = await client.diff(cube.name, 1, 2);
    assert.equal(diff.fromRevision, 1);
    assert.equal(diff.toRevision, 2);
    assert.deepEqual(diff.changes.map((c) => c.kind).sort(), ["CHANGE_KIND_ADDED", "CHANGE_KIND_CHANGED"]);
    const changed = diff.changes.find((c) => c.kind === "CHANGE_KIND_CHANGED");
    assert.equal(changed?.before?.text, "first version");
    assert.equal(changed?.after?.text, "second version");
    assert.equal(diff.adapterChange, null);

    const rolled = await client.rollback(cube.name, 1, { message: "undo two" });
    assert.equal(rolled.number, 3);
    assert.equal(rolled.kind, "REVISION_KIND_ROLLBACK");
    assert.equal(rolled.restored_revision, 1);
    const head = await client.mount(cube.name);
    assert.deepEqual((await head.read([first])).map((i) => i.text), ["first version"]);
    await head.unmount();
  });

  test("ingest commits a conversation as one revision", async () => {
    const cube = await client.allocCube(uniqueName("chat"));
    const mount = await client.mount(cube.name, { writable: true });
    const when = new Date("2024-05-01T12:00:00Z");
    const response = await mount.ingest([
      { speaker: "user", text: "I adopted a cat named Miso", time: when },
      { speaker: "assistant", text: "Congratulations on Miso!" },
    ], { sessionId: "s1" });
    assert.equal(response.item_ids.length, 2);
    assert.equal(response.revision?.number, 1);
    const [turn] = await mount.read([response.item_ids[0]]);
    assert.equal(turn.speaker, "user");
    assert.equal(turn.session_id, "s1");
    assert.equal(turn.event_time?.toISOString(), when.toISOString());
    assert.equal(turn.next_item_id, response.item_ids[1]);
  });

  test("errors arrive as the class of their reason, with code and metadata", async () => {
    const missing = uniqueName("missing");
    await assert.rejects(client.statCube(missing), (e) => {
      assert.ok(e instanceof CubeNotFound && e instanceof NotFound && e instanceof MemosError);
      assert.equal(e.reason, "CUBE_NOT_FOUND");
      assert.equal(e.codeName, "NOT_FOUND");
      assert.deepEqual(e.metadata, { cube: missing });
      return true;
    });
    await assert.rejects(client.allocCube("not a valid name!"), (e) => {
      assert.ok(e instanceof InvalidField);
      assert.equal(e.reason, "INVALID_FIELD");
      assert.equal(e.codeName, "INVALID_ARGUMENT");
      assert.equal(e.metadata.field, "name");
      return true;
    });
  });

  test("an unknown enum name is refused client-side, and nothing is sent", async () => {
    const cube = await client.allocCube(uniqueName("enum"));
    await assert.rejects(client.call("Mount", { cube: cube.name, mode: "READ_WRITE" }),
      (e) => e instanceof WireError && /not a MountMode/.test(e.message));
    await assert.rejects(client.search([], "q", { mode: /** @type {any} */ ("fuzzy") }), TypeError);
    assert.equal((await client.statCube(cube.name)).mount_count, 0);
  });

  test("64-bit fields: numbers in the typed API, exact decimal strings at the proto level", async () => {
    const stats = await client.stats();
    assert.equal(typeof stats.uptime_seconds, "number");
    assert.equal(typeof stats.store_bytes, "number");
    assert.ok(stats.store_bytes > 0);
    const raw = await new Promise((resolve, reject) => {
      client.raw.Stats({}, client.metadata, (/** @type {unknown} */ e, /** @type {any} */ r) => (e ? reject(e) : resolve(r)));
    });
    assert.equal(typeof raw.store_bytes, "string");
    assert.match(raw.store_bytes, /^\d+$/);
    assert.equal(typeof raw.model.state, "string"); // enums and nested messages decode as plain values
  });

  test("the token comes from the data dir, a token file, or $MEMOS_TOKEN_FILE, and auth errors name it", async () => {
    const fromDir = new Client(TARGET, { dataDir: DATA_DIR });
    try {
      assert.equal(fromDir.tokenSource, path.join(DATA_DIR, "admin.token"));
      assert.equal((await fromDir.whoAmI()).name, "admin");
    } finally {
      fromDir.close();
    }
    const adminFile = path.join(DATA_DIR, "admin.token");
    const fromFile = new Client(TARGET, { tokenFile: adminFile });
    try {
      assert.ok((await fromFile.whoAmI()).admin);
    } finally {
      fromFile.close();
    }
    const saved = process.env.MEMOS_TOKEN_FILE;
    process.env.MEMOS_TOKEN_FILE = adminFile;
    const fromEnv = new Client(TARGET);
    try {
      assert.equal(fromEnv.tokenSource, adminFile);
      assert.ok((await fromEnv.whoAmI()).create_time instanceof Date);
    } finally {
      fromEnv.close();
      if (saved === undefined) delete process.env.MEMOS_TOKEN_FILE; else process.env.MEMOS_TOKEN_FILE = saved;
    }
    const wrong = path.join(mkdtempSync(path.join(os.tmpdir(), "memos-node-")), "wrong.token");
    writeFileSync(wrong, "mtk.prn_nobody.secret\n");
    const bad = new Client(TARGET, { tokenFile: wrong });
    try {
      await assert.rejects(bad.whoAmI(), (e) => e instanceof AuthenticationFailed && e.message.includes(wrong));
    } finally {
      bad.close();
    }
    const dir = mkdtempSync(path.join(os.tmpdir(), "memos-node-"));
    writeFileSync(path.join(dir, "empty.token"), "\n");
    assert.throws(() => new Client(TARGET, { tokenFile: path.join(dir, "empty.token") }), /is empty/);
  });

  test("Generate streams deltas, then the summary (once the model is ready)", { timeout: 180_000 }, async () => {
    const deadline = Date.now() + 150_000;
    let state = "";
    while (Date.now() < deadline) {
      state = (await client.stats()).model?.state ?? "";
      if (state !== "loading") break;
      await new Promise((resolve) => setTimeout(resolve, 500));
    }
    assert.equal(state, "ready", "the daemon's model is not ready");
    const generation = client.generate("Say hello.", [], { maxTokens: 4, retrieveK: 0, seed: 7n });
    const deltas = [];
    for await (const delta of generation) deltas.push(delta);
    const summary = generation.summary;
    assert.ok(summary, "the last message carries the summary");
    assert.ok(summary.completion_tokens >= 1 && summary.completion_tokens <= 4);
    assert.ok(["FINISH_REASON_LENGTH", "FINISH_REASON_END"].includes(summary.finish_reason));
    assert.equal(summary.token_ids.length, summary.completion_tokens);
    assert.equal(typeof summary.ttft_us, "number");
    assert.ok(deltas.join("").length > 0);
  });

  test("leaving a Generate loop early cancels the stream on the daemon", { timeout: 60_000 }, async () => {
    // Each generated token is one piece of runtime work; uncancelled, this greedy prompt runs all 200.
    const jobsBefore = (await client.stats()).model?.worker_jobs_started ?? 0;
    const generation = client.generate("Write a long story about a dragon who learns to read.", [],
      { maxTokens: 200, retrieveK: 0 });
    for await (const delta of generation) {
      if (delta) break;
    }
    assert.equal(generation.summary, null);
    const deadline = Date.now() + 30_000;
    let active = -1;
    while (Date.now() < deadline) {
      active = (await client.stats()).model?.active_generations ?? -1;
      if (active === 0) break;
      await new Promise((resolve) => setTimeout(resolve, 200));
    }
    assert.equal(active, 0, "the generation still runs on the daemon");
    const jobs = ((await client.stats()).model?.worker_jobs_started ?? 0) - jobsBefore;
    assert.ok(jobs < 40, `the daemon ran ${jobs} pieces of work for a generation cancelled after its first delta`);
  });

  test("extract: a MemReader job over the cube's turns, watched to its end, its counts adding up", { timeout: 300_000 },
    async () => {
      const cube = await client.allocCube(uniqueName("extract"));
      const empty = await client.mount(cube.name, { writable: true });
      await assert.rejects(empty.extract(), (e) => e instanceof CubeEmpty && e.reason === "CUBE_EMPTY");
      await empty.unmount();
      const mount = await client.mount(cube.name, { writable: true });
      await mount.ingest([{ speaker: "Melanie", text: "I love pottery and I paint every Sunday." }], { sessionId: "s1" });
      // 8 tokens: the mechanism, not what the 135M model says (its answer is cut short, and counted as dropped).
      const job = await mount.extract({ maxTokens: 8, message: "node reads the chat" });
      assert.equal(job.kind, "JOB_KIND_EXTRACT");
      assert.equal(job.extract?.turns_total, 1);
      /** @type {string[]} */
      const states = [];
      const final = await client.waitJob(job.job_id, { onUpdate: (j) => states.push(j.state), timeoutMs: 280_000 });
      assert.equal(final.state, "JOB_STATE_SUCCEEDED", final.error);
      assert.equal(states.at(-1), "JOB_STATE_SUCCEEDED");
      const x = final.extract;
      assert.ok(x);
      assert.equal(x.turns_read, 1);
      assert.equal(final.step, 1);
      assert.equal(x.proposed, x.kept + x.dropped + x.refused);
      assert.equal(x.answers_dropped, Object.values(x.answers_dropped_by_reason).reduce((a, b) => a + b, 0));
      assert.ok(final.end_time instanceof Date && typeof final.result_revision === "number");
      assert.deepEqual((await client.listJobs(cube.name)).map((j) => j.job_id), [job.job_id]);
      await assert.rejects(client.cancelJob(job.job_id), (e) => e instanceof JobFinished);
      const readOnly = await client.mount(cube.name);
      await assert.rejects(readOnly.extract(), (e) => e instanceof MountReadOnly);
    });

  test("the README's example runs as written, twice (the second run reuses its cube)", { timeout: 120_000 }, async () => {
    const example = fileURLToPath(new URL("../examples/quickstart.mjs", import.meta.url));
    const env = { ...process.env, MEMOS_TARGET: TARGET, MEMOS_TOKEN_FILE: path.join(DATA_DIR, "admin.token") };
    const revisions = [];
    for (const _run of [1, 2]) {
      const { stdout } = await promisify(execFile)(process.execPath, [example], { env, timeout: 100_000 });
      const made = /^revision (\d+) at \d{4}-\d\d-\d\dT/m.exec(stdout);
      assert.ok(made, stdout);
      revisions.push(Number(made[1]));
      assert.match(stdout, /The user prefers metric units/);
      assert.match(stdout, /TTFT ms: [\d.]+, reused tokens: \d+/);
    }
    assert.equal(revisions[1], revisions[0] + 1);
  });
});

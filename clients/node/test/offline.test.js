// The conversions and the error mapping, without a daemon.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import path from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

import { Metadata, status } from "@grpc/grpc-js";

import { render } from "../scripts/gen-types.js";
import {
  BY_REASON, CubeNotFound, fromServiceError, loadContract, MemosError, messageFromWire, messageToWire, NotFound,
  Unavailable, WireError,
} from "../src/index.js";

const { root, status: statusType, errorInfo } = loadContract();
const type = (/** @type {string} */ name) => root.lookupType(`memos.v1.${name}`);

test("an unknown enum name is refused before sending (protobufjs would encode it as 0)", () => {
  assert.throws(() => messageToWire(type("MountRequest"), { cube: "c", mode: "READ_WRITE" }),
    (e) => e instanceof WireError && e.path === "request.mode" && /not a MountMode/.test(e.message));
  assert.throws(() => messageToWire(type("MountRequest"), { cube: "c", mode: 7 }), WireError);
  assert.deepEqual(messageToWire(type("MountRequest"), { cube: "c", mode: "MOUNT_MODE_READ_WRITE" }),
    { cube: "c", mode: "MOUNT_MODE_READ_WRITE" });
});

test("a key that is not a field is refused, in nested messages too (protobufjs would drop it)", () => {
  assert.throws(() => messageToWire(type("UnmountRequest"), { mountId: "m" }),
    (e) => e instanceof WireError && /UnmountRequest has no such field/.test(e.message));
  assert.throws(() => messageToWire(type("WriteRequest"), { mount_id: "m", items: [{ text: "x", eventTime: 1 }] }),
    (e) => e instanceof WireError && e.path === "request.items[0].eventTime");
});

test("64-bit integers: exact from bigint, safe numbers and decimal strings; inexact ones refused", () => {
  const options = type("GenerationOptions");
  assert.equal(messageToWire(options, { seed: (1n << 64n) - 1n }).seed, "18446744073709551615");
  assert.equal(messageToWire(options, { seed: 42 }).seed, "42");
  assert.equal(messageToWire(options, { seed: "9007199254740993" }).seed, "9007199254740993");
  assert.throws(() => messageToWire(options, { seed: 1n << 64n }), /out of range for uint64/);
  assert.throws(() => messageToWire(options, { seed: -1 }), /out of range for uint64/);
  assert.throws(() => messageToWire(options, { seed: 2 ** 60 }), /exact integer/);
  assert.throws(() => messageToWire(options, { seed: 1.5 }), /exact integer/);
  assert.throws(() => messageToWire(options, { max_tokens: 1.5 }), /integer/);
  // The bytes protobufjs writes hold the exact value (no rounding through a double).
  const encoded = options.encode(options.fromObject(messageToWire(options, { seed: (1n << 64n) - 1n }))).finish();
  const back = options.toObject(options.decode(encoded), { longs: String });
  assert.equal(back.seed, "18446744073709551615");
});

test("decoding: 64-bit decimal strings become numbers, and one beyond 2^53 - 1 is refused, not rounded", () => {
  const revision = type("Revision");
  assert.equal(messageFromWire(revision, { number: "7", item_count: "0" }).number, 7);
  assert.throws(() => messageFromWire(revision, { number: "9007199254740993" }),
    (e) => e instanceof RangeError && /Revision\.number/.test(e.message));
});

test("Timestamps: Date in, Date out, to the millisecond", () => {
  const when = new Date("2024-05-01T12:00:00.123Z");
  const wire = messageToWire(type("ItemInput"), { text: "x", event_time: when });
  assert.deepEqual(wire.event_time, { seconds: "1714564800", nanos: 123_000_000 });
  assert.deepEqual(messageToWire(type("ItemInput"), { text: "x", event_time: "2024-05-01T12:00:00.123Z" }).event_time,
    wire.event_time);
  assert.throws(() => messageToWire(type("ItemInput"), { text: "x", event_time: "yesterday" }), /not a valid date/);
  const item = messageFromWire(type("Item"), { event_time: wire.event_time, write_time: null });
  assert.ok(item.event_time instanceof Date);
  assert.equal(item.event_time.getTime(), when.getTime());
  assert.equal(item.write_time, null);
});

test("every memos.v1.ErrorReason has its class, named by that reason", () => {
  const reasons = root.lookupEnum("memos.v1.ErrorReason").values;
  const expected = Object.keys(reasons).filter((r) => r !== "ERROR_REASON_UNSPECIFIED").sort();
  assert.deepEqual([...BY_REASON.keys()].sort(), expected);
  for (const [reason, cls] of BY_REASON) assert.equal(new cls("m").reason, reason);
});

test("each reason's class has the status code the proto gives that reason, in brackets", () => {
  const reasons = root.lookupEnum("memos.v1.ErrorReason");
  for (const [reason, cls] of BY_REASON) {
    const bracket = /^\[([A-Z_]+)\]/.exec(reasons.comments[reason] ?? "");
    assert.ok(bracket, `${reason} has no [CODE] in its comment`);
    assert.equal(new cls("m").code, status[/** @type {keyof typeof status} */ (bracket[1])], reason);
  }
});

test("timestamps given as {seconds, nanos} are checked too", () => {
  const ok = messageToWire(type("ItemInput"), { text: "x", event_time: { seconds: 5, nanos: 7 } });
  assert.deepEqual(ok.event_time, { seconds: "5", nanos: 7 });
  assert.throws(() => messageToWire(type("ItemInput"), { text: "x", event_time: { seconds: 5, nanos: 1e9 } }),
    /nanos/);
  assert.throws(() => messageToWire(type("ItemInput"), { text: "x", event_time: { secs: 5 } }),
    /request\.event_time\.secs: not a Timestamp field/);
});

/** @param {number} code @param {{reason: string, domain: string, metadata: Record<string, string>}} info */
function serviceError(code, info) {
  const detail = { type_url: "type.googleapis.com/google.rpc.ErrorInfo", value: errorInfo.encode(info).finish() };
  const metadata = new Metadata();
  metadata.set("grpc-status-details-bin",
    Buffer.from(statusType.encode({ code, message: "m", details: [detail] }).finish()));
  return Object.assign(new Error("x"), { code, details: "no cube 'c'", metadata });
}

test("grpc-status-details-bin decodes to the reason's class, with its code and metadata", () => {
  const error = fromServiceError(serviceError(status.NOT_FOUND,
    { reason: "CUBE_NOT_FOUND", domain: "memosd.v1", metadata: { cube: "c" } }));
  assert.ok(error instanceof CubeNotFound && error instanceof NotFound && error instanceof MemosError);
  assert.equal(error.reason, "CUBE_NOT_FOUND");
  assert.equal(error.code, status.NOT_FOUND);
  assert.equal(error.codeName, "NOT_FOUND");
  assert.deepEqual(error.metadata, { cube: "c" });
  assert.equal(error.message, "no cube 'c'");
});

test("a reason of another domain, or none, maps by status code", () => {
  const foreign = fromServiceError(serviceError(status.NOT_FOUND, { reason: "CUBE_NOT_FOUND", domain: "proxy", metadata: {} }));
  assert.equal(foreign.constructor, NotFound);
  assert.equal(foreign.reason, "CUBE_NOT_FOUND");
  const bare = fromServiceError(Object.assign(new Error("down"), { code: status.UNAVAILABLE, details: "down",
    metadata: new Metadata() }));
  assert.equal(bare.constructor, Unavailable);
  assert.equal(bare.reason, "");
});

test("src/messages.js is what scripts/gen-types.js makes from the protos", () => {
  const file = path.join(path.dirname(fileURLToPath(import.meta.url)), "..", "src", "messages.js");
  assert.equal(readFileSync(file, "utf8"), render(), "stale: run `npm run gen-types` in clients/node");
});

test("the README's example is examples/quickstart.mjs (which the daemon suite runs)", () => {
  const here = path.dirname(fileURLToPath(import.meta.url));
  const readme = readFileSync(path.join(here, "..", "README.md"), "utf8");
  const block = /```js\n([\s\S]*?)```/.exec(readme);
  assert.ok(block, "README.md has no js block");
  const example = readFileSync(path.join(here, "..", "examples", "quickstart.mjs"), "utf8");
  // The file's first line says how to run it; the README says that in prose.
  assert.equal(block[1], example.split("\n").slice(1).join("\n"));
});

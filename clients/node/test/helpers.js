// What the daemon tests need: the target and data dir of a running memosd (tests/e2e/test_node_client.py
// passes them), a client on it, and unique cube names.
import { Client } from "../src/index.js";

export const TARGET = process.env.MEMOS_TEST_TARGET ?? "";
export const DATA_DIR = process.env.MEMOS_TEST_DATA_DIR ?? "";
/** Set when the suite has no daemon: the daemon tests skip with this reason. */
export const NO_DAEMON = TARGET && DATA_DIR ? false
  : "set MEMOS_TEST_TARGET and MEMOS_TEST_DATA_DIR to a running memosd (pytest tests/e2e/test_node_client.py does)";

let counter = 0;

/** @param {string} prefix */
export function uniqueName(prefix) {
  counter += 1;
  return `node-${prefix}-${process.pid}-${Date.now().toString(36)}-${counter}`;
}

/** @param {import("../src/client.js").ClientOptions} [options] */
export function newClient(options = {}) {
  return new Client(TARGET, { dataDir: DATA_DIR, ...options });
}

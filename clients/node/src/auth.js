// Where the target and the token come from, in the Python client's order (memos/auth.py), and naming the
// source so an UNAUTHENTICATED error can say which token was sent.
import { readFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";

export const DEFAULT_TARGET = "127.0.0.1:50051";

/** The admin token file of a memosd running as this user on its default data dir. */
export function defaultDataDir() {
  const base = process.env.XDG_DATA_HOME || path.join(os.homedir(), ".local", "share");
  return path.join(base, "memosd");
}

/** @param {string} file @returns {string} */
export function readTokenFile(file) {
  let text;
  try {
    text = readFileSync(file, "utf8");
  } catch (error) {
    const reason = error instanceof Error && "code" in error ? String(error.code) : String(error);
    throw new Error(`cannot read the token file ${file}: ${reason}`);
  }
  const token = text.trim();
  if (!token) throw new Error(`the token file ${file} is empty`);
  return token;
}

/**
 * @typedef {object} TokenOptions
 * @property {string} [token] the bearer token itself
 * @property {string} [tokenFile] a file holding it
 * @property {string} [dataDir] a daemon's data dir: its admin.token (and daemon.json for the target)
 */

/**
 * The token to send and where it came from: the token option, the tokenFile option, <dataDir>/admin.token,
 * $MEMOS_TOKEN, $MEMOS_TOKEN_FILE, then the local admin's token file if it exists
 * (token "" when there is none: calls then fail UNAUTHENTICATED).
 * @param {TokenOptions} [options]
 * @returns {{token: string, source: string}}
 */
export function resolveToken(options = {}) {
  if (options.token) return { token: options.token, source: "the token option" };
  if (options.tokenFile) return { token: readTokenFile(options.tokenFile), source: options.tokenFile };
  if (options.dataDir) {
    const file = path.join(options.dataDir, "admin.token");
    return { token: readTokenFile(file), source: file };
  }
  if (process.env.MEMOS_TOKEN) return { token: process.env.MEMOS_TOKEN.trim(), source: "$MEMOS_TOKEN" };
  if (process.env.MEMOS_TOKEN_FILE) {
    return { token: readTokenFile(process.env.MEMOS_TOKEN_FILE), source: process.env.MEMOS_TOKEN_FILE };
  }
  const local = path.join(defaultDataDir(), "admin.token");
  try {
    return { token: readTokenFile(local), source: local };
  } catch {
    return { token: "", source: "no token (none given, no $MEMOS_TOKEN, no local admin.token)" };
  }
}

/**
 * The target: the argument, the address in <dataDir>/daemon.json, $MEMOS_TARGET, then 127.0.0.1:50051.
 * @param {string} [target]
 * @param {string} [dataDir]
 * @returns {string}
 */
export function resolveTarget(target, dataDir) {
  if (target) return target;
  if (dataDir) {
    const file = path.join(dataDir, "daemon.json");
    let info;
    try {
      info = JSON.parse(readFileSync(file, "utf8"));
    } catch (error) {
      throw new Error(`no running daemon found in ${dataDir}: cannot read ${file} (${String(error)})`);
    }
    if (typeof info?.address === "string" && info.address) return info.address;
    throw new Error(`${file} names no address`);
  }
  if (process.env.MEMOS_TARGET) return process.env.MEMOS_TARGET;
  return DEFAULT_TARGET;
}

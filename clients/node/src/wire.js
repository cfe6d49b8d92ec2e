// Plain values <-> the objects proto-loader encodes and decodes, by protobufjs reflection over memos.v1.
// toWire refuses, before anything is sent, what protobufjs would silently change: a key that is not a
// field (dropped), an unknown enum name (encoded as 0), a number that is not an exact integer (truncated).
// fromWire turns Timestamps into Date and 64-bit decimal strings into numbers (refusing any that a
// number cannot hold exactly).
import protobuf from "protobufjs";

export const INT64_TYPES = new Set(["int64", "uint64", "sint64", "fixed64", "sfixed64"]);
const UNSIGNED = new Set(["uint32", "uint64", "fixed32", "fixed64"]);
const INT32_TYPES = new Set(["int32", "uint32", "sint32", "fixed32", "sfixed32"]);
const TIMESTAMP = ".google.protobuf.Timestamp";
const UINT64_MAX = (1n << 64n) - 1n;
const INT64_MIN = -(1n << 63n);
const INT64_MAX = (1n << 63n) - 1n;

/** A request refused before sending: the path names the field. */
export class WireError extends TypeError {
  /** @param {string} path @param {string} problem */
  constructor(path, problem) {
    super(`${path}: ${problem}`);
    this.name = "WireError";
    this.path = path;
  }
}

/**
 * @param {unknown} value
 * @returns {value is Record<string, unknown>}
 */
function isPlainObject(value) {
  return typeof value === "object" && value !== null && !Array.isArray(value) && !(value instanceof Date)
    && !(value instanceof Uint8Array);
}

/**
 * A Date (or an ISO string) as a google.protobuf.Timestamp; a {seconds, nanos} object is checked and passes.
 * @param {unknown} value @param {string} path
 */
function timestampToWire(value, path) {
  const date = typeof value === "string" ? new Date(value) : value;
  if (date instanceof Date) {
    const ms = date.getTime();
    if (Number.isNaN(ms)) throw new WireError(path, `not a valid date: ${String(value)}`);
    const seconds = Math.floor(ms / 1000);
    return { seconds: String(seconds), nanos: (ms - seconds * 1000) * 1_000_000 };
  }
  if (!isPlainObject(value)) throw new WireError(path, "expected a Date, an ISO 8601 string or {seconds, nanos}");
  for (const key of Object.keys(value)) {
    if (key !== "seconds" && key !== "nanos") throw new WireError(`${path}.${key}`, "not a Timestamp field");
  }
  const seconds = value.seconds ?? 0;
  const nanos = value.nanos ?? 0;
  if (!(typeof seconds === "number" || typeof seconds === "string" || typeof seconds === "bigint")
      || !/^-?\d+$/.test(String(seconds))) {
    throw new WireError(`${path}.seconds`, "expected an integer");
  }
  if (typeof nanos !== "number" || !Number.isInteger(nanos) || nanos < 0 || nanos > 999_999_999) {
    throw new WireError(`${path}.nanos`, "expected an integer in [0, 999999999]");
  }
  return { seconds: String(seconds), nanos };
}

/** @param {protobuf.Field} field @param {unknown} value @param {string} path */
function scalarToWire(field, value, path) {
  const type = field.type;
  if (field.resolvedType instanceof protobuf.Enum) {
    const values = field.resolvedType.values;
    if (typeof value === "string" && Object.hasOwn(values, value)) return value;
    if (typeof value === "number" && Object.values(values).includes(value)) return value;
    throw new WireError(path, `${JSON.stringify(value)} is not a ${field.resolvedType.name} (one of ${
      Object.keys(values).join(", ")})`);
  }
  if (field.resolvedType instanceof protobuf.Type) {
    if (field.resolvedType.fullName === TIMESTAMP) return timestampToWire(value, path);
    if (!isPlainObject(value)) throw new WireError(path, `expected a ${field.resolvedType.name} object`);
    return messageToWire(field.resolvedType, value, path);
  }
  if (INT64_TYPES.has(type)) {
    let big;
    if (typeof value === "bigint") big = value;
    else if (typeof value === "number" && Number.isSafeInteger(value)) big = BigInt(value);
    else if (typeof value === "string" && /^-?\d+$/.test(value)) big = BigInt(value);
    else throw new WireError(path, `expected an exact integer (a safe integer number, a bigint or a decimal string), got ${
      typeof value === "number" ? value : typeof value}`);
    const [min, max] = UNSIGNED.has(type) ? [0n, UINT64_MAX] : [INT64_MIN, INT64_MAX];
    if (big < min || big > max) throw new WireError(path, `${big} is out of range for ${type}`);
    return big.toString(); // protobufjs parses decimal strings exactly (through Long)
  }
  if (INT32_TYPES.has(type)) {
    const min = UNSIGNED.has(type) ? 0 : -(2 ** 31);
    const max = UNSIGNED.has(type) ? 2 ** 32 - 1 : 2 ** 31 - 1;
    if (typeof value !== "number" || !Number.isInteger(value) || value < min || value > max) {
      throw new WireError(path, `expected an integer in [${min}, ${max}] for ${type}`);
    }
    return value;
  }
  switch (type) {
    case "string":
      if (typeof value !== "string") throw new WireError(path, "expected a string");
      return value;
    case "bool":
      if (typeof value !== "boolean") throw new WireError(path, "expected a boolean");
      return value;
    case "bytes":
      if (!(value instanceof Uint8Array)) throw new WireError(path, "expected a Uint8Array or Buffer");
      return value;
    default: // float, double
      if (typeof value !== "number" || Number.isNaN(value)) throw new WireError(path, "expected a number");
      return value;
  }
}

/** @param {protobuf.Field} field @param {unknown} value @param {string} path */
function fieldToWire(field, value, path) {
  if (field instanceof protobuf.MapField) {
    if (!isPlainObject(value)) throw new WireError(path, "expected an object (a map)");
    /** @type {Record<string, unknown>} */
    const out = {};
    for (const [key, entry] of Object.entries(value)) out[key] = scalarToWire(field, entry, `${path}.${key}`);
    return out;
  }
  if (field.repeated) {
    if (!Array.isArray(value)) throw new WireError(path, "expected an array");
    return value.map((entry, i) => scalarToWire(field, entry, `${path}[${i}]`));
  }
  return scalarToWire(field, value, path);
}

/**
 * Check and convert a request message. Keys are the .proto's field names; undefined and null mean unset.
 * @param {protobuf.Type} type
 * @param {Record<string, unknown>} value
 * @param {string} [path]
 * @returns {Record<string, unknown>}
 */
export function messageToWire(type, value, path = "request") {
  /** @type {Record<string, unknown>} */
  const out = {};
  for (const [key, entry] of Object.entries(value)) {
    const field = type.fields[key];
    if (!field) {
      throw new WireError(`${path}.${key}`, `${type.name} has no such field (fields: ${
        Object.keys(type.fields).join(", ")})`);
    }
    if (entry === undefined || entry === null) continue;
    out[key] = fieldToWire(field, entry, `${path}.${key}`);
  }
  return out;
}

/** @param {protobuf.Field} field @param {unknown} value @param {string} path @returns {unknown} */
function scalarFromWire(field, value, path) {
  if (value === null || value === undefined) return value;
  if (field.resolvedType instanceof protobuf.Type) {
    const obj = /** @type {Record<string, unknown>} */ (value);
    if (field.resolvedType.fullName === TIMESTAMP) {
      const ms = Number(BigInt(String(obj.seconds)) * 1000n) + Math.floor(Number(obj.nanos) / 1_000_000);
      return new Date(ms);
    }
    return messageFromWire(field.resolvedType, obj, path);
  }
  if (INT64_TYPES.has(field.type)) {
    const n = Number(value);
    if (!Number.isSafeInteger(n)) {
      throw new RangeError(`${path}: ${String(value)} is beyond Number.MAX_SAFE_INTEGER; read it exactly through client.raw`);
    }
    return n;
  }
  return value;
}

/**
 * A decoded response as plain values: Timestamps as Date, 64-bit integers as numbers.
 * @param {protobuf.Type} type
 * @param {Record<string, unknown>} value
 * @param {string} [path]
 * @returns {any}
 */
export function messageFromWire(type, value, path = type.name) {
  /** @type {Record<string, unknown>} */
  const out = {};
  for (const [key, entry] of Object.entries(value)) {
    const field = type.fields[key];
    if (!field) { // a oneof's virtual field (its name), kept as is
      out[key] = entry;
    } else if (field instanceof protobuf.MapField) {
      /** @type {Record<string, unknown>} */
      const map = {};
      for (const [k, v] of Object.entries(/** @type {Record<string, unknown>} */ (entry))) {
        map[k] = scalarFromWire(field, v, `${path}.${key}.${k}`);
      }
      out[key] = map;
    } else if (field.repeated && Array.isArray(entry)) {
      out[key] = entry.map((v, i) => scalarFromWire(field, v, `${path}.${key}[${i}]`));
    } else {
      out[key] = scalarFromWire(field, entry, `${path}.${key}`);
    }
  }
  return out;
}

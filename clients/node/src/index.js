// memos-client for Node: the public names.
export { Client } from "./client.js";
export { MountHandle } from "./mount.js";
export { Generation } from "./generation.js";
export * from "./errors.js";
export { DEFAULT_TARGET, readTokenFile, resolveTarget, resolveToken } from "./auth.js";
export { LOADER_OPTIONS, MAX_MESSAGE_BYTES, loadContract } from "./proto.js";
export { WireError, messageFromWire, messageToWire } from "./wire.js";
// The memos.v1 message and enum types (JSDoc typedefs; types only).
export * from "./messages.js";

// The memos.v1 contract, loaded at run time from protos/memos/v1 (no codegen step): the grpc-js
// service constructor (through @grpc/proto-loader) and a protobufjs Root of the same files, whose
// reflection the wire conversion (wire.js) walks to check requests and shape responses.
import { existsSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import protobuf from "protobufjs";

/** The daemon's message-size limit ([server] max_message_bytes, 64 MiB); grpc-js receives only 4 MiB by default. */
export const MAX_MESSAGE_BYTES = 64 * 1024 * 1024;

/**
 * How proto-loader decodes, chosen so nothing is lost or silently dropped:
 * - keepCase: field names exactly as in the .proto (`mount_id`), as the docs, grpcurl and the Python
 *   client name them; wire.js refuses any other key instead of dropping it.
 * - longs: String: 64-bit integers decode exactly, as decimal strings (never a Long object, never a rounded
 *   number); the typed Client turns them into numbers, refusing any above 2^53 - 1.
 * - enums: String: enum values decode as their names; wire.js refuses unknown names before sending
 *   (protobufjs would encode them as 0, the UNSPECIFIED value).
 * - defaults: unset scalars decode as their zero value and unset messages as null, so every field is there.
 */
export const LOADER_OPTIONS = Object.freeze({
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
});

const HERE = path.dirname(fileURLToPath(import.meta.url));

/** The repository's protos/ directory (clients/node/src -> ../../../protos), or $MEMOS_PROTO_DIR. */
export function defaultProtoDir() {
  return process.env.MEMOS_PROTO_DIR || path.resolve(HERE, "..", "..", "..", "protos");
}

const FILES = ["memos/v1/memos.proto", "memos/v1/types.proto"];

/**
 * google.rpc.Status and ErrorInfo, the two messages the error trailer needs (googleapis' status.proto and
 * error_details.proto, reduced to those messages; field numbers as upstream).
 */
const GOOGLE_RPC = {
  nested: {
    google: {
      nested: {
        rpc: {
          nested: {
            Status: {
              fields: {
                code: { type: "int32", id: 1 },
                message: { type: "string", id: 2 },
                details: { rule: "repeated", type: "google.protobuf.Any", id: 3 },
              },
            },
            ErrorInfo: {
              fields: {
                reason: { type: "string", id: 1 },
                domain: { type: "string", id: 2 },
                metadata: { keyType: "string", type: "string", id: 3 },
              },
            },
          },
        },
      },
    },
  },
};

/**
 * @typedef {object} Contract
 * @property {grpc.ServiceClientConstructor} MemOS the proto-level client constructor
 * @property {protobuf.Root} root reflection over memos.v1 and google.protobuf
 * @property {protobuf.Type} status google.rpc.Status
 * @property {protobuf.Type} errorInfo google.rpc.ErrorInfo
 * @property {string} protoDir where the files were read from
 */

/** @type {Map<string, Contract>} */
const loaded = new Map();

/**
 * Load (once per directory) the contract from `protoDir`.
 * @param {string} [protoDir]
 * @returns {Contract}
 */
export function loadContract(protoDir = defaultProtoDir()) {
  const cached = loaded.get(protoDir);
  if (cached) return cached;
  if (!existsSync(path.join(protoDir, FILES[0]))) {
    throw new Error(`memos.v1 protos not found under ${protoDir} (set protoDir or MEMOS_PROTO_DIR)`);
  }
  const definition = protoLoader.loadSync(FILES, { ...LOADER_OPTIONS, includeDirs: [protoDir] });
  const pkg = /** @type {any} */ (grpc.loadPackageDefinition(definition));
  const root = new protobuf.Root();
  root.resolvePath = (_origin, target) => {
    // google/protobuf/*.proto are protobufjs' bundled common types; the rest is ours.
    if (target.startsWith("google/protobuf/") || path.isAbsolute(target)) return target;
    return path.join(protoDir, target);
  };
  // any.proto (bundled by protobufjs) for google.rpc.Status.details.
  root.loadSync(["google/protobuf/any.proto", ...FILES], { keepCase: true, alternateCommentMode: true });
  const rpc = protobuf.Root.fromJSON(GOOGLE_RPC, root);
  root.resolveAll();
  const contract = {
    MemOS: /** @type {grpc.ServiceClientConstructor} */ (pkg.memos.v1.MemOS),
    root,
    status: rpc.lookupType("google.rpc.Status"),
    errorInfo: rpc.lookupType("google.rpc.ErrorInfo"),
    protoDir,
  };
  loaded.set(protoDir, contract);
  return contract;
}

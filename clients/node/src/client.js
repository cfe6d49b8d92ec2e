// Client: the memos.v1 syscalls most programs need, as typed async methods (requests checked by wire.js,
// responses with Dates and numbers, failures as errors.js classes). client.raw is the proto-level
// grpc-js client for everything else (keepCase names, 64-bit integers as decimal strings, enum names).
import { randomUUID } from "node:crypto";

import * as grpc from "@grpc/grpc-js";

import { resolveTarget, resolveToken } from "./auth.js";
import { fromServiceError, Unauthenticated } from "./errors.js";
import { Generation } from "./generation.js";
import { MountHandle } from "./mount.js";
import { loadContract, MAX_MESSAGE_BYTES } from "./proto.js";
import { messageFromWire, messageToWire } from "./wire.js";

/** @typedef {import("./messages.js").Cube} Cube */
/** @typedef {import("./messages.js").Item} Item */
/** @typedef {import("./messages.js").ItemChange} ItemChange */
/** @typedef {import("./messages.js").AdapterChange} AdapterChange */
/** @typedef {import("./messages.js").Revision} Revision */
/** @typedef {import("./messages.js").SearchHit} SearchHit */
/** @typedef {import("./messages.js").Principal} Principal */
/** @typedef {import("./messages.js").Activation} Activation */
/** @typedef {import("./messages.js").FreeCubeResponse} FreeCubeResponse */
/** @typedef {import("./messages.js").UnmountResponse} UnmountResponse */
/** @typedef {import("./messages.js").CommitResponse} CommitResponse */
/** @typedef {import("./messages.js").IngestResponse} IngestResponse */
/** @typedef {import("./messages.js").StatsResponse} StatsResponse */
/** @typedef {import("./messages.js").SearchMode} SearchMode */
/** @typedef {import("./messages.js").Job} Job */
/** @typedef {string | MountHandle} MountLike */
/** @typedef {Date | string} TimeLike a Date or an ISO 8601 string */

/**
 * An item to write: its text, or the fields of memos.v1.ItemInput.
 * @typedef {string | {text: string, item_id?: string, tags?: string[], source?: string, event_time?: TimeLike,
 *   speaker?: string, session_id?: string, ttl_seconds?: number | bigint}} ItemLike
 */

/**
 * @typedef {object} ClientOptions
 * @property {string} [token] the bearer token (else tokenFile, dataDir's admin.token, $MEMOS_TOKEN, $MEMOS_TOKEN_FILE, the local admin's)
 * @property {string} [tokenFile]
 * @property {string} [dataDir] a daemon's data dir: its daemon.json gives the target, its admin.token the token
 * @property {number} [timeoutMs] deadline of each unary call (default 60 s); Generate has none unless given
 * @property {grpc.ChannelCredentials} [credentials] TLS (grpc.credentials.createSsl(...)); insecure by default
 * @property {string} [protoDir] where protos/memos/v1 lives (default: this repository's protos/)
 * @property {grpc.ChannelOptions} [channelOptions] extra grpc-js channel options
 */

/** @param {MountLike} mount */
function mountId(mount) {
  return typeof mount === "string" ? mount : mount.id;
}

/** @param {MountLike} mount @param {{mount?: import("./messages.js").Mount | null}} response */
function refresh(mount, response) {
  if (mount instanceof MountHandle && response.mount) mount.info = response.mount;
}

/** @param {ItemLike} item @param {{tags?: string[], source?: string, event_time?: TimeLike, ttl_seconds?: number | bigint}} defaults */
function itemInput(item, defaults) {
  const fields = typeof item === "string" ? { text: item } : item;
  return { ...defaults, ...fields };
}

const SEARCH_MODES = /** @type {const} */ ({
  hybrid: "SEARCH_MODE_HYBRID", dense: "SEARCH_MODE_DENSE", lexical: "SEARCH_MODE_LEXICAL",
});

export class Client {
  /**
   * @param {string} [target] host:port (else dataDir's daemon.json, $MEMOS_TARGET, 127.0.0.1:50051)
   * @param {ClientOptions} [options]
   */
  constructor(target, options = {}) {
    this.contract = loadContract(options.protoDir);
    this.target = resolveTarget(target, options.dataDir);
    const { token, source } = resolveToken(options);
    this.tokenSource = source;
    this.metadata = new grpc.Metadata();
    if (token) this.metadata.set("authorization", `Bearer ${token}`);
    this.timeoutMs = options.timeoutMs ?? 60_000;
    this.service = this.contract.root.lookupService("memos.v1.MemOS");
    /**
     * The proto-level client: every syscall, messages as proto-loader's objects (keepCase, longs as
     * strings, enums as names). Pass `client.metadata` for the token.
     * @type {any}
     */
    this.raw = new this.contract.MemOS(this.target, options.credentials ?? grpc.credentials.createInsecure(), {
      // The daemon's limits: grpc-js's default receive limit (4 MiB) refuses a valid Read of large items.
      "grpc.max_receive_message_length": MAX_MESSAGE_BYTES,
      "grpc.max_send_message_length": MAX_MESSAGE_BYTES,
      ...options.channelOptions,
    });
  }

  close() {
    this.raw.close();
  }

  /** @param {string} method */
  method(method) {
    const rpc = this.service.methods[method];
    if (!rpc || !rpc.resolvedRequestType || !rpc.resolvedResponseType) throw new Error(`MemOS has no method ${method}`);
    return { request: rpc.resolvedRequestType, response: rpc.resolvedResponseType, rpc };
  }

  /**
   * Any unary syscall by name, with the typed conversions: the request is checked (field names as in the
   * .proto, enum names, exact integers; Dates for Timestamps) and the response has Dates and numbers.
   * @param {string} name e.g. "StatCube"
   * @param {Record<string, unknown>} [request]
   * @param {{timeoutMs?: number}} [options]
   * @returns {Promise<any>}
   */
  async call(name, request = {}, options = {}) {
    const { request: requestType, response: responseType, rpc } = this.method(name);
    if (rpc.requestStream || rpc.responseStream) throw new Error(`${name} is a streaming call: use client.raw`);
    const wire = messageToWire(requestType, request, `${name}Request`);
    const deadline = Date.now() + (options.timeoutMs ?? this.timeoutMs);
    return new Promise((resolve, reject) => {
      this.raw[name](wire, this.metadata, { deadline }, (/** @type {unknown} */ error, /** @type {any} */ response) => {
        if (error) {
          const failure = fromServiceError(error);
          if (failure instanceof Unauthenticated) failure.message += ` (token from ${this.tokenSource})`;
          reject(failure);
        } else {
          try {
            resolve(messageFromWire(responseType, response));
          } catch (conversion) {
            reject(conversion);
          }
        }
      });
    });
  }

  // -- cubes and mounts -----------------------------------------------------------------------------------

  /**
   * @param {string} name
   * @param {{description?: string, labels?: Record<string, string>}} [options]
   * @returns {Promise<Cube>}
   */
  async allocCube(name, options = {}) {
    return (await this.call("AllocCube", { name, ...options })).cube;
  }

  /** Delete a cube (id or name) with everything in it. Irreversible. @param {string} cube @returns {Promise<FreeCubeResponse>} */
  freeCube(cube) {
    return this.call("FreeCube", { cube });
  }

  /** @param {string} cube @returns {Promise<Cube>} */
  async statCube(cube) {
    return (await this.call("StatCube", { cube })).cube;
  }

  /**
   * Open a mount on a cube (id or name) at a revision (0: HEAD).
   * @param {string} cube
   * @param {{revision?: number | bigint, writable?: boolean}} [options]
   * @returns {Promise<MountHandle>}
   */
  async mount(cube, options = {}) {
    const mode = options.writable ? "MOUNT_MODE_READ_WRITE" : "MOUNT_MODE_READ_ONLY";
    const response = await this.call("Mount", { cube, revision: options.revision ?? 0, mode });
    return new MountHandle(this, response.mount);
  }

  /** Close a mount, discarding its staged changes. @param {MountLike} mount @returns {Promise<UnmountResponse>} */
  unmount(mount) {
    return this.call("Unmount", { mount_id: mountId(mount) });
  }

  // -- plaintext memory -----------------------------------------------------------------------------------

  /**
   * Stage items in a read-write mount; resolves to their ids, in order. A fresh request id is sent (or
   * requestId), so a resent call is applied once.
   * @param {MountLike} mount
   * @param {ItemLike[]} items
   * @param {{tags?: string[], source?: string, eventTime?: TimeLike, ttlSeconds?: number | bigint, requestId?: string}} [options]
   * @returns {Promise<string[]>}
   */
  async write(mount, items, options = {}) {
    const defaults = { tags: options.tags, source: options.source, event_time: options.eventTime,
      ttl_seconds: options.ttlSeconds };
    const response = await this.call("Write", {
      mount_id: mountId(mount), items: items.map((item) => itemInput(item, defaults)),
      request_id: options.requestId ?? randomUUID(),
    });
    refresh(mount, response);
    return response.item_ids;
  }

  /** Items by id, as the mount sees them (ItemNotFound for an invisible id). @param {MountLike} mount @param {string[]} itemIds @returns {Promise<Item[]>} */
  async read(mount, itemIds) {
    return (await this.call("Read", { mount_id: mountId(mount), item_ids: itemIds })).items;
  }

  /**
   * Hybrid (or dense, or lexical) top-k over one or more mounts.
   * @param {MountLike | MountLike[]} mounts
   * @param {string} query
   * @param {{k?: number, mode?: keyof typeof SEARCH_MODES, tagsAll?: string[], tagsAny?: string[], tagsNone?: string[],
   *   since?: TimeLike, until?: TimeLike, speakers?: string[], sessionIds?: string[], contextTurns?: number,
   *   includeArchived?: boolean}} [options]
   * @returns {Promise<SearchHit[]>}
   */
  async search(mounts, query, options = {}) {
    const mode = SEARCH_MODES[options.mode ?? "hybrid"];
    if (!mode) throw new TypeError(`mode must be one of ${Object.keys(SEARCH_MODES).join(", ")}`);
    const list = Array.isArray(mounts) ? mounts : [mounts];
    const response = await this.call("Search", {
      mount_ids: list.map(mountId), query, k: options.k ?? 10, mode,
      tags: { all_of: options.tagsAll, any_of: options.tagsAny, none_of: options.tagsNone },
      event_time: options.since || options.until ? { start: options.since, end: options.until } : undefined,
      speakers: options.speakers, session_ids: options.sessionIds, context_turns: options.contextTurns,
      include_archived: options.includeArchived,
    });
    return response.hits;
  }

  /**
   * Commit a conversation, one item per message, as one revision (Ingest).
   * @param {MountLike} mount
   * @param {{speaker: string, text: string, time?: TimeLike, session_id?: string}[]} messages
   * @param {{sessionId?: string, tags?: string[], source?: string, commitMessage?: string, author?: string,
   *   requestId?: string}} [options]
   * @returns {Promise<IngestResponse>}
   */
  async ingest(mount, messages, options = {}) {
    const response = await this.call("Ingest", {
      mount_id: mountId(mount),
      messages: messages.map((m) => ({ session_id: options.sessionId, ...m })),
      commit_message: options.commitMessage, author: options.author, tags: options.tags, source: options.source,
      request_id: options.requestId ?? randomUUID(),
    });
    refresh(mount, response);
    return response;
  }

  // -- versions -------------------------------------------------------------------------------------------

  /**
   * Apply the mount's staged changes as a new revision (`.revision`); CommitConflict when HEAD changed them.
   * @param {MountLike} mount
   * @param {string} [message]
   * @param {{author?: string, requestId?: string}} [options]
   * @returns {Promise<CommitResponse>}
   */
  async commit(mount, message = "", options = {}) {
    const response = await this.call("Commit", {
      mount_id: mountId(mount), message, author: options.author, request_id: options.requestId ?? randomUUID(),
    });
    refresh(mount, response);
    return response;
  }

  /**
   * A cube's revisions, newest first (every page, or the first `limit`).
   * @param {string} cube
   * @param {{limit?: number}} [options]
   * @returns {Promise<Revision[]>}
   */
  async log(cube, options = {}) {
    const limit = options.limit ?? Infinity;
    /** @type {Revision[]} */
    const revisions = [];
    let pageToken = "";
    do {
      const page = await this.call("Log", { cube, page_token: pageToken });
      revisions.push(...page.revisions);
      pageToken = page.next_page_token;
    } while (pageToken && revisions.length < limit);
    return revisions.slice(0, limit);
  }

  /**
   * Items added, changed and forgotten between two revisions (toRevision 0: HEAD), every page.
   * @param {string} cube
   * @param {number | bigint} fromRevision
   * @param {number | bigint} [toRevision]
   * @returns {Promise<{changes: ItemChange[], adapterChange: AdapterChange | null, fromRevision: number, toRevision: number}>}
   */
  async diff(cube, fromRevision, toRevision = 0) {
    /** @type {ItemChange[]} */
    const changes = [];
    let pageToken = "";
    /** @type {any} */
    let first = null;
    do {
      const page = await this.call("Diff", { cube, from_revision: fromRevision, to_revision: toRevision,
        page_token: pageToken });
      first ??= page;
      changes.push(...page.changes);
      pageToken = page.next_page_token;
    } while (pageToken);
    return { changes, adapterChange: first.adapter_change, fromRevision: first.from_revision,
      toRevision: first.to_revision };
  }

  /**
   * Make a new revision whose content equals toRevision's.
   * @param {string} cube
   * @param {number | bigint} toRevision
   * @param {{message?: string, author?: string}} [options]
   * @returns {Promise<Revision>}
   */
  async rollback(cube, toRevision, options = {}) {
    return (await this.call("Rollback", { cube, to_revision: toRevision, ...options })).revision;
  }

  // -- model ----------------------------------------------------------------------------------------------

  /** Encode the cube's items at the mount's base revision into a KV cache. @param {MountLike} mount @returns {Promise<Activation>} */
  async activate(mount) {
    return (await this.call("Activate", { mount_id: mountId(mount) }, { timeoutMs: Math.max(this.timeoutMs, 300_000) }))
      .activation;
  }

  /**
   * Generate a reply with the mounts' memory: an async iterator of text deltas, then `.summary`.
   * @param {string | {role: string, content: string}[]} messages a user message, or the conversation
   * @param {MountLike | MountLike[]} [mounts]
   * @param {{maxTokens?: number, temperature?: number, topP?: number, stop?: string[], seed?: number | bigint,
   *   retrieveK?: number, bypassKvCache?: boolean, adapterMount?: MountLike, rememberMount?: MountLike,
   *   sessionId?: string, requestId?: string, timeoutMs?: number}} [options] `rememberMount` (read-write)
   *   records the exchange once the reply ends: two turns of `sessionId` in one revision (`summary.remembered`)
   * @returns {Generation}
   */
  generate(messages, mounts = [], options = {}) {
    const { request, response } = this.method("Generate");
    const list = Array.isArray(mounts) ? mounts : [mounts];
    const wire = messageToWire(request, {
      messages: typeof messages === "string" ? [{ role: "user", content: messages }] : messages,
      mount_ids: list.map(mountId),
      options: {
        max_tokens: options.maxTokens, temperature: options.temperature, top_p: options.topP, stop: options.stop,
        seed: options.seed, bypass_kv_cache: options.bypassKvCache,
        adapter_mount_id: options.adapterMount === undefined ? undefined : mountId(options.adapterMount),
        remember_mount_id: options.rememberMount === undefined ? undefined : mountId(options.rememberMount),
        session_id: options.sessionId,
      },
      retrieve_k: options.retrieveK,
      request_id: options.requestId,
    }, "GenerateRequest");
    const callOptions = options.timeoutMs === undefined ? {} : { deadline: Date.now() + options.timeoutMs };
    return new Generation(this.raw.Generate(wire, this.metadata, callOptions), response);
  }

  // -- jobs -----------------------------------------------------------------------------------------------

  /**
   * Start the MemReader on a read-write mount: facts, preferences and events derived from the cube's
   * conversation turns at the mount's base revision, each naming its source turns. Resolves to the Job at
   * once; `job.extract` counts what the extractor proposed, kept, dropped (did not parse) and refused (its
   * turns do not support it). On success the kept items are reconciled with the cube's derived items and
   * committed at HEAD as one revision (`job.result_revision`; 0 when there was nothing to commit). Without
   * `url` the in-process model reads; with it, an OpenAI-compatible endpoint the operator allowed
   * (`[reader] endpoints`), with `token` as its bearer token (never stored) and `model` as its model name.
   * ExtractionInProgress when the cube already has an extraction queued or running, CubeEmpty without turns.
   * @param {MountLike} mount
   * @param {{url?: string, token?: string, model?: string, maxTokens?: number, message?: string,
   *   author?: string}} [options] `maxTokens`: the answer budget per prompt (0: the daemon's default, 256)
   * @returns {Promise<Job>}
   */
  async extract(mount, options = {}) {
    const response = await this.call("Extract", {
      mount_id: mountId(mount),
      extractor: { url: options.url, token: options.token, model: options.model, max_tokens: options.maxTokens },
      message: options.message, author: options.author,
    });
    return response.job;
  }

  /**
   * A job's state on every change, ending after its final state: an async iterator of Jobs. Leaving the
   * loop early cancels the watch (not the job). JobNotFound while iterating for an unknown job.
   * @param {string} jobId
   * @param {{timeoutMs?: number}} [options] a deadline for the whole watch (none by default)
   * @returns {AsyncGenerator<Job, void, undefined>}
   */
  async *watchJob(jobId, options = {}) {
    const { request, response } = this.method("WatchJob");
    const wire = messageToWire(request, { job_id: jobId }, "WatchJobRequest");
    const callOptions = options.timeoutMs === undefined ? {} : { deadline: Date.now() + options.timeoutMs };
    const call = this.raw.WatchJob(wire, this.metadata, callOptions);
    try {
      for await (const raw of call) yield messageFromWire(response, raw).job;
    } catch (error) {
      throw fromServiceError(error);
    } finally {
      call.cancel(); // a no-op once the stream ended; else the daemon stops watching for us
    }
  }

  /**
   * Watch a job to its end; resolves to its final state (`onUpdate` sees every state on the way).
   * @param {string} jobId
   * @param {{onUpdate?: (job: Job) => void, timeoutMs?: number}} [options]
   * @returns {Promise<Job>}
   */
  async waitJob(jobId, options = {}) {
    /** @type {Job | null} */
    let last = null;
    for await (const job of this.watchJob(jobId, { timeoutMs: options.timeoutMs })) {
      last = job;
      options.onUpdate?.(job);
    }
    if (last === null) throw new Error(`the watch of job ${jobId} ended without a state`);
    return last;
  }

  /** Stop a queued or running job (the cube is left unchanged); JobFinished if it has ended. @param {string} jobId @returns {Promise<Job>} */
  async cancelJob(jobId) {
    return (await this.call("CancelJob", { job_id: jobId })).job;
  }

  /** The daemon's recent jobs, newest first; only a cube's (id or name) when given. @param {string} [cube] @returns {Promise<Job[]>} */
  async listJobs(cube = "") {
    return (await this.call("ListJobs", { cube })).jobs;
  }

  // -- daemon and principals ------------------------------------------------------------------------------

  /** The principal this client's token belongs to. @returns {Promise<Principal>} */
  async whoAmI() {
    return (await this.call("WhoAmI")).principal;
  }

  /** Daemon-wide statistics (model state in `.model.state`). @returns {Promise<StatsResponse>} */
  stats() {
    return this.call("Stats");
  }
}

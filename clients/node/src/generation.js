// A Generate stream as an async iterator of text deltas; the summary (the last message) once it ends.
import { fromServiceError } from "./errors.js";
import { messageFromWire } from "./wire.js";

/** @typedef {import("./messages.js").GenerationSummary} GenerationSummary */

export class Generation {
  /**
   * @param {import("@grpc/grpc-js").ClientReadableStream<Record<string, unknown>>} call
   * @param {import("protobufjs").Type} responseType memos.v1.GenerateResponse
   */
  constructor(call, responseType) {
    this.call = call;
    this.responseType = responseType;
    /** @type {GenerationSummary | null} Set once the stream has ended (the last message carries it). */
    this.summary = null;
    this.started = false;
  }

  /** @returns {AsyncGenerator<string, void, undefined>} */
  async *[Symbol.asyncIterator]() {
    if (this.started) throw new Error("a Generation can be iterated once");
    this.started = true;
    try {
      for await (const raw of this.call) {
        const message = messageFromWire(this.responseType, raw);
        if (message.summary) this.summary = message.summary;
        if (message.delta) yield /** @type {string} */ (message.delta);
      }
    } catch (error) {
      throw fromServiceError(error);
    } finally {
      if (this.summary === null) this.call.cancel(); // the caller stopped early: free the daemon's work
    }
  }

  /** Read the whole stream; resolves to the text (the summary is then set). */
  async text() {
    let text = "";
    for await (const delta of this) text += delta;
    return text;
  }

  /** Stop the generation (the iterator then ends with a Cancelled error). */
  cancel() {
    this.call.cancel();
  }
}

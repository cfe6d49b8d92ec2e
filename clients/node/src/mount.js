// MountHandle: a mount's id and last known state, with the Client's calls on a mount bound to it.
/** @typedef {import("./messages.js").Mount} Mount */
/** @typedef {import("./client.js").Client} Client */

export class MountHandle {
  /** @param {Client} client @param {Mount} info */
  constructor(client, info) {
    this.client = client;
    /** The mount as the last response carrying it said (staging counts, base revision). */
    this.info = info;
  }

  get id() { return this.info.mount_id; }

  get cubeId() { return this.info.cube_id; }

  /** @param {Parameters<Client["write"]>[1]} items @param {Parameters<Client["write"]>[2]} [options] */
  write(items, options) { return this.client.write(this, items, options); }

  /** @param {string[]} itemIds */
  read(itemIds) { return this.client.read(this, itemIds); }

  /** @param {string} query @param {Parameters<Client["search"]>[2]} [options] */
  search(query, options) { return this.client.search(this, query, options); }

  /** @param {string} [message] @param {Parameters<Client["commit"]>[2]} [options] */
  commit(message, options) { return this.client.commit(this, message, options); }

  /** @param {Parameters<Client["ingest"]>[1]} messages @param {Parameters<Client["ingest"]>[2]} [options] */
  ingest(messages, options) { return this.client.ingest(this, messages, options); }

  activate() { return this.client.activate(this); }

  /** @param {Parameters<Client["extract"]>[1]} [options] */
  extract(options) { return this.client.extract(this, options); }

  unmount() { return this.client.unmount(this); }
}

'use strict';
/**
 * ReidalClient: the reidal gRPC API as promise-returning calls, with the same behaviour as
 * the Python client (clients/python/reidal_client/client.py):
 *
 * - A deadline per attempt: `timeoutMs` of the client (30 s) or of the call.
 * - Retries with exponential backoff and jitter on UNAVAILABLE only (the server or its
 *   Triton is down or restarting), and only for calls that are safe to repeat: reads,
 *   AddImages (idempotent per image id), ExcludeImage / RestoreImage, and calls that carry
 *   a request id (GetQueryPairs, StartQueryPairs, SubmitConstraints: a fresh UUID unless
 *   the caller passes one, so a retry after a lost response returns the first result).
 *   CreateCollection / DeleteCollection are retried too; a retry that finds the collection
 *   already there (resp. already gone) means an earlier attempt did it. EmbedCollection
 *   and DeleteConstraint are never retried.
 * - Failures reject with ReidalError (code, codeName, details, method, attempts).
 *
 * Messages are plain objects with camelCase fields and enum values as proto names
 * ("OPERATION_STATE_SUCCEEDED"); Timestamps come back as Date.
 */

const crypto = require('node:crypto');
const fs = require('node:fs');
const util = require('node:util');
const { once } = require('node:events');
const grpc = require('@grpc/grpc-js');
const { loadServices, DEFAULT_PROTO_DIR } = require('./protos');
const { ReidalError, OperationFailedError, isGrpcError, fromGrpcError } = require('./errors');
const msgs = require('./messages');

/** Address used when none is given (`reidal serve`'s default port). */
const DEFAULT_ADDRESS = '127.0.0.1:50051';
/** Images per AddImages message: a message is embedded and stored in one transaction. */
const DEFAULT_INGEST_BATCH = 32;
/** Largest message either way, as the server's default (64 MiB). */
const DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024;

/**
 * @typedef {object} ImageInput
 * @property {string} id the caller's id of the image.
 * @property {Buffer | Uint8Array} [data] the encoded file (JPEG, PNG, WebP).
 * @property {string} [path] a local file, read by this client.
 * @property {string} [uri] a location the server reads.
 * @property {string} [name] the platform's identity name, when known.
 * @property {Record<string, string>} [metadata] free key/values ("viewpoint", "date", ...).
 */

/**
 * @typedef {object} AnswerInput
 * @property {string} [pairId] a pair of a QueryBatch ...
 * @property {string} [imageA] ... or two images of the collection.
 * @property {string} [imageB]
 * @property {string | boolean | null} label "SAME" / "DIFFERENT" / "UNSURE" (or true / false / null).
 * @property {string} [annotatorId]
 * @property {string[]} [tags] "PHOTOBOMB", "SCENERY_MATCH", "POOR_QUALITY".
 * @property {number} [confidence] in [0, 1].
 * @property {string} [note]
 * @property {Date | number} [startedAt] when shown (Date or epoch seconds).
 * @property {Date | number} [endedAt] when answered.
 */

/**
 * @typedef {object} TlsOptions
 * @property {Buffer | string} [ca] PEM (or a path to it) of the CA that signed the server's
 *   certificate (default: the system's roots).
 * @property {Buffer | string} [cert] this client's certificate chain, for mutual TLS.
 * @property {Buffer | string} [key] this client's private key, for mutual TLS.
 * @property {string} [serverName] the name to check in the server's certificate, when it
 *   is not the host of the address.
 */

/**
 * @typedef {object} ClientOptions
 * @property {number | null} [timeoutMs] deadline of each attempt (default 30000; null = none).
 * @property {number} [retries] retries of a retryable call after UNAVAILABLE (default 5).
 * @property {number} [backoffMs] first wait, doubled per retry (default 200).
 * @property {number} [maxBackoffMs] longest wait (default 5000).
 * @property {string} [token] sent as "authorization: Bearer <token>" with every call (a
 *   warning when that would go in plaintext to another host; never in `toString`).
 * @property {TlsOptions | boolean} [tls] TLS (true: system roots); default plaintext.
 * @property {grpc.ChannelCredentials} [credentials] ready-made channel credentials (instead of tls).
 * @property {Record<string, string>} [metadata] extra metadata sent with every call.
 * @property {Record<string, any>} [channelOptions] grpc-js channel options, over the defaults.
 * @property {string} [protoDir] folder holding reidal/v1/*.proto (default: the repository's protos/).
 * @property {(method: string, attempt: number, delayMs: number, error: ReidalError) => void} [onRetry]
 */

/** @param {number} ms */
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * @param {number} maxBackoffMs
 * @returns {Record<string, number>}
 */
function defaultChannelOptions(maxBackoffMs) {
  return {
    'grpc.max_receive_message_length': DEFAULT_MAX_MESSAGE_BYTES,
    'grpc.max_send_message_length': DEFAULT_MAX_MESSAGE_BYTES,
    // Reconnect soon after a server restart instead of gRPC's default (up to 120 s).
    'grpc.initial_reconnect_backoff_ms': 100,
    'grpc.max_reconnect_backoff_ms': Math.max(Math.round(maxBackoffMs), 100),
  };
}

/**
 * PEM bytes from a Buffer or a file path; a clear error for a missing or non-PEM file, so a
 * wrong option fails at construction, not at the first handshake.
 * @param {Buffer | string} source
 * @param {string} what
 */
function readPem(source, what) {
  let data = source;
  if (typeof source === 'string') {
    if (!fs.existsSync(source)) throw new Error(`TLS ${what} file ${JSON.stringify(source)} does not exist`);
    data = fs.readFileSync(source);
  }
  if (!Buffer.isBuffer(data) || !data.includes('-----BEGIN ')) {
    throw new Error(`TLS ${what} is not PEM (no '-----BEGIN ' line)`);
  }
  return data;
}

/**
 * @param {TlsOptions | boolean | undefined} tls
 * @param {grpc.ChannelCredentials | undefined} credentials
 */
function channelCredentials(tls, credentials) {
  if (credentials && tls) throw new TypeError('pass credentials or tls, not both');
  if (credentials) return credentials;
  if (!tls) return grpc.credentials.createInsecure();
  const t = tls === true ? {} : tls;
  if (Boolean(t.cert) !== Boolean(t.key)) throw new TypeError('mutual TLS needs both tls.cert and tls.key');
  return grpc.credentials.createSsl(t.ca ? readPem(t.ca, 'ca') : null, t.key ? readPem(t.key, 'key') : null,
    t.cert ? readPem(t.cert, 'cert') : null);
}

/** Hosts a token may be sent to without TLS and without a warning. */
const LOOPBACK = new Set(['127.0.0.1', 'localhost', '[::1]', '::1']);

class ReidalClient {
  /** Sent with every call; private so the token never shows in logs or inspect(). */
  #metadata;

  /**
   * @param {string} [address] host:port of a reidal server (any of its services).
   * @param {ClientOptions} [options]
   */
  constructor(address = DEFAULT_ADDRESS, options = {}) {
    if (typeof address !== 'string' || !address.includes(':')) {
      throw new TypeError(`address must be host:port, got ${JSON.stringify(address)}`);
    }
    const {
      timeoutMs = 30000, retries = 5, backoffMs = 200, maxBackoffMs = 5000, token, tls,
      credentials, metadata = {}, channelOptions = {}, protoDir = process.env.REIDAL_PROTO_DIR || DEFAULT_PROTO_DIR,
      onRetry,
    } = options;
    if (timeoutMs !== null && !(timeoutMs > 0)) throw new RangeError(`timeoutMs must be > 0 or null, got ${timeoutMs}`);
    if (!Number.isInteger(retries) || retries < 0) throw new RangeError(`retries must be an integer >= 0, got ${retries}`);
    if (!(backoffMs >= 0) || !(maxBackoffMs >= backoffMs)) {
      throw new RangeError(`need 0 <= backoffMs <= maxBackoffMs, got ${backoffMs}, ${maxBackoffMs}`);
    }
    this.address = address;
    this.timeoutMs = timeoutMs;
    this.retries = retries;
    this.backoffMs = backoffMs;
    this.maxBackoffMs = maxBackoffMs;
    this.onRetry = onRetry;
    this.#metadata = { ...metadata };
    if (token !== undefined && token !== null) {
      if (!String(token).trim()) throw new TypeError('token is empty');
      if (!tls && !credentials && !LOOPBACK.has(address.slice(0, address.lastIndexOf(':')))) {
        process.emitWarning(`sending an access token to ${address} without TLS: anyone on the ` +
          'network path can read it', 'ReidalSecurityWarning');
      }
      this.#metadata.authorization = `Bearer ${String(token).trim()}`;
    }
    const opts = { ...defaultChannelOptions(maxBackoffMs), ...channelOptions };
    if (tls && typeof tls === 'object' && tls.serverName) opts['grpc.ssl_target_name_override'] = tls.serverName;
    /** @private */
    this._channel = new grpc.Channel(address, channelCredentials(tls, credentials), opts);
    const services = loadServices(protoDir);
    const stub = (Ctor) => new Ctor(address, grpc.credentials.createInsecure(), { channelOverride: this._channel });
    /**
     * grpc-js stubs on this client's channel, for calls this class does not wrap
     * (TrainingService, EmbedStream, ...). Pass `client.callMetadata()` to them.
     */
    this.stubs = {
      collections: stub(services.CollectionService),
      sampling: stub(services.SamplingService),
      constraints: stub(services.ConstraintService),
      embedding: stub(services.EmbeddingService),
      training: stub(services.TrainingService),
      health: stub(services.Health),
    };
  }

  /** @returns {string} */
  toString() {
    return `ReidalClient(${this.address}, timeoutMs=${this.timeoutMs}, retries=${this.retries})`;
  }

  [util.inspect.custom]() {
    return this.toString();
  }

  /** Close the channel; calls in flight fail with CANCELLED or UNAVAILABLE. */
  close() {
    this._channel.close();
  }

  /** A fresh grpc.Metadata with the token and the extra metadata of this client. */
  callMetadata() {
    const md = new grpc.Metadata();
    for (const [k, v] of Object.entries(this.#metadata)) md.set(k, v);
    return md;
  }

  // ------------------------------------------------------------------ plumbing

  /** @private @param {number | null | undefined} timeoutMs */
  _deadline(timeoutMs) {
    const t = timeoutMs === undefined ? this.timeoutMs : timeoutMs;
    return t === null ? Infinity : new Date(Date.now() + t);
  }

  /** Exponential backoff with up to 20 % jitter (so clients do not retry in step). @private */
  _delayMs(attempt) {
    const base = Math.min(this.backoffMs * 2 ** (attempt - 1), this.maxBackoffMs);
    return base * (1 - 0.2 * Math.random());
  }

  /** @private */
  async _retryWait(method, attempt, error) {
    const delay = this._delayMs(attempt);
    if (this.onRetry) this.onRetry(method, attempt, delay, error);
    await sleep(delay);
  }

  /**
   * One call with a deadline per attempt, retried on UNAVAILABLE when `retry`.
   * `doneOnRetry`: status codes that, on a retry, mean an earlier attempt already did
   * the work, and what to return then.
   * @private
   * @template T
   * @param {string} method
   * @param {(deadline: Date | number) => Promise<T>} attemptOnce
   * @param {{retry: boolean, timeoutMs?: number | null, doneOnRetry?: Record<number, () => Promise<T>>}} how
   * @returns {Promise<T>}
   */
  async _withRetries(method, attemptOnce, { retry, timeoutMs, doneOnRetry }) {
    for (let attempt = 1; ; attempt += 1) {
      try {
        return await attemptOnce(this._deadline(timeoutMs));
      } catch (err) {
        if (!isGrpcError(err)) throw err;
        if (attempt > 1 && doneOnRetry && doneOnRetry[err.code]) return doneOnRetry[err.code]();
        const error = fromGrpcError(err, method, attempt);
        if (retry && err.code === grpc.status.UNAVAILABLE && attempt <= this.retries) {
          await this._retryWait(method, attempt, error);
          continue;
        }
        throw error;
      }
    }
  }

  /**
   * @private
   * @param {keyof ReidalClient['stubs']} service
   * @param {string} rpc
   * @param {object} request
   * @param {{retry: boolean, timeoutMs?: number | null, doneOnRetry?: Record<number, () => Promise<any>>}} how
   */
  _unary(service, rpc, request, how) {
    const stub = this.stubs[service];
    const method = `${stub.constructor.serviceName ?? service}.${rpc}`;
    return this._withRetries(method, (deadline) => new Promise((resolve, reject) => {
      stub[rpc](request, this.callMetadata(), { deadline }, (err, resp) => (err ? reject(err) : resolve(resp)));
    }), how).then(msgs.plain);
  }

  /**
   * A server stream as an async iterator of plain messages; the call is cancelled when the
   * consumer stops early.
   * @private
   */
  async* _serverStream(service, rpc, request, deadline) {
    const stub = this.stubs[service];
    const call = stub[rpc](request, this.callMetadata(), { deadline });
    call.on('error', () => {}); // errors reach the iterator; this keeps a late CANCELLED quiet
    try {
      for await (const message of call) yield msgs.plain(message);
    } catch (err) {
      if (isGrpcError(err)) throw fromGrpcError(err, `${stub.constructor.serviceName ?? service}.${rpc}`);
      throw err;
    } finally {
      call.cancel();
    }
  }

  // ------------------------------------------------------------------ health

  /**
   * grpc.health.v1 status of `service` ("" = the whole server): "SERVING", "NOT_SERVING".
   * Rejects with NOT_FOUND for a service the server does not run.
   * @param {string} [service]
   * @param {{timeoutMs?: number, retry?: boolean}} [options]
   * @returns {Promise<string>}
   */
  async health(service = '', { timeoutMs, retry = true } = {}) {
    const resp = await this._unary('health', 'Check', { service }, { retry, timeoutMs });
    return resp.status;
  }

  /**
   * Resolve once the server reports SERVING (e.g. after starting it); reject with the last
   * error (or DEADLINE_EXCEEDED) when it does not within `timeoutMs`.
   * @param {{timeoutMs?: number, service?: string}} [options]
   */
  async waitUntilServing({ timeoutMs = 60000, service = '' } = {}) {
    const end = Date.now() + timeoutMs;
    let last = null;
    while (Date.now() < end) {
      try {
        const left = Math.max(Math.min(5000, end - Date.now()), 10);
        if (await this.health(service, { timeoutMs: left, retry: false }) === 'SERVING') return;
      } catch (err) {
        if (!(err instanceof ReidalError)) throw err;
        last = err;
      }
      await sleep(100);
    }
    throw last ?? new ReidalError(grpc.status.DEADLINE_EXCEEDED,
      `${this.address} did not report SERVING within ${timeoutMs} ms`, { method: 'Health.Check' });
  }

  // ------------------------------------------------------------------ collections

  /**
   * Create an empty collection (ALREADY_EXISTS when the id is taken).
   * @param {string} collectionId
   * @param {{species?: string, model?: string | {name?: string, version?: string},
   *   clustering?: {dbscanEps?: number, minSamples?: number, k1?: number, k2?: number},
   *   sampling?: object, timeoutMs?: number}} [options]
   */
  async createCollection(collectionId, { species = '', model, clustering, sampling, timeoutMs } = {}) {
    const request = {
      collectionId, species, model: msgs.modelRef(model), clustering: clustering ?? {},
      sampling: sampling ? { ...sampling, defaultBudget: msgs.budgetMessage(sampling.defaultBudget) } : {},
    };
    return this._unary('collections', 'CreateCollection', request, {
      retry: true, timeoutMs,
      doneOnRetry: { [grpc.status.ALREADY_EXISTS]: () => this.getCollection(collectionId) },
    });
  }

  /** @param {string} collectionId @param {{timeoutMs?: number}} [options] */
  async getCollection(collectionId, { timeoutMs } = {}) {
    return this._unary('collections', 'GetCollection', { collectionId }, { retry: true, timeoutMs });
  }

  /** Every collection, oldest first. @param {{timeoutMs?: number}} [options] */
  async listCollections({ timeoutMs } = {}) {
    return (await this._unary('collections', 'ListCollections', {}, { retry: true, timeoutMs })).collections;
  }

  /**
   * Delete a collection and everything in it (NOT_FOUND when absent).
   * @param {string} collectionId
   * @param {{actor?: string, timeoutMs?: number}} [options]
   */
  async deleteCollection(collectionId, { actor = '', timeoutMs } = {}) {
    await this._unary('collections', 'DeleteCollection', { collectionId, actor }, {
      retry: true, timeoutMs, doneOnRetry: { [grpc.status.NOT_FOUND]: async () => ({ collectionId }) },
    });
  }

  /**
   * Ingest images in AddImages calls of `messagesPerCall` streamed messages of `batchSize`
   * images each (files are read one call's worth at a time). A call is retried whole on
   * UNAVAILABLE, which is safe: AddImages is idempotent per image id.
   * @param {string} collectionId
   * @param {Iterable<ImageInput> | AsyncIterable<ImageInput>} images
   * @param {{batchSize?: number, messagesPerCall?: number, deferEmbedding?: boolean,
   *   onProgress?: (done: number) => void, timeoutMs?: number}} [options]
   * @returns {Promise<{collectionId: string, received: number, added: number,
   *   alreadyPresent: number, embedded: number, changedIds: string[], model: object | null}>}
   */
  async addImages(collectionId, images, {
    batchSize = DEFAULT_INGEST_BATCH, messagesPerCall = 1, deferEmbedding = false, onProgress, timeoutMs,
  } = {}) {
    if (!Number.isInteger(batchSize) || batchSize < 1 || batchSize > 1024) {
      throw new RangeError(`batchSize must be an integer in [1, 1024], got ${batchSize}`);
    }
    if (!Number.isInteger(messagesPerCall) || messagesPerCall < 1) {
      throw new RangeError(`messagesPerCall must be an integer >= 1, got ${messagesPerCall}`);
    }
    const total = { collectionId, received: 0, added: 0, alreadyPresent: 0, embedded: 0, changedIds: [], model: null };
    const perCall = batchSize * messagesPerCall;
    let group = [];
    const flush = async () => {
      const messages = [];
      for (let s = 0; s < group.length; s += batchSize) {
        const chunk = await Promise.all(group.slice(s, s + batchSize).map(msgs.ingestImage));
        messages.push({ collectionId, images: chunk, deferEmbedding });
      }
      const resp = await this._addImagesCall(messages, timeoutMs);
      for (const k of ['received', 'added', 'alreadyPresent', 'embedded']) total[k] += resp[k];
      total.changedIds.push(...resp.changedIds);
      if (resp.model && resp.model.version) total.model = resp.model;
      group = [];
      if (onProgress) onProgress(total.received);
    };
    for await (const item of images) {
      group.push(item);
      if (group.length === perCall) await flush();
    }
    if (group.length) await flush();
    if (total.received === 0) throw new RangeError('addImages got no images');
    return total;
  }

  /** @private */
  _addImagesCall(messages, timeoutMs) {
    const stub = this.stubs.collections;
    return this._withRetries('CollectionService.AddImages', (deadline) => new Promise((resolve, reject) => {
      const call = stub.AddImages(this.callMetadata(), { deadline }, (err, resp) => (err ? reject(err) : resolve(resp)));
      (async () => {
        for (const m of messages) {
          if (!call.write(m)) await Promise.race([once(call, 'drain'), once(call, 'status')]);
        }
        call.end();
      })().catch(() => call.cancel()); // the callback reports why
    }), { retry: true, timeoutMs }).then(msgs.plain);
  }

  /**
   * The images of a collection (every page), in ingest order, optionally filtered.
   * @param {string} collectionId
   * @param {{filter?: object, pageSize?: number, timeoutMs?: number}} [options]
   */
  async listImages(collectionId, { filter, pageSize = 1000, timeoutMs } = {}) {
    const out = [];
    let pageToken = '';
    do {
      const page = await this._unary('collections', 'ListImages',
        { collectionId, filter: msgs.imageFilter(filter), pageSize, pageToken }, { retry: true, timeoutMs });
      out.push(...page.images);
      pageToken = page.nextPageToken;
    } while (pageToken);
    return out;
  }

  /**
   * The encoded file of one image as ingested: {imageId, data (Buffer), mimeType, sha256}.
   * @param {string} collectionId @param {string} imageId @param {{timeoutMs?: number}} [options]
   */
  async getImage(collectionId, imageId, { timeoutMs } = {}) {
    return this._unary('collections', 'GetImage', { collectionId, imageId }, { retry: true, timeoutMs });
  }

  /**
   * Embed the images that lack a vector (deferEmbedding ingest, or a new model version).
   * With `wait` (default) resolve with the final operation; reject with
   * OperationFailedError if it fails. Never retried (a second call would start a second
   * operation).
   * @param {string} collectionId
   * @param {{model?: string | object, wait?: boolean, timeoutMs?: number,
   *   onProgress?: (op: object) => void}} [options]
   */
  async embedCollection(collectionId, { model, wait = true, timeoutMs, onProgress } = {}) {
    const op = await this._unary('collections', 'EmbedCollection',
      { collectionId, model: msgs.modelRef(model) }, { retry: false, timeoutMs });
    return wait ? this.waitOperation(op.operationId, { onProgress }) : op;
  }

  /** @param {string} operationId @param {{timeoutMs?: number}} [options] */
  async getOperation(operationId, { timeoutMs } = {}) {
    return this._unary('collections', 'GetOperation', { operationId }, { retry: true, timeoutMs });
  }

  /**
   * The operation's states as they change, ending with the final one.
   * @param {string} operationId
   * @param {{timeoutMs?: number | null}} [options] deadline of the whole watch (default: none).
   */
  watchOperation(operationId, { timeoutMs = null } = {}) {
    return this._serverStream('collections', 'WatchOperation', { operationId }, this._deadline(timeoutMs));
  }

  /**
   * Resolve with the operation once it SUCCEEDED; reject with OperationFailedError (code =
   * the status it recorded) when it FAILED. A watch cut by a server restart (UNAVAILABLE)
   * is resumed with the usual retries.
   * @param {string} operationId
   * @param {{timeoutMs?: number | null, onProgress?: (op: object) => void}} [options]
   */
  async waitOperation(operationId, { timeoutMs = null, onProgress } = {}) {
    const end = timeoutMs === null ? null : Date.now() + timeoutMs;
    const settle = (op) => {
      if (op.state === 'OPERATION_STATE_FAILED') throw new OperationFailedError(op);
      return op.state === 'OPERATION_STATE_SUCCEEDED' ? op : null;
    };
    let failures = 0;
    for (;;) {
      try {
        const left = end === null ? null : Math.max(end - Date.now(), 1);
        for await (const op of this.watchOperation(operationId, { timeoutMs: left })) {
          failures = 0;
          if (onProgress) onProgress(op);
          const done = settle(op);
          if (done) return done;
        }
      } catch (err) {
        if (err instanceof OperationFailedError || !(err instanceof ReidalError) ||
            err.code !== grpc.status.UNAVAILABLE || failures >= this.retries) throw err;
        failures += 1;
        await this._retryWait('CollectionService.WatchOperation', failures, err);
        continue;
      }
      const done = settle(await this.getOperation(operationId)); // ended without a final state
      if (done) return done;
    }
  }

  // ------------------------------------------------------------------ sampling

  /**
   * @private
   * @param {string} collectionId
   * @param {{budget?: any, filter?: any, skipPending?: boolean, requestId?: string}} options
   */
  _pairsRequest(collectionId, { budget, filter, skipPending = false, requestId }) {
    return {
      collectionId, budget: msgs.budgetMessage(budget), filter: msgs.imageFilter(filter), skipPending,
      requestId: requestId || crypto.randomUUID(),
    };
  }

  /**
   * Run one sampling cycle and return its batch of pairs.
   * budget: a pair count (integer >= 1), a fraction in (0, 1), {count} or {fraction};
   * unset = the collection's default. requestId: idempotency key (a fresh UUID when unset),
   * so a retry after a lost response returns the same batch instead of a second cycle.
   * @param {string} collectionId
   * @param {{budget?: number | {count: number} | {fraction: number}, filter?: object,
   *   skipPending?: boolean, requestId?: string, timeoutMs?: number}} [options]
   */
  async getQueryPairs(collectionId, options = {}) {
    return this._unary('sampling', 'GetQueryPairs', this._pairsRequest(collectionId, options),
      { retry: true, timeoutMs: options.timeoutMs });
  }

  /**
   * The same cycle in the background: an Operation whose batchId names the batch once it
   * succeeded (waitOperation, then getQueryBatch).
   * @param {string} collectionId
   * @param {{budget?: number | object, filter?: object, skipPending?: boolean,
   *   requestId?: string, timeoutMs?: number}} [options]
   */
  async startQueryPairs(collectionId, options = {}) {
    return this._unary('sampling', 'StartQueryPairs', this._pairsRequest(collectionId, options),
      { retry: true, timeoutMs: options.timeoutMs });
  }

  /** @param {string} collectionId @param {string} batchId @param {{timeoutMs?: number}} [options] */
  async getQueryBatch(collectionId, batchId, { timeoutMs } = {}) {
    return this._unary('sampling', 'GetQueryBatch', { collectionId, batchId }, { retry: true, timeoutMs });
  }

  /**
   * Every new batch of the collection as it is created, for as long as you iterate
   * (`break` cancels the stream). afterCycle: also send the stored batches above this
   * cycle first (default: only batches from now on). A stream cut by UNAVAILABLE is
   * reopened with the usual backoff after the last cycle seen. Ends after a
   * QUEUE_EVENT_KIND_COLLECTION_DELETED event.
   * @param {string} collectionId
   * @param {{afterCycle?: number, timeoutMs?: number | null}} [options]
   */
  async* watchQueue(collectionId, { afterCycle, timeoutMs = null } = {}) {
    let after = afterCycle ?? (await this.getCollection(collectionId)).cycle;
    const end = timeoutMs === null ? null : Date.now() + timeoutMs;
    let failures = 0;
    for (;;) {
      const deadline = end === null ? Infinity : new Date(Math.max(end, Date.now() + 1));
      try {
        for await (const event of this._serverStream('sampling', 'WatchQueue',
          { collectionId, afterCycle: after }, deadline)) {
          failures = 0;
          if (event.batch) after = Math.max(after, event.batch.cycle);
          yield event;
          if (event.kind === 'QUEUE_EVENT_KIND_COLLECTION_DELETED') return;
        }
        return;
      } catch (err) {
        if (!(err instanceof ReidalError) || err.code !== grpc.status.UNAVAILABLE || failures >= this.retries) throw err;
        failures += 1;
        await this._retryWait('SamplingService.WatchQueue', failures, err);
      }
    }
  }

  // ------------------------------------------------------------------ constraints

  /**
   * Store answers durably, all or nothing. answers: {pairId, label} / {imageA, imageB,
   * label} objects (see AnswerInput) or [pairId, label] / [imageA, imageB, label] arrays.
   * annotatorId: used for answers that name none. requestId: the idempotency key (a fresh
   * UUID when unset, returned as `requestId`), so the automatic retry after a lost response
   * stores nothing twice; pass your own to make a resubmission from elsewhere idempotent.
   * @param {string} collectionId
   * @param {Array<AnswerInput | any[]>} answers
   * @param {{batchId?: string, requestId?: string, annotatorId?: string, timeoutMs?: number}} [options]
   * @returns {Promise<{storedCount: number, replayedCount: number, answerIds: string[],
   *   contradictions: object[], supersededCount: number, requestId: string}>}
   */
  async submitConstraints(collectionId, answers, { batchId = '', requestId, annotatorId = '', timeoutMs } = {}) {
    const items = [...answers].map((a) => msgs.answerInput(a, annotatorId));
    if (!items.length) throw new RangeError('submitConstraints got no answers');
    const rid = requestId || crypto.randomUUID();
    const resp = await this._unary('constraints', 'SubmitConstraints',
      { collectionId, batchId, answers: items, requestId: rid }, { retry: true, timeoutMs });
    return { ...resp, requestId: rid };
  }

  /**
   * Stored answers (every page), newest first; current ones unless includeHistory.
   * label: "" = any, else as parseLabel reads it.
   * @param {string} collectionId
   * @param {{imageId?: string, annotatorId?: string, label?: string | boolean | null,
   *   batchId?: string, includeHistory?: boolean, pageSize?: number, timeoutMs?: number}} [options]
   */
  async listConstraints(collectionId, {
    imageId = '', annotatorId = '', label = '', batchId = '', includeHistory = false, pageSize = 1000, timeoutMs,
  } = {}) {
    const labelName = label === '' ? 'ANSWER_LABEL_UNSPECIFIED' : `ANSWER_LABEL_${msgs.parseLabel(label)}`;
    const out = [];
    let pageToken = '';
    do {
      const page = await this._unary('constraints', 'ListConstraints', {
        collectionId, imageId, annotatorId, label: labelName, batchId, includeHistory, pageSize, pageToken,
      }, { retry: true, timeoutMs });
      out.push(...page.constraints);
      pageToken = page.nextPageToken;
    } while (pageToken);
    return out;
  }

  /**
   * Soft-delete one answer; resolves with {deleted, restored} (restored: the answer that is
   * current again on that pair, or null). Not retried (a retry could not tell "already
   * deleted by me" from "never existed").
   * @param {string} collectionId
   * @param {string} answerId
   * @param {{actor?: string, reason?: string, timeoutMs?: number}} [options]
   */
  async deleteConstraint(collectionId, answerId, { actor = '', reason = '', timeoutMs } = {}) {
    return this._unary('constraints', 'DeleteConstraint', { collectionId, answerId, actor, reason },
      { retry: false, timeoutMs });
  }

  /**
   * Take a bad image out of sampling and identities (its answers are kept).
   * @param {string} collectionId @param {string} imageId
   * @param {{reason?: string, actor?: string, timeoutMs?: number}} [options]
   */
  async excludeImage(collectionId, imageId, { reason = '', actor = '', timeoutMs } = {}) {
    return this._unary('constraints', 'ExcludeImage', { collectionId, imageId, reason, actor },
      { retry: true, timeoutMs });
  }

  /**
   * @param {string} collectionId @param {string} imageId
   * @param {{actor?: string, timeoutMs?: number}} [options]
   */
  async restoreImage(collectionId, imageId, { actor = '', timeoutMs } = {}) {
    return this._unary('constraints', 'RestoreImage', { collectionId, imageId, actor }, { retry: true, timeoutMs });
  }

  /**
   * The identity of every image not excluded (stable ids; see constraints.proto).
   * @param {string} collectionId @param {{timeoutMs?: number}} [options]
   */
  async getIdentities(collectionId, { timeoutMs } = {}) {
    return this._unary('constraints', 'GetIdentities', { collectionId }, { retry: true, timeoutMs });
  }

  // ------------------------------------------------------------------ embedding

  /**
   * Vectors of images through the EmbeddingService (nothing is stored), in one Embed call
   * (at most 1024 images). Resolves with {embeddings: [{id, vector}], modelName,
   * modelVersion, dim}.
   * @param {ImageInput[]} images
   * @param {{model?: string | object, timeoutMs?: number}} [options]
   */
  async embed(images, { model, timeoutMs } = {}) {
    const pics = (await Promise.all(images.map(msgs.ingestImage))).map((m) => m.image);
    if (!pics.length) throw new RangeError('embed got no images');
    return this._unary('embedding', 'Embed', { model: msgs.modelRef(model), images: pics },
      { retry: true, timeoutMs });
  }
}

module.exports = { ReidalClient, DEFAULT_ADDRESS, DEFAULT_INGEST_BATCH, defaultChannelOptions };

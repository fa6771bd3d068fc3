'use strict';
/**
 * What a failed call rejects with: a ReidalError carrying the gRPC status code, the
 * server's message (which names the offending collection, image or pair), the method
 * called and how many attempts were made, so callers can branch on `err.codeName` and
 * print `err.message` without digging into grpc-js internals.
 */

const grpc = require('@grpc/grpc-js');

/** Status names by number ("NOT_FOUND" for 5), from grpc-js's own table. */
const CODE_NAMES = Object.freeze(Object.fromEntries(
  Object.entries(grpc.status).filter(([, v]) => typeof v === 'number').map(([k, v]) => [v, k])));

/**
 * @param {number} code
 * @returns {string}
 */
function codeName(code) {
  return CODE_NAMES[code] ?? `CODE_${code}`;
}

class ReidalError extends Error {
  /**
   * @param {number} code gRPC status code (grpc.status.NOT_FOUND, ...).
   * @param {string} details the server's message.
   * @param {{method?: string, attempts?: number}} [where]
   */
  constructor(code, details, { method = '', attempts = 1 } = {}) {
    super(`${codeName(code)}: ${details}`);
    this.name = 'ReidalError';
    /** @type {number} */
    this.code = code;
    /** @type {string} e.g. "NOT_FOUND" */
    this.codeName = codeName(code);
    /** @type {string} the server's message */
    this.details = details;
    /** @type {string} e.g. "CollectionService.GetCollection" */
    this.method = method;
    /** @type {number} */
    this.attempts = attempts;
  }
}

/** A long-running operation ended FAILED; `code` is the status it recorded. */
class OperationFailedError extends ReidalError {
  /**
   * @param {{operationId: string, errorCode: string, errorMessage: string}} op
   */
  constructor(op) {
    const code = grpc.status[op.errorCode] ?? grpc.status.UNKNOWN;
    super(code, `operation ${op.operationId} failed: ${op.errorMessage}`,
      { method: 'CollectionService.WatchOperation' });
    this.name = 'OperationFailedError';
    this.operation = op;
  }
}

/**
 * True for what grpc-js rejects a call with (a status object with a numeric code).
 * @param {unknown} err
 * @returns {err is {code: number, details: string}}
 */
function isGrpcError(err) {
  return err !== null && typeof err === 'object' && typeof (/** @type {any} */ (err)).code === 'number' &&
    !(err instanceof ReidalError);
}

/**
 * @param {{code: number, details?: string, message?: string}} err
 * @param {string} method
 * @param {number} [attempts]
 */
function fromGrpcError(err, method, attempts = 1) {
  return new ReidalError(err.code, err.details || err.message || '', { method, attempts });
}

module.exports = { ReidalError, OperationFailedError, codeName, isGrpcError, fromGrpcError };

'use strict';
/**
 * The reidal.v1 service definitions, loaded from the .proto files at run time (no generated
 * code to keep in step with protos/), plus grpc.health.v1.Health, which is not in protos/
 * and is small enough to describe inline.
 */

const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

/** protos/ of the repository this package lives in (clients/node/src -> protos). */
const DEFAULT_PROTO_DIR = path.resolve(__dirname, '..', '..', '..', 'protos');

/** Files of the reidal.v1 API, relative to the proto directory. */
const PROTO_FILES = Object.freeze([
  'reidal/v1/common.proto', 'reidal/v1/collections.proto', 'reidal/v1/sampling.proto',
  'reidal/v1/constraints.proto', 'reidal/v1/embedding.proto', 'reidal/v1/training.proto',
]);

/**
 * How messages look in JavaScript: camelCase field names, enums as their proto names
 * ("ANSWER_LABEL_SAME"), 64-bit integers as Number (counts never near 2^53), unset fields
 * filled with their defaults, and a virtual field naming the member set in each oneof.
 */
const LOADER_OPTIONS = Object.freeze({
  keepCase: false, longs: Number, enums: String, defaults: true, oneofs: true,
});

const HEALTH_JSON = {
  nested: { grpc: { nested: { health: { nested: { v1: { nested: {
    HealthCheckRequest: { fields: { service: { type: 'string', id: 1 } } },
    HealthCheckResponse: {
      fields: { status: { type: 'ServingStatus', id: 1 } },
      nested: {
        ServingStatus: { values: { UNKNOWN: 0, SERVING: 1, NOT_SERVING: 2, SERVICE_UNKNOWN: 3 } },
      },
    },
    Health: {
      methods: { Check: { requestType: 'HealthCheckRequest', responseType: 'HealthCheckResponse' } },
    },
  } } } } } } },
};

/** @type {Map<string, any>} */
const cache = new Map();

/**
 * Client constructors of every reidal service and of Health (cached per directory).
 * @param {string} [protoDir] the folder holding reidal/v1/*.proto.
 * @returns {{CollectionService: any, SamplingService: any, ConstraintService: any,
 *   EmbeddingService: any, TrainingService: any, Health: any}}
 */
function loadServices(protoDir = DEFAULT_PROTO_DIR) {
  const dir = path.resolve(protoDir);
  if (!cache.has(dir)) {
    const missing = PROTO_FILES.filter((f) => !fs.existsSync(path.join(dir, f)));
    if (missing.length) {
      throw new Error(`reidal .proto files not found under ${dir}: ${missing.join(', ')} ` +
        '(pass protoDir, or set REIDAL_PROTO_DIR)');
    }
    /** @type {any} */
    const loaded = grpc.loadPackageDefinition(
      protoLoader.loadSync([...PROTO_FILES], { ...LOADER_OPTIONS, includeDirs: [dir] }));
    /** @type {any} */
    const healthLoaded = grpc.loadPackageDefinition(
      protoLoader.fromJSON(/** @type {any} */ (HEALTH_JSON), LOADER_OPTIONS));
    const reidal = loaded.reidal.v1;
    const health = healthLoaded.grpc.health.v1;
    cache.set(dir, {
      CollectionService: reidal.CollectionService,
      SamplingService: reidal.SamplingService,
      ConstraintService: reidal.ConstraintService,
      EmbeddingService: reidal.EmbeddingService,
      TrainingService: reidal.TrainingService,
      Health: health.Health,
    });
  }
  return cache.get(dir);
}

module.exports = { DEFAULT_PROTO_DIR, PROTO_FILES, LOADER_OPTIONS, loadServices };

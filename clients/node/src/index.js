'use strict';
/**
 * reidal-client: a Node.js client of the reidal gRPC API. See README.md for the loop.
 *
 *   const { ReidalClient } = require('reidal-client');
 */

const { ReidalClient, DEFAULT_ADDRESS, DEFAULT_INGEST_BATCH, defaultChannelOptions } = require('./client');
const { ReidalError, OperationFailedError, codeName } = require('./errors');
const { parseLabel, TAGS } = require('./messages');
const { loadServices, DEFAULT_PROTO_DIR, PROTO_FILES } = require('./protos');
const { status } = require('@grpc/grpc-js');

module.exports = {
  ReidalClient,
  ReidalError,
  OperationFailedError,
  status,
  codeName,
  parseLabel,
  TAGS,
  loadServices,
  DEFAULT_ADDRESS,
  DEFAULT_INGEST_BATCH,
  DEFAULT_PROTO_DIR,
  PROTO_FILES,
  defaultChannelOptions,
};

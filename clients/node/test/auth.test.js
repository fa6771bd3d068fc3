'use strict';
/**
 * Access tokens from Node against a real reidal server run with --auth-tokens (tokens made
 * with `reidal token create`): no token and an unknown token are UNAUTHENTICATED, a token
 * for collection A can neither read nor write collection B (PERMISSION_DENIED), and works
 * on A. No Triton: the services used here never embed.
 */
const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { spawn, execFile } = require('node:child_process');
const { promisify } = require('node:util');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');

const { ReidalClient } = require('../src/index.js');

const PACKAGE_DIR = path.resolve(__dirname, '..');
const REIDAL_BIN = process.env.REIDAL_BIN || path.resolve(PACKAGE_DIR, '..', '..', '.venv', 'bin', 'reidal');

async function createToken(tokensFile, name, collections, role) {
  const { stdout } = await promisify(execFile)(REIDAL_BIN, ['token', 'create', '--name', name,
    '--collections', collections, '--role', role, '--tokens-file', tokensFile]);
  return stdout.trim().split('\n')[0].trim();
}

function startServer(dataDir, tokensFile) {
  return new Promise((resolve, reject) => {
    // A closed port as Triton: nothing here embeds.
    const proc = spawn(REIDAL_BIN, ['serve', '--service', 'collections', 'sampling', 'constraints',
      '--data-dir', dataDir, '--host', '127.0.0.1', '--port', '0', '--triton-url', '127.0.0.1:9',
      '--auth-tokens', tokensFile, '--no-http', '--grace', '1', '--log-level', 'WARNING'],
    { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    const timer = setTimeout(() => reject(new Error(`reidal serve did not start\n${out}\n${err}`)), 60000);
    proc.stderr.on('data', (d) => { err += d; });
    proc.stdout.on('data', (d) => {
      out += d;
      const m = /reidal serving .* on (\S+:\d+)/.exec(out);
      if (m) { clearTimeout(timer); resolve({ proc, address: m[1] }); }
    });
    proc.on('exit', (code) => { clearTimeout(timer); reject(new Error(`reidal serve exited ${code}\n${err}`)); });
  });
}

async function code(promise) {
  try {
    await promise;
  } catch (err) {
    return err.code;
  }
  assert.fail('the call did not fail');
}

describe('access tokens from Node', { timeout: 120000 }, () => {
  let tmp;
  let server;
  const tokens = {};

  before(async () => {
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'reidal-node-auth-'));
    const file = path.join(tmp, 'tokens.json');
    tokens.admin = await createToken(file, 'admin', '*', 'admin');
    tokens.a = await createToken(file, 'team-a', 'A', 'admin');
    server = await startServer(path.join(tmp, 'data'), file);
    const admin = new ReidalClient(server.address, { token: tokens.admin, retries: 0 });
    try {
      await admin.createCollection('A');
      await admin.createCollection('B');
    } finally {
      admin.close();
    }
  });

  after(() => {
    if (server) server.proc.kill('SIGKILL');
    if (tmp) fs.rmSync(tmp, { recursive: true, force: true });
  });

  it('refuses calls without a valid token', async () => {
    const anonymous = new ReidalClient(server.address, { retries: 0 });
    const unknown = new ReidalClient(server.address, { retries: 0, token: 'reidal_not-a-real-token' });
    try {
      assert.equal(await code(anonymous.listCollections()), grpc.status.UNAUTHENTICATED);
      assert.equal(await code(unknown.getCollection('A')), grpc.status.UNAUTHENTICATED);
    } finally {
      anonymous.close();
      unknown.close();
    }
  });

  it('keeps a token to its own collections', async () => {
    const client = new ReidalClient(server.address, { retries: 0, token: tokens.a });
    try {
      const listed = await client.listCollections();
      assert.deepEqual(listed.map((c) => c.collectionId), ['A']);
      assert.equal((await client.getCollection('A')).collectionId, 'A');
      assert.equal(await code(client.getCollection('B')), grpc.status.PERMISSION_DENIED);
      assert.equal(await code(client.deleteCollection('B')), grpc.status.PERMISSION_DENIED);
      assert.equal(await code(client.getQueryPairs('B', { budget: 1 })), grpc.status.PERMISSION_DENIED);
    } finally {
      client.close();
    }
    const admin = new ReidalClient(server.address, { token: tokens.admin, retries: 0 });
    try {
      assert.equal((await admin.getCollection('B')).collectionId, 'B'); // B is untouched
    } finally {
      admin.close();
    }
  });
});

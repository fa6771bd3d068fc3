'use strict';
/**
 * Client behaviour that needs no reidal server: retries and backoff against a closed port,
 * TLS / mutual TLS and the bearer token against small grpc-js Health servers.
 */

const { describe, it } = require('node:test');
const assert = require('node:assert/strict');
const { execFile } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const util = require('node:util');
const grpc = require('@grpc/grpc-js');
const { ReidalClient, loadServices } = require('../src');

/** The rejection of a promise; fails when it resolves. */
async function rejection(promise) {
  try {
    await promise;
  } catch (err) {
    return err;
  }
  assert.fail('the call did not fail');
}

/** A grpc-js server answering Health.Check with SERVING (seeing each call first). */
async function healthServer(credentials, onCall = () => {}) {
  const srv = new grpc.Server();
  srv.addService(loadServices().Health.service, {
    Check: (call, cb) => {
      onCall(call);
      cb(null, { status: 'SERVING' });
    },
  });
  const port = await new Promise((resolve, reject) => srv.bindAsync('127.0.0.1:0', credentials,
    (e, p) => (e ? reject(e) : resolve(p))));
  return { srv, port };
}

describe('client behaviour without a reidal server', () => {
  it('retries UNAVAILABLE with growing backoff, only for calls safe to repeat', async () => {
    const retries = [];
    const c = new ReidalClient('127.0.0.1:1', {
      retries: 3, backoffMs: 10, maxBackoffMs: 30, timeoutMs: 2000,
      onRetry: (method, attempt, delayMs) => retries.push([method, attempt, delayMs]),
    });
    try {
      const err = await rejection(c.getCollection('x'));
      assert.deepEqual([err.codeName, err.attempts], ['UNAVAILABLE', 4]);
      assert.deepEqual(retries.map((r) => r.slice(0, 2)), [1, 2, 3].map((a) => ['CollectionService.GetCollection', a]));
      const delays = retries.map((r) => r[2]);
      assert.ok(delays[0] > 7 && delays[0] <= 10 && delays[1] > 15 && delays[1] <= 20 && delays[2] > 23 && delays[2] <= 30, String(delays));
      retries.length = 0;
      const once = await rejection(c.deleteConstraint('x', 'answer-1'));
      assert.deepEqual([once.codeName, once.attempts, retries.length], ['UNAVAILABLE', 1, 0]);
    } finally {
      c.close();
    }
  });

  it('talks TLS and mutual TLS with the PEM files given, never plaintext to a TLS port', async (t) => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'reidal-node-tls-'));
    t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
    const cert = path.join(dir, 'cert.pem');
    const key = path.join(dir, 'key.pem');
    try {
      await util.promisify(execFile)('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt',
        'ec_paramgen_curve:prime256v1', '-nodes', '-days', '1', '-subj', '/CN=localhost',
        '-addext', 'subjectAltName=DNS:localhost,IP:127.0.0.1', '-keyout', key, '-out', cert]);
    } catch (err) {
      if (err.code === 'ENOENT') return t.skip('openssl is not installed');
      throw err;
    }
    // One self-signed certificate: the server's, the CA both sides trust, and the client's.
    const pem = { cert: fs.readFileSync(cert), key: fs.readFileSync(key) };
    const { srv, port } = await healthServer(grpc.ServerCredentials.createSsl(pem.cert,
      [{ cert_chain: pem.cert, private_key: pem.key }], true));
    const clients = [];
    const open = (options) => {
      const c = new ReidalClient(`127.0.0.1:${port}`, { retries: 0, timeoutMs: 5000, ...options });
      clients.push(c);
      return c;
    };
    try {
      assert.equal(await open({ tls: { ca: cert, cert, key: pem.key, serverName: 'localhost' } }).health(), 'SERVING');
      assert.equal((await rejection(open({ tls: { ca: cert, serverName: 'localhost' } }).health())).codeName, 'UNAVAILABLE');
      assert.equal((await rejection(open({}).health())).codeName, 'UNAVAILABLE');
      assert.throws(() => open({ tls: { ca: path.join(dir, 'missing.pem') } }), /does not exist/);
      assert.throws(() => open({ tls: { cert } }), /both tls.cert and tls.key/);
    } finally {
      for (const c of clients) c.close();
      srv.forceShutdown();
    }
  });

  it('sends the token as bearer metadata with every call', async () => {
    const seen = [];
    const { srv, port } = await healthServer(grpc.ServerCredentials.createInsecure(), (call) =>
      seen.push([call.metadata.get('authorization')[0], call.metadata.get('x-tenant')[0]]));
    const c = new ReidalClient(`127.0.0.1:${port}`, { token: ' s3cret ', metadata: { 'x-tenant': 'zoo' } });
    try {
      assert.equal(await c.health(), 'SERVING');
      await c.waitUntilServing({ timeoutMs: 5000 });
      assert.deepEqual(seen, [['Bearer s3cret', 'zoo'], ['Bearer s3cret', 'zoo']]);
      assert.ok(!util.inspect(c, { depth: 4 }).includes('s3cret') && !String(c).includes('s3cret'));
      assert.ok(!Object.values(c).some((v) => typeof v === 'string' && v.includes('s3cret')));
      assert.throws(() => new ReidalClient('127.0.0.1:1', { token: ' ' }), /token is empty/);
    } finally {
      c.close();
      srv.forceShutdown();
    }
  });
});

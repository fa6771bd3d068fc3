'use strict';
/**
 * The whole active-learning loop from Node against a real reidal server (started here with
 * `reidal serve`, bundled Triton included): create, ingest, embed, pairs, answers,
 * identities, errors, delete, SIGTERM. Answers come from the synthetic images' true
 * identities, so every check below compares with an independent ground truth.
 *
 * REIDAL_BIN: the reidal executable (default: ../../.venv/bin/reidal from this package);
 * images are drawn by the python next to it (REIDAL_PYTHON overrides).
 */

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { spawn, execFile } = require('node:child_process');
const crypto = require('node:crypto');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { promisify } = require('node:util');
const { ReidalClient, ReidalError, status } = require('../src');

const PACKAGE_DIR = path.resolve(__dirname, '..');
const REIDAL_BIN = process.env.REIDAL_BIN || path.resolve(PACKAGE_DIR, '..', '..', '.venv', 'bin', 'reidal');
const PYTHON = process.env.REIDAL_PYTHON || path.join(path.dirname(REIDAL_BIN), 'python');
const SERVICES = ['reidal.v1.EmbeddingService', 'reidal.v1.CollectionService',
  'reidal.v1.SamplingService', 'reidal.v1.ConstraintService', 'reidal.v1.TrainingService'];
// DBSCAN parameters that find structure in a couple of dozen images (as the Python tests).
const SMALL_CLUSTERING = { k1: 6, k2: 2, minSamples: 2, dbscanEps: 0.6 };
const COLLECTION = 'node-zebras';

// 6 individuals x 4 images of 64 px, PNG files plus their true identities.
const DRAW_IMAGES = `
import json, sys
from pathlib import Path
from reidal.data.synthetic_images import SyntheticConfig, iter_samples
out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
truth = {}
for s in iter_samples(SyntheticConfig.tiny(seed=3)):
    s.image.save(out / f"{s.image_id}.png")
    truth[s.image_id] = {"identity": s.identity, "viewpoint": s.viewpoint}
(out / "truth.json").write_text(json.dumps(truth))
`;

/** Start `reidal serve` on a free port; resolve with {proc, address, log()}. */
function startServer(dataDir) {
  return new Promise((resolve, reject) => {
    const proc = spawn(REIDAL_BIN, ['serve', '--service', 'all', '--data-dir', dataDir,
      '--host', '127.0.0.1', '--port', '0', '--grace', '2', '--log-level', 'WARNING'],
    { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    const log = () => `stdout:\n${out}\nstderr (tail):\n${err.slice(-4000)}`;
    const timer = setTimeout(() => reject(new Error(`reidal serve did not start in 120 s\n${log()}`)), 120000);
    proc.stderr.on('data', (d) => { err += d; });
    proc.stdout.on('data', (d) => {
      out += d;
      const m = /reidal serving .* on (\S+:\d+)/.exec(out);
      if (m) {
        clearTimeout(timer);
        resolve({ proc, address: m[1], log });
      }
    });
    proc.on('error', (e) => { clearTimeout(timer); reject(e); });
    proc.on('exit', (code, signal) => {
      clearTimeout(timer);
      reject(new Error(`reidal serve exited (${code ?? signal}) before serving\n${log()}`));
    });
  });
}

/** @param {import('node:child_process').ChildProcess} proc @param {number} ms */
function exited(proc, ms) {
  if (proc.exitCode !== null || proc.signalCode !== null) return Promise.resolve(proc.exitCode ?? proc.signalCode);
  return new Promise((resolve) => {
    const timer = setTimeout(() => resolve('timeout'), ms);
    proc.once('exit', (code, signal) => { clearTimeout(timer); resolve(code ?? signal); });
  });
}

/** The rejection of a promise; fails when it resolves. */
async function rejection(promise) {
  try {
    await promise;
  } catch (err) {
    return err;
  }
  assert.fail('the call did not fail');
}

const key = (a, b) => (a < b ? `${a}|${b}` : `${b}|${a}`);

describe('the reidal loop from Node over gRPC', { timeout: 180000 }, () => {
  let tmp;
  let server;
  let client;
  let truth; // image id -> identity
  let ids; // image ids in ingest order
  let names; // image id -> platform name (first half of the individuals)
  let batch;
  const expected = new Map(); // pair key -> label of the current answer

  before(async () => {
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'reidal-node-'));
    const imagesDir = path.join(tmp, 'images');
    const [srv] = await Promise.all([
      startServer(path.join(tmp, 'data')),
      promisify(execFile)(PYTHON, ['-c', DRAW_IMAGES, imagesDir]),
    ]);
    server = srv;
    const raw = JSON.parse(fs.readFileSync(path.join(imagesDir, 'truth.json'), 'utf8'));
    truth = Object.fromEntries(Object.entries(raw).map(([id, t]) => [id, t.identity]));
    ids = Object.keys(raw);
    const individuals = [...new Set(Object.values(truth))].sort();
    const known = new Set(individuals.slice(0, individuals.length / 2));
    names = Object.fromEntries(ids.filter((id) => known.has(truth[id])).map((id) => [id, truth[id]]));
    client = new ReidalClient(server.address, { timeoutMs: 60000 });
    await client.waitUntilServing({ timeoutMs: 60000 });
  });

  after(async () => {
    if (client) client.close();
    if (server && await exited(server.proc, 0) === 'timeout') {
      server.proc.kill('SIGKILL');
      await exited(server.proc, 10000);
    }
    if (tmp) fs.rmSync(tmp, { recursive: true, force: true });
  });

  it('reports SERVING for the server and every reidal service', async () => {
    for (const name of ['', ...SERVICES]) assert.equal(await client.health(name), 'SERVING', name);
    const err = await rejection(client.health('no.such.Service'));
    assert.equal(err.codeName, 'NOT_FOUND');
  });

  it('creates a collection with its parameters, and refuses the same id again', async () => {
    const col = await client.createCollection(COLLECTION, { species: 'synthetic', clustering: SMALL_CLUSTERING });
    assert.equal(col.collectionId, COLLECTION);
    // The server answers with the effective parameters: ours kept, the rest filled in (mode 'fixed').
    for (const [key, value] of Object.entries(SMALL_CLUSTERING)) assert.equal(col.clustering[key], value, key);
    assert.equal(col.clustering.mode, 'fixed');
    assert.equal(col.imageCount, 0);
    assert.ok(col.createdAt instanceof Date && Math.abs(col.createdAt - Date.now()) < 600000);
    const listed = (await client.listCollections()).map((c) => c.collectionId);
    assert.ok(listed.includes(COLLECTION));
    const err = await rejection(client.createCollection(COLLECTION));
    assert.ok(err instanceof ReidalError);
    assert.equal(err.code, status.ALREADY_EXISTS);
    assert.equal(err.attempts, 1);
  });

  it('ingests by client stream, idempotently per id, and embeds deferred images', async () => {
    const images = ids.map((id) => ({
      id, path: path.join(tmp, 'images', `${id}.png`), name: names[id] ?? '', metadata: { site: 'north' },
    }));
    const progress = [];
    const first = await client.addImages(COLLECTION, images.slice(0, 16),
      { batchSize: 4, messagesPerCall: 2, onProgress: (n) => progress.push(n) });
    assert.deepEqual([first.received, first.added, first.alreadyPresent, first.embedded], [16, 16, 0, 16]);
    assert.deepEqual(progress, [8, 16]); // two calls of two 4-image messages
    assert.ok(first.model.version);

    const again = await client.addImages(COLLECTION, images.slice(0, 4)
      .map(({ id, path: p }) => ({ id, data: fs.readFileSync(p) })));
    assert.deepEqual([again.received, again.added, again.alreadyPresent], [4, 0, 4]);

    const deferred = await client.addImages(COLLECTION, images.slice(16), { deferEmbedding: true });
    assert.deepEqual([deferred.added, deferred.embedded], [ids.length - 16, 0]);
    let col = await client.getCollection(COLLECTION);
    assert.deepEqual([col.imageCount, col.embeddedImageCount], [ids.length, 16]);

    const seen = [];
    const op = await client.embedCollection(COLLECTION, { onProgress: (o) => seen.push(o.state) });
    assert.equal(op.state, 'OPERATION_STATE_SUCCEEDED');
    assert.equal(op.kind, 'embed_collection');
    assert.equal(seen.at(-1), 'OPERATION_STATE_SUCCEEDED');
    assert.equal((await client.getOperation(op.operationId)).state, 'OPERATION_STATE_SUCCEEDED');
    col = await client.getCollection(COLLECTION);
    assert.deepEqual([col.imageCount, col.embeddedImageCount], [ids.length, ids.length]);

    const file = fs.readFileSync(images[5].path);
    const content = await client.getImage(COLLECTION, images[5].id);
    assert.ok(Buffer.isBuffer(content.data) && content.data.equals(file));
    assert.equal(content.mimeType, 'image/png');
    assert.equal(content.sha256, crypto.createHash('sha256').update(file).digest('hex'));

    const listed = await client.listImages(COLLECTION, { pageSize: 10 });
    assert.deepEqual(listed.map((i) => i.imageId), ids);
    assert.ok(listed.every((i) => i.embedded && i.metadata.site === 'north' && i.name === (names[i.imageId] ?? '')));
  });

  it('samples a batch of pairs, the same batch again for the same request id', async () => {
    batch = await client.getQueryPairs(COLLECTION, { budget: 12, requestId: 'node-cycle-1' });
    assert.equal(batch.cycle, 1);
    assert.equal(batch.budget, 12);
    assert.ok(batch.pairs.length > 0 && batch.pairs.length <= 12, `got ${batch.pairs.length} pairs`);
    for (const p of batch.pairs) {
      assert.ok(p.imageA < p.imageB && p.imageA in truth && p.imageB in truth, JSON.stringify(p));
      assert.ok(['POOL_OVERSEGMENTATION', 'POOL_UNDERSEGMENTATION'].includes(p.pool));
    }
    const replay = await client.getQueryPairs(COLLECTION, { budget: 12, requestId: 'node-cycle-1' });
    assert.equal(replay.batchId, batch.batchId);
    assert.equal((await client.getCollection(COLLECTION)).cycle, 1);
  });

  it('stores answers once per request id', async () => {
    const answers = batch.pairs.map((p) => ({ pairId: p.pairId, label: truth[p.imageA] === truth[p.imageB] }));
    for (const p of batch.pairs) expected.set(key(p.imageA, p.imageB), truth[p.imageA] === truth[p.imageB] ? 'SAME' : 'DIFFERENT');
    // Three more by image pair, on pairs the batch did not ask: SAME, DIFFERENT, UNSURE.
    const unasked = (same) => {
      for (const a of ids) {
        for (const b of ids) {
          if (a < b && (truth[a] === truth[b]) === same && !expected.has(key(a, b))) return [a, b];
        }
      }
      throw new Error('no unasked pair');
    };
    const [sa, sb] = unasked(true);
    answers.push({ imageA: sa, imageB: sb, label: 'same', tags: ['POOR_QUALITY'], confidence: 0.75 });
    expected.set(key(sa, sb), 'SAME');
    const [da, db] = unasked(false);
    answers.push({ imageA: da, imageB: db, label: 'DIFFERENT' });
    expected.set(key(da, db), 'DIFFERENT');
    const [ua, ub] = unasked(false);
    answers.push([ua, ub, null]);
    expected.set(key(ua, ub), 'UNSURE');

    const res = await client.submitConstraints(COLLECTION, answers,
      { batchId: batch.batchId, requestId: 'node-answers-1', annotatorId: 'node-test' });
    assert.equal(res.requestId, 'node-answers-1');
    assert.equal(res.storedCount, answers.length);
    assert.equal(res.answerIds.length, answers.length);
    assert.deepEqual(res.contradictions, []);
    const replay = await client.submitConstraints(COLLECTION, answers,
      { batchId: batch.batchId, requestId: 'node-answers-1', annotatorId: 'node-test' });
    assert.deepEqual([replay.storedCount, replay.replayedCount], [0, answers.length]);
    assert.deepEqual(replay.answerIds, res.answerIds);
    const reused = await rejection(client.submitConstraints(COLLECTION, [[sa, sb, false]],
      { requestId: 'node-answers-1' }));
    assert.equal(reused.codeName, 'ALREADY_EXISTS');
  });

  it('lists exactly the answers stored, with who gave them', async () => {
    const stored = await client.listConstraints(COLLECTION, { pageSize: 5 });
    const got = new Map(stored.map((c) => [key(c.imageA, c.imageB), c.label.replace('ANSWER_LABEL_', '')]));
    assert.equal(stored.length, expected.size);
    assert.deepEqual(got, expected);
    assert.ok(stored.every((c) => c.annotatorId === 'node-test' && c.status === 'CONSTRAINT_STATUS_CURRENT' &&
      c.requestId === 'node-answers-1' && c.batchId === batch.batchId && c.receivedAt instanceof Date));
    const tagged = stored.find((c) => c.tags.length);
    assert.deepEqual([tagged.tags, Math.round(tagged.confidence * 100)], [['ANSWER_TAG_POOR_QUALITY'], 75]);
    const same = await client.listConstraints(COLLECTION, { label: 'same' });
    assert.equal(same.length, [...expected.values()].filter((l) => l === 'SAME').length);
    assert.equal((await client.getCollection(COLLECTION)).answerCount, expected.size);
  });

  it('returns identities that hold every answer and every image once', async () => {
    const res = await client.getIdentities(COLLECTION);
    const where = new Map();
    for (const ident of res.identities) {
      assert.equal(ident.size, ident.imageIds.length);
      for (const id of ident.imageIds) {
        assert.ok(!where.has(id), `${id} in two identities`);
        where.set(id, ident.identityId);
      }
      const trueNames = new Set(ident.imageIds.map((id) => names[id]).filter(Boolean));
      assert.deepEqual(new Set(ident.names), trueNames);
      assert.equal(ident.newIndividual, trueNames.size === 0);
    }
    assert.deepEqual(new Set(where.keys()), new Set(ids));
    for (const [pair, label] of expected) {
      const [a, b] = pair.split('|');
      if (label === 'SAME') assert.equal(where.get(a), where.get(b), `SAME ${pair} split`);
      if (label === 'DIFFERENT') assert.notEqual(where.get(a), where.get(b), `DIFFERENT ${pair} joined`);
    }
    assert.equal(res.appliedAnswers, [...expected.values()].filter((l) => l !== 'UNSURE').length);
    assert.deepEqual(res.contradictions, []);
    assert.equal(res.cycle, 1);
  });

  it('watchQueue catches up on stored batches and stops when the consumer breaks', async () => {
    const events = [];
    for await (const event of client.watchQueue(COLLECTION, { afterCycle: 0, timeoutMs: 30000 })) {
      events.push(event);
      break;
    }
    assert.equal(events[0].kind, 'QUEUE_EVENT_KIND_BATCH_READY');
    assert.equal(events[0].batch.batchId, batch.batchId);
    assert.equal(events[0].batch.answered, batch.pairs.length);
  });

  it('rejects bad requests with the documented gRPC status and the server message', async () => {
    const missing = await rejection(client.getCollection('no-such-collection'));
    assert.ok(missing instanceof ReidalError);
    assert.deepEqual([missing.code, missing.codeName, missing.method, missing.attempts],
      [status.NOT_FOUND, 'NOT_FOUND', 'CollectionService.GetCollection', 1]);
    assert.match(missing.details, /no-such-collection/);
    assert.equal((await rejection(client.getQueryPairs('no-such-collection', { budget: 3 }))).codeName, 'NOT_FOUND');
    const self = await rejection(client.submitConstraints(COLLECTION, [[ids[0], ids[0], 'same']]));
    assert.equal(self.codeName, 'INVALID_ARGUMENT');
    const unknownPair = await rejection(client.submitConstraints(COLLECTION, [['no-such-pair', 'd']]));
    assert.equal(unknownPair.codeName, 'NOT_FOUND');
    assert.match(unknownPair.details, /no-such-pair/);
    const watchMissing = await rejection((async () => {
      for await (const op of client.watchOperation('op-nope')) assert.fail(`got ${op.state}`);
    })());
    assert.deepEqual([watchMissing.codeName, watchMissing.method], ['NOT_FOUND', 'CollectionService.WatchOperation']);
    const notAnImage = await rejection(client.addImages(COLLECTION, [{ id: 'garbage', data: Buffer.from('not a picture') }]));
    assert.equal(notAnImage.codeName, 'INVALID_ARGUMENT');
    assert.match(notAnImage.details, /garbage/);
    // Checked here, before any call: a bad budget or label never reaches the server.
    await assert.rejects(client.getQueryPairs(COLLECTION, { budget: 2.5 }), RangeError);
    await assert.rejects(client.submitConstraints(COLLECTION, [['p', 'maybe']]), RangeError);
    assert.equal((await client.getCollection(COLLECTION)).answerCount, expected.size);
  });

  it('deletes the collection (NOT_FOUND afterwards)', async () => {
    await client.deleteCollection(COLLECTION, { actor: 'node-test' });
    assert.equal((await rejection(client.getCollection(COLLECTION))).codeName, 'NOT_FOUND');
    assert.equal((await rejection(client.deleteCollection(COLLECTION))).codeName, 'NOT_FOUND');
  });

  it('the server stops cleanly on SIGTERM', async () => {
    server.proc.kill('SIGTERM');
    assert.equal(await exited(server.proc, 30000), 0, server.log());
  });
});

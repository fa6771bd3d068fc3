'use strict';
/**
 * Friendly inputs -> request objects, and responses -> plain objects. Kept apart from the
 * transport so the client's methods only say which RPC they call and how it is retried.
 */

const fs = require('node:fs/promises');

const LABEL_WORDS = {
  SAME: ['same', 's', 'yes', 'y', 'true', '1', 'must-link', 'ml'],
  DIFFERENT: ['different', 'diff', 'd', 'no', 'n', 'false', '0', 'cannot-link', 'cl'],
  UNSURE: ['unsure', 'u', '?', 'unknown', 'skip'],
};
const WORD_LABEL = new Map(Object.entries(LABEL_WORDS).flatMap(([l, ws]) => ws.map((w) => [w, l])));
const TAGS = ['PHOTOBOMB', 'SCENERY_MATCH', 'POOR_QUALITY'];

/**
 * An answer as "SAME", "DIFFERENT" or "UNSURE", the same words the Python client reads:
 * true / false / null, "same" / "s" / "yes", "different" / "d" / "no", "unsure" / "?",
 * or the proto name ("ANSWER_LABEL_SAME").
 * @param {string | boolean | null | undefined} value
 * @returns {'SAME' | 'DIFFERENT' | 'UNSURE'}
 */
function parseLabel(value) {
  if (value === null || value === undefined) return 'UNSURE';
  if (typeof value === 'boolean') return value ? 'SAME' : 'DIFFERENT';
  const word = String(value).trim().toLowerCase().replace(/^answer_label_/, '');
  const label = WORD_LABEL.get(word);
  if (!label) {
    throw new RangeError(`answer ${JSON.stringify(value)} is not same (s/yes/true), ` +
      'different (d/no/false) or unsure (u/?/null)');
  }
  return /** @type {'SAME' | 'DIFFERENT' | 'UNSURE'} */ (label);
}

/** @param {string} tag */
function parseTag(tag) {
  const name = String(tag).trim().toUpperCase().replace(/^ANSWER_TAG_/, '');
  if (!TAGS.includes(name)) {
    throw new RangeError(`answer tag ${JSON.stringify(tag)} is not one of ${TAGS.join(', ')}`);
  }
  return `ANSWER_TAG_${name}`;
}

/**
 * A Budget message: an integer >= 1 is a number of pairs, a number in (0, 1) a fraction of
 * all n(n-1)/2 pairs; {count} or {fraction} say it explicitly (fraction 1 = every pair).
 * @param {number | {count: number} | {fraction: number} | null | undefined} budget
 */
function budgetMessage(budget) {
  if (budget === null || budget === undefined) return null;
  if (typeof budget === 'object') {
    if ('count' in budget) return budgetMessage(checkCount(budget.count));
    if ('fraction' in budget) return { fraction: checkFraction(budget.fraction) };
    throw new TypeError('budget object must have count or fraction');
  }
  if (typeof budget !== 'number' || !Number.isFinite(budget) || budget <= 0) {
    throw new RangeError(`budget must be a pair count >= 1 or a fraction in (0, 1), got ${budget}`);
  }
  if (budget < 1) return { fraction: budget };
  return { count: checkCount(budget) };
}

/** @param {number} n */
function checkCount(n) {
  if (!Number.isInteger(n) || n < 1) throw new RangeError(`a budget count must be an integer >= 1, got ${n}`);
  return n;
}

/** @param {number} f */
function checkFraction(f) {
  if (typeof f !== 'number' || !(f > 0 && f <= 1)) {
    throw new RangeError(`a budget fraction must be in (0, 1], got ${f}`);
  }
  return f;
}

/**
 * A model reference: "name", "name:version", {name, version} or empty for the default.
 * @param {string | {name?: string, version?: string} | null | undefined} model
 */
function modelRef(model) {
  if (!model) return { name: '', version: '' };
  if (typeof model === 'string') {
    const [name, version = ''] = model.split(':', 2);
    return { name, version };
  }
  return { name: model.name ?? '', version: String(model.version ?? '') };
}

/**
 * An ImageFilter: an object of metadata values ({viewpoint: "left"}), or a full filter
 * {metadata, dateKey, dateFrom, dateTo, imageIds}.
 * @param {Record<string, any> | null | undefined} filter
 */
function imageFilter(filter) {
  if (!filter) return null;
  const full = ['metadata', 'dateKey', 'dateFrom', 'dateTo', 'imageIds'];
  if (Object.keys(filter).some((k) => full.includes(k))) return filter;
  return { metadata: filter };
}

/**
 * An IngestImage: {id, data | path | uri, name?, metadata?}. `path` is read here, by the
 * client; `uri` is read by the server.
 * @param {import('./client').ImageInput} item
 */
async function ingestImage(item) {
  if (!item || typeof item.id !== 'string' || !item.id) {
    throw new TypeError(`every image needs a non-empty string id, got ${JSON.stringify(item?.id)}`);
  }
  const sources = ['data', 'path', 'uri'].filter((k) => item[k] !== undefined && item[k] !== null);
  if (sources.length !== 1) {
    throw new TypeError(`image ${JSON.stringify(item.id)} needs exactly one of data, path or uri`);
  }
  let image;
  if (item.data !== undefined && item.data !== null) image = { id: item.id, data: Buffer.from(item.data) };
  else if (item.path !== undefined && item.path !== null) image = { id: item.id, data: await fs.readFile(item.path) };
  else image = { id: item.id, uri: String(item.uri) };
  return { image, name: item.name ?? '', metadata: item.metadata ?? {} };
}

/** @param {Date | number | {seconds: number, nanos?: number} | undefined | null} t */
function timestamp(t) {
  if (t === undefined || t === null) return null;
  if (t instanceof Date) t = t.getTime() / 1000;
  if (typeof t === 'number') {
    const seconds = Math.floor(t);
    return { seconds, nanos: Math.round((t - seconds) * 1e9) };
  }
  return t;
}

/**
 * An AnswerInput from {pairId, label} / {imageA, imageB, label} (plus annotatorId, tags,
 * confidence, note, startedAt, endedAt), or an array [pairId, label] / [imageA, imageB, label].
 * @param {import('./client').AnswerInput | any[]} answer
 * @param {string} defaultAnnotator
 */
function answerInput(answer, defaultAnnotator) {
  if (Array.isArray(answer)) {
    if (answer.length === 2) answer = { pairId: answer[0], label: answer[1] };
    else if (answer.length === 3) answer = { imageA: answer[0], imageB: answer[1], label: answer[2] };
    else throw new TypeError('an answer array is [pairId, label] or [imageA, imageB, label]');
  }
  const msg = {
    label: `ANSWER_LABEL_${parseLabel(answer.label)}`,
    annotatorId: answer.annotatorId || defaultAnnotator || '',
    tags: (answer.tags ?? []).map(parseTag),
    note: answer.note ?? '',
    startedAt: timestamp(answer.startedAt),
    endedAt: timestamp(answer.endedAt),
  };
  if (answer.confidence !== undefined && answer.confidence !== null) msg.confidence = answer.confidence;
  if (answer.pairId) return { ...msg, pairId: answer.pairId };
  if (answer.imageA && answer.imageB) return { ...msg, images: { imageA: answer.imageA, imageB: answer.imageB } };
  throw new TypeError('an answer needs pairId, or imageA and imageB');
}

/**
 * A response as a plain object: Timestamps become Date, and the loader's helper fields
 * of proto3 `optional` fields ("_k1": "k1") are dropped. Enum values stay proto names.
 * @param {any} value
 * @returns {any}
 */
function plain(value) {
  if (Array.isArray(value)) return value.map(plain);
  if (value === null || typeof value !== 'object' || Buffer.isBuffer(value)) return value;
  const keys = Object.keys(value);
  if (keys.length === 2 && 'seconds' in value && 'nanos' in value) {
    return new Date(Number(value.seconds) * 1000 + Math.floor(Number(value.nanos) / 1e6));
  }
  const out = {};
  for (const k of keys) if (!k.startsWith('_')) out[k] = plain(value[k]);
  return out;
}

module.exports = {
  parseLabel, parseTag, budgetMessage, modelRef, imageFilter, ingestImage, answerInput, plain,
  TAGS,
};

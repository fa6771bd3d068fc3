// Types of reidal-client (src/index.js). Messages follow protos/reidal/v1/*.proto: camelCase
// field names, enum values as their proto names, 64-bit integers as number, Timestamps as Date.
// Only the fields a client usually reads are spelled out; every message carries all of its
// proto's fields at run time.

import type { ChannelCredentials, status as grpcStatus } from '@grpc/grpc-js';

export declare const status: typeof grpcStatus;
export declare const DEFAULT_ADDRESS: string;
export declare const DEFAULT_INGEST_BATCH: number;
export declare const DEFAULT_PROTO_DIR: string;
export declare const PROTO_FILES: readonly string[];
export declare const TAGS: readonly string[];

export type Label = 'SAME' | 'DIFFERENT' | 'UNSURE';
export declare function parseLabel(value: string | boolean | null | undefined): Label;
export declare function codeName(code: number): string;
export declare function defaultChannelOptions(maxBackoffMs: number): Record<string, number>;
export declare function loadServices(protoDir?: string): Record<
  'CollectionService' | 'SamplingService' | 'ConstraintService' | 'EmbeddingService' |
  'TrainingService' | 'Health', any>;

export declare class ReidalError extends Error {
  /** gRPC status code (status.NOT_FOUND, ...). */
  code: number;
  /** "NOT_FOUND", "INVALID_ARGUMENT", ... */
  codeName: string;
  /** The server's message. */
  details: string;
  /** "CollectionService.GetCollection", ... */
  method: string;
  attempts: number;
}

export declare class OperationFailedError extends ReidalError {
  operation: Operation;
}

export interface ModelRef { name: string; version: string }
export type ModelInput = string | { name?: string; version?: string | number };
export type Budget = number | { count: number } | { fraction: number };

export interface ClusteringParams { dbscanEps?: number; minSamples?: number; k1?: number; k2?: number }
export interface SamplingParams {
  mixtureEps?: number; kMax?: number; sMin?: number; typeWeights?: string;
  regionWeights?: string; pairWeights?: string; seed?: number; defaultBudget?: Budget;
  sampler?: string; osSimilarity?: string;
}
export interface ImageFilter {
  metadata?: Record<string, string>; dateKey?: string; dateFrom?: string; dateTo?: string;
  imageIds?: string[];
}

export interface ImageInput {
  id: string;
  data?: Buffer | Uint8Array;
  path?: string;
  uri?: string;
  name?: string;
  metadata?: Record<string, string>;
}

export interface AnswerInput {
  pairId?: string;
  imageA?: string;
  imageB?: string;
  label: string | boolean | null;
  annotatorId?: string;
  tags?: string[];
  confidence?: number;
  note?: string;
  startedAt?: Date | number;
  endedAt?: Date | number;
}

export interface Collection {
  collectionId: string; species: string; model: ModelRef;
  clustering: Required<ClusteringParams>; sampling: Record<string, any>;
  imageCount: number; excludedImageCount: number; embeddedImageCount: number;
  answerCount: number; cycle: number; pairsAsked: number; totalPairs: number;
  budgetUsed: number; createdAt: Date;
}

export interface AddImagesResult {
  collectionId: string; received: number; added: number; alreadyPresent: number;
  embedded: number; changedIds: string[]; model: ModelRef | null;
}

export interface ImageInfo {
  imageId: string; name: string; metadata: Record<string, string>; uri: string;
  excluded: boolean; excludedReason: string; embedded: boolean; addedAt: Date;
}

export interface ImageContent { imageId: string; data: Buffer; mimeType: string; sha256: string }

export interface Operation {
  operationId: string; collectionId: string; kind: string;
  state: 'OPERATION_STATE_PENDING' | 'OPERATION_STATE_RUNNING' | 'OPERATION_STATE_SUCCEEDED' |
    'OPERATION_STATE_FAILED';
  done: number; total: number; stage: string; errorCode: string; errorMessage: string;
  batchId: string; model: ModelRef | null; createdAt: Date; updatedAt: Date;
}

export interface QueryPair {
  pairId: string; imageA: string; imageB: string; similarity: number;
  pool: 'POOL_OVERSEGMENTATION' | 'POOL_UNDERSEGMENTATION'; region: number;
  probability: number; model: ModelRef; answered: boolean;
}

export interface QueryBatch {
  batchId: string; collectionId: string; cycle: number; pairs: QueryPair[]; budget: number;
  reason: string; reasonText: string; finished: boolean; filter: ImageFilter | null;
  sampledImages: number; model: ModelRef; stats: Record<string, number>; answered: number;
  createdAt: Date;
}

export interface QueueEvent {
  kind: 'QUEUE_EVENT_KIND_BATCH_READY' | 'QUEUE_EVENT_KIND_COLLECTION_DELETED';
  collectionId: string;
  batch: QueryBatch | null;
}

export interface StoredConstraint {
  answerId: string; imageA: string; imageB: string;
  label: 'ANSWER_LABEL_SAME' | 'ANSWER_LABEL_DIFFERENT' | 'ANSWER_LABEL_UNSURE';
  annotatorId: string; tags: string[]; confidence?: number; note: string;
  startedAt: Date | null; endedAt: Date | null; receivedAt: Date; batchId: string;
  pairId: string; requestId: string;
  status: 'CONSTRAINT_STATUS_CURRENT' | 'CONSTRAINT_STATUS_SUPERSEDED' | 'CONSTRAINT_STATUS_DELETED';
  supersededBy: string;
}

export interface Contradiction {
  answers: StoredConstraint[]; droppedAnswerId: string; explanation: string;
}

export interface SubmitResult {
  storedCount: number; replayedCount: number; answerIds: string[];
  contradictions: Contradiction[]; supersededCount: number; requestId: string;
}

export interface Identity {
  identityId: string; imageIds: string[]; size: number; sameAnswers: number;
  differentAnswers: number; names: string[]; newIndividual: boolean; nameConflict: boolean;
}

export interface Identities {
  collectionId: string; identities: Identity[]; excludedImageIds: string[]; model: ModelRef;
  appliedAnswers: number; contradictions: Contradiction[]; cycle: number;
}

export interface ImageExclusion { imageId: string; excluded: boolean; reason: string }

export interface EmbedResult {
  embeddings: { id: string; vector: number[] }[]; modelName: string; modelVersion: string;
  dim: number;
}

export interface TlsOptions {
  /** PEM (or a path to it) of the CA that signed the server certificate; default: system roots. */
  ca?: Buffer | string;
  /** This client's certificate chain and key (PEM or paths), for mutual TLS. */
  cert?: Buffer | string;
  key?: Buffer | string;
  /** The name to check in the server certificate when it is not the address's host. */
  serverName?: string;
}

export interface ClientOptions {
  timeoutMs?: number | null;
  retries?: number;
  backoffMs?: number;
  maxBackoffMs?: number;
  token?: string;
  tls?: TlsOptions | boolean;
  credentials?: ChannelCredentials;
  metadata?: Record<string, string>;
  channelOptions?: Record<string, any>;
  protoDir?: string;
  onRetry?: (method: string, attempt: number, delayMs: number, error: ReidalError) => void;
}

interface CallOptions { timeoutMs?: number | null }

export declare class ReidalClient {
  constructor(address?: string, options?: ClientOptions);
  readonly address: string;
  timeoutMs: number | null;
  retries: number;
  backoffMs: number;
  maxBackoffMs: number;
  /** grpc-js stubs on this client's channel, for calls the class does not wrap. */
  readonly stubs: Record<'collections' | 'sampling' | 'constraints' | 'embedding' | 'training' | 'health', any>;
  close(): void;
  callMetadata(): import('@grpc/grpc-js').Metadata;

  health(service?: string, options?: CallOptions & { retry?: boolean }): Promise<string>;
  waitUntilServing(options?: { timeoutMs?: number; service?: string }): Promise<void>;

  createCollection(collectionId: string, options?: CallOptions & {
    species?: string; model?: ModelInput; clustering?: ClusteringParams; sampling?: SamplingParams;
  }): Promise<Collection>;
  getCollection(collectionId: string, options?: CallOptions): Promise<Collection>;
  listCollections(options?: CallOptions): Promise<Collection[]>;
  deleteCollection(collectionId: string, options?: CallOptions & { actor?: string }): Promise<void>;
  addImages(collectionId: string, images: Iterable<ImageInput> | AsyncIterable<ImageInput>,
    options?: CallOptions & {
      batchSize?: number; messagesPerCall?: number; deferEmbedding?: boolean;
      onProgress?: (received: number) => void;
    }): Promise<AddImagesResult>;
  listImages(collectionId: string, options?: CallOptions & {
    filter?: ImageFilter | Record<string, string>; pageSize?: number;
  }): Promise<ImageInfo[]>;
  getImage(collectionId: string, imageId: string, options?: CallOptions): Promise<ImageContent>;
  embedCollection(collectionId: string, options?: CallOptions & {
    model?: ModelInput; wait?: boolean; onProgress?: (op: Operation) => void;
  }): Promise<Operation>;
  getOperation(operationId: string, options?: CallOptions): Promise<Operation>;
  watchOperation(operationId: string, options?: CallOptions): AsyncGenerator<Operation>;
  waitOperation(operationId: string, options?: CallOptions & {
    onProgress?: (op: Operation) => void;
  }): Promise<Operation>;

  getQueryPairs(collectionId: string, options?: CallOptions & {
    budget?: Budget; filter?: ImageFilter | Record<string, string>; skipPending?: boolean;
    requestId?: string;
  }): Promise<QueryBatch>;
  startQueryPairs(collectionId: string, options?: CallOptions & {
    budget?: Budget; filter?: ImageFilter | Record<string, string>; skipPending?: boolean;
    requestId?: string;
  }): Promise<Operation>;
  getQueryBatch(collectionId: string, batchId: string, options?: CallOptions): Promise<QueryBatch>;
  watchQueue(collectionId: string, options?: CallOptions & { afterCycle?: number }): AsyncGenerator<QueueEvent>;

  submitConstraints(collectionId: string, answers: Iterable<AnswerInput | [string, AnswerInput['label']] |
    [string, string, AnswerInput['label']]>, options?: CallOptions & {
    batchId?: string; requestId?: string; annotatorId?: string;
  }): Promise<SubmitResult>;
  listConstraints(collectionId: string, options?: CallOptions & {
    imageId?: string; annotatorId?: string; label?: string | boolean | null; batchId?: string;
    includeHistory?: boolean; pageSize?: number;
  }): Promise<StoredConstraint[]>;
  deleteConstraint(collectionId: string, answerId: string, options?: CallOptions & {
    actor?: string; reason?: string;
  }): Promise<{ deleted: StoredConstraint; restored: StoredConstraint | null }>;
  excludeImage(collectionId: string, imageId: string, options?: CallOptions & {
    reason?: string; actor?: string;
  }): Promise<ImageExclusion>;
  restoreImage(collectionId: string, imageId: string, options?: CallOptions & { actor?: string }): Promise<ImageExclusion>;
  getIdentities(collectionId: string, options?: CallOptions): Promise<Identities>;

  embed(images: ImageInput[], options?: CallOptions & { model?: ModelInput }): Promise<EmbedResult>;
}

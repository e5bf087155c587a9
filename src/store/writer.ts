// The main thread's side of the writer thread: `write(op, ...args)` sends a named write (see
// write-ops.ts) and resolves with its result once the commit that holds it is durable. The
// promise settles only after COMMIT returned on the writer's connection (synchronous=FULL), so a
// `250` sent from `.then()` is sent after the fsync.
import { Worker } from 'node:worker_threads';
import { RecentFailure } from '../clock.js';
import { PolicyRefusal } from './intake.js';
import { ownMemory, type WriteOpArgs, type WriteOpName, type WriteOpResult } from './write-ops.js';
import type { SerializedError, WriterReply, WriterRequest, WriterThreadOptions } from './writer-thread.js';

interface Pending {
  resolve: (value: unknown) => void;
  reject: (err: unknown) => void;
  /** The write op, or undefined for a pragma. */
  op: WriteOpName | undefined;
}

/**
 * A disk or database that is full: a small write may still fit (the health check's probe) while
 * messages and claims do not. Other faults (a read-only or damaged file) fail the probe too.
 */
const STORAGE_FULL = 'SQLITE_FULL';

export class StoreWriter {
  private readonly worker: Worker;
  private readonly pending = new Map<number, Pending>();
  private outbox: WriterRequest[] = [];
  private outboxMoving: Buffer[] = [];
  private nextId = 1;
  private closing: Promise<void> | undefined;
  private failed: Error | undefined;
  /** Called after results arrive (usually something was committed); delivery uses it to wake up. */
  onCommitted: () => void = () => {};
  /**
   * Called once if the thread dies (not at close): every pending and later write is rejected,
   * so nothing can be stored any more and the relay should stop (and be restarted).
   */
  onFailed: (err: Error) => void = () => {};
  /** Writes completed and transactions committed so far: `relay.stopped` logs them. */
  readonly stats = { writes: 0, commits: 0 };
  /** The last write refused as STORAGE_FULL, until a message is stored again. */
  private readonly fault = new RecentFailure();

  /** Writes sent and not yet answered (for tests). */
  get waiting(): number {
    return this.pending.size;
  }

  /** Writes of operation `op` sent and not yet answered (for tests). */
  waitingFor(op: WriteOpName): number {
    let n = 0;
    for (const p of this.pending.values()) if (p.op === op) n++;
    return n;
  }

  constructor(options: WriterThreadOptions) {
    this.worker = startWorker(options);
    this.worker.on('message', (replies: WriterReply[]) => this.onReplies(replies));
    this.worker.on('error', (err) => this.fail(err));
    this.worker.on('exit', (code) => this.fail(new Error(`writer thread exited with code ${code}`)));
  }

  write<K extends WriteOpName>(op: K, ...args: WriteOpArgs<K>): Promise<WriteOpResult<K>> {
    return this.writeMoving([], op, ...args);
  }

  /**
   * Why the database refused a write for lack of room in the last `withinMs`, unless a message
   * has been stored since. Only that clears it: the health check's probe, a claim or a delivery's
   * outcome are small writes that may still fit where a message no longer does.
   */
  storageFault(withinMs: number): string | undefined {
    return this.fault.within(withinMs);
  }

  /**
   * As write(), but the given buffers' memory moves to the writer thread instead of being copied
   * (a large message is then held once, not twice). The caller must not use them afterwards;
   * small buffers that share Node's buffer pool are copied as usual.
   */
  writeMoving<K extends WriteOpName>(buffers: Buffer[], op: K, ...args: WriteOpArgs<K>): Promise<WriteOpResult<K>> {
    return this.send(op, (id) => ({ type: 'write', id, op, args }), buffers) as Promise<WriteOpResult<K>>;
  }

  /** A pragma on the writer's connection, outside any transaction (tests use it to inject faults). */
  pragma(text: string): Promise<unknown> {
    return this.send(undefined, (id) => ({ type: 'pragma', id, text }));
  }

  private send(op: WriteOpName | undefined, request: (id: number) => WriterRequest, moving: Buffer[] = []): Promise<unknown> {
    if (this.failed) return Promise.reject(this.failed);
    if (this.closing) return Promise.reject(new Error('store is closed'));
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject, op });
      this.post(request(id), moving);
    });
  }

  /**
   * Requests made during one turn of the event loop (the writes of every session whose data
   * arrived in it) cross to the writer thread as one message.
   */
  private post(request: WriterRequest, moving: Buffer[] = []): void {
    this.outbox.push(request);
    this.outboxMoving.push(...moving);
    if (this.outbox.length === 1) setImmediate(() => this.flushOutbox());
  }

  private flushOutbox(): void {
    if (this.outbox.length === 0) return;
    const requests = this.outbox;
    const moving = this.outboxMoving;
    this.outbox = [];
    this.outboxMoving = [];
    this.worker.postMessage(requests, ownMemory(moving));
  }

  /** Lets queued writes commit, then stops the thread and closes its connection. */
  close(): Promise<void> {
    this.closing ??= new Promise<void>((resolve) => {
      if (this.failed) return resolve();
      this.worker.once('exit', () => resolve());
      this.post({ type: 'close' });
      this.flushOutbox();
    });
    return this.closing;
  }

  private onReplies(replies: WriterReply[]) {
    for (const reply of replies) {
      if (reply.type === 'closed') continue;
      const p = this.pending.get(reply.id);
      if (!p) continue;
      this.pending.delete(reply.id);
      this.stats.writes++;
      this.stats.commits = Math.max(this.stats.commits, reply.commits);
      if (reply.ok) {
        if (p.op === 'insertMessage') this.fault.clear();
        p.resolve(reply.value);
      } else {
        if (reply.error.code === STORAGE_FULL) this.fault.note(reply.error.message);
        p.reject(revive(reply.error));
      }
    }
    this.onCommitted();
  }

  private fail(err: Error) {
    const first = this.failed === undefined;
    this.failed ??= err;
    for (const p of this.pending.values()) p.reject(err);
    this.pending.clear();
    if (first && !this.closing) this.onFailed(err);
  }
}

function revive(e: SerializedError): Error {
  if (e.kind === 'rate-limit' || e.kind === 'queue-full') {
    return new PolicyRefusal(e.kind, e.message, e.hit as ConstructorParameters<typeof PolicyRefusal>[2]);
  }
  return Object.assign(new Error(e.message), { name: e.name, code: e.code });
}

/** Runs writer-thread.js; from TypeScript sources (tests, tsx) the thread registers tsx first. */
function startWorker(options: WriterThreadOptions): Worker {
  const fromSource = import.meta.url.endsWith('.ts');
  const entry = new URL(fromSource ? './writer-thread.ts' : './writer-thread.js', import.meta.url);
  if (!fromSource) return new Worker(entry, { workerData: options });
  const tsx = import.meta.resolve('tsx/esm/api');
  const bootstrap = `import(${JSON.stringify(tsx)}).then((t) => { t.register(); return import(${JSON.stringify(entry.href)}); })`;
  return new Worker(bootstrap, { eval: true, workerData: options });
}

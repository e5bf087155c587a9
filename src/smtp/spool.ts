// A message's bytes while it is being received: in memory up to `spoolAfter` bytes, the rest in
// a file of the spool directory (as Haraka's spool_after), so that a session holds at most
// about `spoolAfter` bytes of memory whatever the size of its message. The file is not the
// message's durable copy: the writer thread reads it into the insert, the `250` follows that
// commit, and the file is removed once the write has settled either way. The directory sits next
// to the database (`<databasePath>-spool`) and is emptied at startup, so the files of sessions
// cut off by a crash (none of which was answered `250`) do not pile up.
import fs from 'node:fs';
import path from 'node:path';
import type { Readable } from 'node:stream';
import { finished } from 'node:stream/promises';
import { RecentFailure } from '../clock.js';
import { makeDirectory } from '../make-dir.js';

/** The spool directory cannot be emptied at start: a problem of databasePath, not of the listener. */
export class SpoolError extends Error {}

export class Spool {
  private seq = 0;
  /** The last spool file that could not be made or written, unless one was written since. */
  private readonly failure = new RecentFailure();

  /** `after` 0: every message stays in memory. */
  constructor(
    readonly dir: string,
    readonly after: number,
  ) {}

  static dirFor(databasePath: string): string {
    return `${databasePath}-spool`;
  }

  /**
   * Why messages over `spoolAfter` are refused: a spool file failed within the last `withinMs`
   * and none has been written in full since (for /health).
   */
  fault(withinMs: number): string | undefined {
    return this.failure.within(withinMs);
  }

  noteFailure(err: Error): void {
    this.failure.note(err.message);
  }

  /** A spool file opened at `openedAt` (performance.now()) was written in full: one opened before a failure says nothing of it. */
  noteWritten(openedAt: number): void {
    this.failure.clear(openedAt);
  }

  /**
   * Removes what earlier processes left (messages that were never acknowledged), and checks that
   * relayq can write there when it spools. The directory itself stays: it may be a mount point
   * or a link that the operator made (as this user or as root). A link or a directory that
   * another user made (in a directory others may write to) is refused: emptying would delete
   * whatever that user pointed it at (refuseForeign). Says how many entries it removed, and the
   * bytes of those that are files.
   */
  clear(): { entries: number; bytes: number } {
    let names: string[];
    try {
      this.refuseForeign('empty');
      names = fs.readdirSync(this.dir);
    } catch (err) {
      if (err instanceof SpoolError) throw err;
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') {
        // made now rather than at the first large message: relayq's, before another user could
        // put a link of theirs at this name
        if (this.after > 0) this.makeDir();
        return { entries: 0, bytes: 0 };
      }
      throw new SpoolError(`cannot read ${this.dir}: ${(err as Error).message}`, { cause: err });
    }
    let bytes = 0;
    try {
      for (const name of names) {
        const entry = path.join(this.dir, name);
        const stat = fs.lstatSync(entry, { throwIfNoEntry: false });
        if (stat?.isFile()) bytes += stat.size;
        fs.rmSync(entry, { recursive: true, force: true });
      }
      // else every message larger than spoolAfter would get 451, for as long as relayq runs
      if (this.after > 0) fs.accessSync(this.dir, fs.constants.W_OK | fs.constants.X_OK);
    } catch (err) {
      throw new SpoolError(`cannot empty or write into ${this.dir}: ${(err as Error).message}`, { cause: err });
    }
    return { entries: names.length, bytes };
  }

  /**
   * A path for a new file (the directory is made, or made again, here). A link that another user
   * made since the start is refused, as at the start: the file would be theirs to read or swap.
   */
  newFile(name: string): string {
    this.makeDir();
    this.refuseForeign('write into');
    return path.join(this.dir, `${name}.${process.pid}.${++this.seq}`);
  }

  /** Fails when, say, the directory is a link the operator made that points nowhere. */
  private makeDir(): void {
    try {
      makeDirectory(this.dir, 0o700);
    } catch (err) {
      throw new SpoolError(`cannot make ${this.dir}: ${(err as Error).message}`, { cause: err });
    }
  }

  /**
   * A link, or a directory, that a user other than relayq's or root made: its owner could read
   * the spooled part of messages, or swap it for other bytes before the insert reads it.
   */
  private refuseForeign(action: string): void {
    const entry = fs.lstatSync(this.dir);
    const uid = process.getuid?.();
    if (uid === undefined || entry.uid === uid || entry.uid === 0) return;
    if (entry.isSymbolicLink()) {
      throw new SpoolError(`${this.dir} is a symbolic link made by another user (uid ${entry.uid}); relayq will not ${action} what it points to: remove it`);
    }
    throw new SpoolError(`${this.dir} belongs to another user (uid ${entry.uid}); relayq will not ${action} it: remove it, or give it to relayq's user`);
  }
}

/** What a received message consists of: `chunks` in memory, then the spool file's bytes, if any. */
export interface ReceivedBytes {
  chunks: Buffer[];
  spooled?: { file: string; bytes: number };
}

/**
 * A chunk shorter than this is copied into a block of BLOCK bytes instead of being kept as it
 * came: a client that sends a byte per TCP segment hands over a Buffer per byte, and each costs
 * over 100 bytes of memory (and its own write to the spool file).
 */
const SMALL_CHUNK = 1024;
const BLOCK = 16 * 1024;

export class MessageBytes {
  private readonly chunks: Buffer[] = [];
  private held = 0;
  /** Small chunks gathered (the first `blockUsed` bytes), kept or written once the block is full. */
  private block: Buffer | undefined;
  private blockUsed = 0;
  private file: { path: string; stream: fs.WriteStream; bytes: number; draining: boolean; openedAt: number } | undefined;
  /** The spool file could not be created or written: the message cannot be stored. */
  private failed: Error | undefined;
  private discarded = false;

  /** `data`: the DATA stream, paused while the file's writes are behind. */
  constructor(
    private readonly spool: Spool,
    private readonly name: string,
    private readonly data: Readable,
  ) {}

  add(chunk: Buffer): void {
    if (this.discarded || this.failed) return;
    if (chunk.length >= SMALL_CHUNK) {
      this.flushBlock();
      this.keep(chunk);
      return;
    }
    this.block ??= Buffer.allocUnsafe(BLOCK);
    const taken = chunk.copy(this.block, this.blockUsed);
    this.blockUsed += taken;
    if (this.blockUsed === BLOCK) this.flushBlock();
    if (taken < chunk.length) this.add(chunk.subarray(taken));
  }

  /** The gathered small chunks, as one chunk of their own (the block is used again). */
  private flushBlock(): void {
    if (this.blockUsed === 0 || !this.block) return;
    const gathered = Buffer.from(this.block.subarray(0, this.blockUsed));
    this.blockUsed = 0;
    this.keep(gathered);
  }

  private keep(whole: Buffer): void {
    if (this.discarded || this.failed) return;
    let chunk = whole;
    if (!this.file) {
      // the first spoolAfter bytes stay in memory however the reads cut them (the log's subject is
      // read from them), and the rest goes to the file
      const room = this.spool.after === 0 ? chunk.length : this.spool.after - this.held;
      const kept = chunk.length <= room ? chunk : chunk.subarray(0, room);
      if (kept.length > 0) {
        this.chunks.push(kept);
        this.held += kept.length;
      }
      if (kept === chunk) return;
      chunk = chunk.subarray(kept.length);
    }
    const file = this.file ?? this.openFile();
    if (!file) return;
    file.bytes += chunk.length;
    if (!file.stream.write(chunk) && !file.draining) {
      file.draining = true;
      this.data.pause();
      file.stream.once('drain', () => {
        file.draining = false;
        this.data.resume();
      });
    }
  }

  /** Waits for the file's writes; rejects when one failed (the message cannot be stored). */
  async finish(): Promise<ReceivedBytes> {
    this.flushBlock();
    const file = this.file;
    if (file && !this.failed) {
      file.stream.end();
      try {
        await finished(file.stream);
      } catch (err) {
        this.fail(err as Error);
      }
    }
    if (this.failed) throw this.failed;
    if (file) this.spool.noteWritten(file.openedAt);
    return { chunks: this.chunks, spooled: file && { file: file.path, bytes: file.bytes } };
  }

  /** Drops the bytes and removes the file, if any (after the write settled, or on refusal). */
  discard(): void {
    this.discarded = true;
    this.chunks.length = 0;
    this.block = undefined;
    const file = this.file;
    if (!file) return;
    // a stream still opening its file creates it before it closes: remove the file after that
    const remove = () => fs.rm(file.path, { force: true }, () => {});
    if (file.stream.closed) remove();
    else file.stream.once('close', remove).destroy();
  }

  private openFile() {
    let file: string;
    try {
      file = this.spool.newFile(this.name);
    } catch (err) {
      this.fail(err as Error);
      return undefined;
    }
    const stream = fs.createWriteStream(file, { mode: 0o600 });
    stream.on('error', (err) => this.fail(err));
    this.file = { path: file, stream, bytes: 0, draining: false, openedAt: performance.now() };
    return this.file;
  }

  private fail(err: Error): void {
    if (!this.failed && !this.discarded) this.spool.noteFailure(err);
    this.failed ??= err;
    this.chunks.length = 0;
    // the rest of DATA is read and dropped; the reply at its end says the message was not stored
    this.data.resume();
  }
}

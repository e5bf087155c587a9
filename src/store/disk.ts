// Free space for the queue, sampled at most once a second so the check can sit on the intake
// path: the filesystem's free space where the database file really is (a symbolic link's target),
// and the free pages inside the file, which SQLite fills before it grows the file.
import fs from 'node:fs';
import path from 'node:path';
import { realDatabasePath, type Sqlite } from './db.js';

const MB = 1024 * 1024;

interface Sample {
  at: number;
  /** The database's filesystem and its free pages together: what minFreeDiskMb weighs. */
  mb: number;
  /** The database's filesystem alone, where the WAL grows; and the spool directory's, when another. */
  fsMb: number;
  spoolMb?: number;
  error?: string;
}

export interface DiskSpaceOptions {
  databasePath: string;
  minFreeMb: number;
  /** `<databasePath>-spool`, which may be on another filesystem (beside a symbolic link). */
  spoolDir?: string;
  /** Messages over this many bytes are spooled while they arrive (0: none are). */
  spoolAfter?: number;
  /**
   * The database file's free pages, in bytes. Space that delivery, retention or a delete gave
   * back stays in the file (it does not shrink), so counting only the filesystem would refuse
   * mail for good once the file had grown to the floor, however empty the queue.
   */
  reusableBytes?: () => number;
  /** Milliseconds, for the age of a sample (tests move it). */
  now?: () => number;
}

/** The database file's free pages, in bytes (0 when they cannot be read: the disk check stands alone). */
export function freePageBytes(sqlite: Sqlite): number {
  try {
    const pages = sqlite.pragma('freelist_count', { simple: true }) as number;
    return pages * (sqlite.pragma('page_size', { simple: true }) as number);
  } catch {
    return 0;
  }
}

export class DiskSpace {
  private cached: Sample = { at: 0, mb: Number.POSITIVE_INFINITY, fsMb: Number.POSITIVE_INFINITY };

  constructor(private readonly options: DiskSpaceOptions) {}

  private sample(): Sample {
    const t = (this.options.now ?? Date.now)();
    if (t - this.cached.at >= 1000 || t < this.cached.at) {
      const { databasePath, spoolDir, reusableBytes } = this.options;
      try {
        const dir = path.dirname(realDatabasePath(databasePath));
        const fsMb = freeMbOf(dir);
        // the spool directory is made at the start; before, its parent stands in
        const spool = spoolDir && (fs.existsSync(spoolDir) ? spoolDir : path.dirname(spoolDir));
        const spoolMb = spool && fs.statSync(spool).dev !== fs.statSync(dir).dev ? freeMbOf(spool) : undefined;
        this.cached = { at: t, mb: fsMb + (reusableBytes?.() ?? 0) / MB, fsMb, spoolMb };
      } catch (err) {
        // taken for a full disk: new mail is refused until the space can be read again
        this.cached = { at: t, mb: 0, fsMb: 0, error: (err as Error).message };
      }
    }
    return this.cached;
  }

  /** Whole MB, as reported (what was stored since the sample can take it below 0 for a moment). */
  freeMb(): number {
    return Math.max(0, Math.floor(this.sample().mb));
  }

  /**
   * A message of `bytes` was stored: the WAL took them. Taken off the sample at once, so that a
   * client sending fast does not pass the floor by what it sends until the next sample.
   */
  noteStored(bytes: number): void {
    this.cached.mb -= bytes / MB;
    this.cached.fsMb -= bytes / MB;
  }

  /** Why the free space could not be read at the last sample, if it could not. */
  get readError(): string | undefined {
    return this.sample().error;
  }

  /**
   * True when free space is below minFreeDiskMb (new mail is refused), or would be once a message
   * of `declaredBytes` (MAIL FROM's SIZE) were stored, as Postfix weighs SIZE against queue_minfree;
   * or when the filesystem itself has no room for such a message: it goes to the WAL before a
   * checkpoint moves it into the file's free pages, and to the spool first if it is over spoolAfter.
   */
  isLow(declaredBytes = 0): boolean {
    const { minFreeMb, spoolAfter = 0 } = this.options;
    if (minFreeMb <= 0) return false;
    const s = this.sample();
    const declared = declaredBytes / MB;
    if (s.mb - declared < minFreeMb) return true;
    if (!(spoolAfter > 0 && declaredBytes > spoolAfter)) return s.fsMb < declared;
    return s.spoolMb === undefined ? s.fsMb < 2 * declared : s.fsMb < declared || s.spoolMb < declared;
  }
}

function freeMbOf(dir: string): number {
  const s = fs.statfsSync(dir);
  return (s.bavail * s.bsize) / MB;
}

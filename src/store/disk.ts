// Free space for the queue, sampled at most once a second so the check can sit on the intake
// path: the filesystem's free space where the database file really is (a symbolic link's target),
// and the free pages inside the file, which SQLite fills before it grows the file.
import fs from 'node:fs';
import path from 'node:path';
import { realDatabasePath } from './db.js';

export class DiskSpace {
  private cached: { at: number; mb: number; error?: string } = { at: 0, mb: Number.POSITIVE_INFINITY };

  /**
   * `reusableBytes`: the database file's free pages, in bytes. Space that delivery, retention or a
   * delete gave back stays in the file (it does not shrink), so counting only the filesystem would
   * refuse mail for good once the file had grown to the floor, however empty the queue.
   */
  constructor(
    private readonly databasePath: string,
    private readonly minFreeMb: number,
    private readonly reusableBytes: () => number = () => 0,
  ) {}

  freeMb(): number {
    const t = Date.now();
    if (t - this.cached.at >= 1000 || t < this.cached.at) {
      try {
        const s = fs.statfsSync(path.dirname(realDatabasePath(this.databasePath)));
        this.cached = { at: t, mb: Math.floor((s.bavail * s.bsize + this.reusableBytes()) / (1024 * 1024)) };
      } catch (err) {
        // taken for a full disk: new mail is refused until the space can be read again
        this.cached = { at: t, mb: 0, error: (err as Error).message };
      }
    }
    return this.cached.mb;
  }

  /** Why the free space could not be read at the last sample, if it could not. */
  get readError(): string | undefined {
    return this.cached.error;
  }

  /**
   * True when free space is below minFreeDiskMb (new mail is refused), or would be once a message
   * of `declaredBytes` (MAIL FROM's SIZE) were stored, as Postfix weighs SIZE against queue_minfree.
   */
  isLow(declaredBytes = 0): boolean {
    return this.minFreeMb > 0 && this.freeMb() - declaredBytes / (1024 * 1024) < this.minFreeMb;
  }
}

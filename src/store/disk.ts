// Free space on the filesystem that holds the database, sampled at most once a second so the
// check can sit on the intake path.
import fs from 'node:fs';
import path from 'node:path';

export class DiskSpace {
  private cached: { at: number; mb: number; error?: string } = { at: 0, mb: Number.POSITIVE_INFINITY };

  constructor(
    private readonly databasePath: string,
    private readonly minFreeMb: number,
  ) {}

  freeMb(): number {
    const t = Date.now();
    if (t - this.cached.at >= 1000 || t < this.cached.at) {
      try {
        const s = fs.statfsSync(path.dirname(path.resolve(this.databasePath)));
        this.cached = { at: t, mb: Math.floor((s.bavail * s.bsize) / (1024 * 1024)) };
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

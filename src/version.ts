// relayq's version, from its package.json: the nearest one up from this module, which is
// src/ when run from the sources and dist/src/ when built (the Docker image keeps the file too).
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

function packageVersion(): string {
  for (let dir = path.dirname(fileURLToPath(import.meta.url)); ; dir = path.dirname(dir)) {
    try {
      const pkg = JSON.parse(fs.readFileSync(path.join(dir, 'package.json'), 'utf8')) as { name?: string; version?: string };
      if (pkg.name === 'relayq' && pkg.version) return pkg.version;
    } catch {
      // none here, or not readable: look further up
    }
    if (path.dirname(dir) === dir) return 'unknown';
  }
}

export const VERSION = packageVersion();

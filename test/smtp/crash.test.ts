// A 250 survives kill -9: the relay runs as a child process, is killed with SIGKILL right after
// (or in the middle of) acknowledgements, and every acknowledged id is in the database after a
// restart.
import assert from 'node:assert/strict';
import path from 'node:path';
import { describe, test } from 'node:test';
import Database from 'better-sqlite3';
import { SmtpClient, spawnRelay, tempDir, waitFor } from '../helpers.js';

function storedIds(dir: string): Set<string> {
  const db = new Database(path.join(dir, 'data', 'relayq.db'), { readonly: true });
  try {
    return new Set((db.prepare('SELECT id FROM messages').all() as Array<{ id: string }>).map((r) => r.id));
  } finally {
    db.close();
  }
}

/** One persistent SMTP session sending `count` messages; resolves with the acknowledged ids. */
async function sendLoop(port: number, count: number, tag: string, acked: string[]): Promise<void> {
  let c: SmtpClient;
  try {
    c = await SmtpClient.connect(port);
    await c.read();
    await c.send('EHLO burst.test');
    for (let i = 0; i < count; i++) {
      if (!(await c.send(`MAIL FROM:<${tag}@example.com>`)).startsWith('250')) return;
      if (!(await c.send(`RCPT TO:<r${i}@example.com>`)).startsWith('250')) return;
      if (!(await c.send('DATA')).startsWith('354')) return;
      const reply = await c.send(`Subject: ${tag} ${i}\r\n\r\nbody ${i}\r\n.`);
      const m = /^250 2\.0\.0 Ok: queued as (\S+)/.exec(reply);
      if (!m) return;
      acked.push(m[1]);
    }
    c.close();
  } catch {
    // the relay was killed under us: whatever was acknowledged is in `acked`
  }
}

describe('crash safety of intake', () => {
  test('a message acknowledged right before SIGKILL is there after restart under the same id', async () => {
    const dir = tempDir();
    const relay = await spawnRelay(dir);
    const acked: string[] = [];
    try {
      await sendLoop(relay.smtpPort, 1, 'single', acked);
    } finally {
      await relay.kill('SIGKILL');
    }
    assert.equal(acked.length, 1);
    const again = await spawnRelay(dir);
    try {
      assert.ok(storedIds(dir).has(acked[0]));
    } finally {
      await again.kill('SIGTERM');
    }
  });

  test('200 messages from 10 concurrent clients, killed mid-burst: every 250 is stored', async () => {
    const dir = tempDir();
    const relay = await spawnRelay(dir);
    const acked: string[] = [];
    const clients = Array.from({ length: 10 }, (_, i) => sendLoop(relay.smtpPort, 20, `client${i}`, acked));
    try {
      // kill once a good part of the burst has been acknowledged, while the rest is in flight
      await waitFor(() => acked.length >= 60, 60_000, '60 acknowledged messages', 2);
    } finally {
      await relay.kill('SIGKILL');
    }
    await Promise.all(clients);
    assert.ok(acked.length >= 60 && acked.length < 200, `acked ${acked.length}`);
    const again = await spawnRelay(dir);
    try {
      const stored = storedIds(dir);
      const missing = acked.filter((id) => !stored.has(id));
      assert.deepEqual(missing, []);
      assert.ok(stored.size >= acked.length);
    } finally {
      await again.kill('SIGTERM');
    }
  });
});

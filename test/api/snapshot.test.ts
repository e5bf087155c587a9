// An answer of the API describes one moment of the queue: its figures are read in one snapshot,
// so a delivery that commits between two of its reads cannot make it disagree with itself. The
// commit is forced between the first two reads by a second real connection to the file.
import assert from 'node:assert/strict';
import { after, describe, test } from 'node:test';
import Database from 'better-sqlite3';
import { createApp } from '../../src/api/app.js';
import type { Relay } from '../../src/main.js';
import type { Sqlite } from '../../src/store/db.js';
import { sendMail, startTestRelay } from '../helpers.js';

/**
 * The relay's read connection, with `between` run once right after the first row it reads: what
 * `between` commits lands between that read and the next.
 */
function commitAfterFirstRead(sqlite: Sqlite, between: () => void): Sqlite {
  let pending = true;
  const afterRead =
    <A extends unknown[], R>(read: (...args: A) => R) =>
    (...args: A): R => {
      const rows = read(...args);
      if (pending) {
        pending = false;
        between();
      }
      return rows;
    };
  return new Proxy(sqlite, {
    get(target, prop) {
      if (prop === 'prepare') {
        return (text: string) => {
          const statement = target.prepare(text);
          return new Proxy(statement, {
            get(s, p) {
              const value = Reflect.get(s, p);
              if (p === 'get' || p === 'all') return afterRead(value.bind(s));
              return typeof value === 'function' ? value.bind(s) : value;
            },
          });
        };
      }
      const value = Reflect.get(target, prop);
      return typeof value === 'function' ? value.bind(target) : value;
    },
  });
}

/** Marks the message and its recipients delivered, from another connection, as delivery would. */
function deliverElsewhere(relay: Relay, id: string): () => void {
  return () => {
    const other = new Database(relay.config.databasePath);
    try {
      other.pragma('busy_timeout = 5000');
      other.transaction(() => {
        const now = relay.clock.now();
        other.prepare("UPDATE recipients SET status = 'delivered', updated_at = ? WHERE message_id = ?").run(now, id);
        other.prepare("UPDATE messages SET state = 'delivered', finished_at = ?, updated_at = ? WHERE id = ?").run(now, now, id);
      })();
    } finally {
      other.close();
    }
  };
}

async function queuedMessage(): Promise<{ relay: Relay; id: string }> {
  const relay = await startTestRelay({}, { startDelivery: false, startRetention: false });
  after(() => relay.stop());
  const { response } = await sendMail(relay.smtpPort, { to: ['a@example.com', 'b@example.com'] });
  const id = /queued as (\S+)/.exec(response)?.[1];
  assert.ok(id, response);
  return { relay, id };
}

/** The messages not yet final and the age of the oldest of them, as /metrics or /health says. */
async function activeAndAge(app: ReturnType<typeof createApp>, path: '/metrics' | '/health'): Promise<[number, number | null]> {
  const res = await app.request(path);
  if (path === '/metrics') {
    const body = (await res.json()) as { queue: Record<string, number>; oldest_queued_age_seconds: number | null };
    return [body.queue.queued + body.queue.sending, body.oldest_queued_age_seconds];
  }
  const body = (await res.json()) as { details: { queued_emails: number; oldest_queued_age_seconds: number | null } };
  return [body.details.queued_emails, body.details.oldest_queued_age_seconds];
}

describe('API answers read one snapshot', () => {
  test('/metrics and /health: the queue counts and the oldest age agree while a delivery commits between reads', async () => {
    for (const path of ['/metrics', '/health'] as const) {
      const { relay, id } = await queuedMessage();
      const app = createApp({ ...relay, getClientIp: () => '127.0.0.1', store: { sqlite: commitAfterFirstRead(relay.store.sqlite, deliverElsewhere(relay, id)) } });
      const [active, age] = await activeAndAge(app, path);
      assert.equal(active, 1, `${path}: read before the delivery committed`);
      assert.notEqual(age, null, `${path}: one message waiting, so there is an oldest one`);
      // the delivery did commit: a fresh answer sees it
      assert.deepEqual(await activeAndAge(createApp({ ...relay, getClientIp: () => '127.0.0.1' }), path), [0, null]);
    }
  });

  test('a message with its recipients: the state and the recipients agree while a delivery commits between reads', async () => {
    const { relay, id } = await queuedMessage();
    const app = createApp({ ...relay, getClientIp: () => '127.0.0.1', store: { sqlite: commitAfterFirstRead(relay.store.sqlite, deliverElsewhere(relay, id)) } });
    const res = await app.request(`/admin/messages/${id}`);
    assert.equal(res.status, 200);
    const body = (await res.json()) as { state: string; recipients: Array<{ status: string }> };
    assert.equal(body.state, 'queued');
    assert.deepEqual(
      body.recipients.map((r) => r.status),
      ['pending', 'pending'],
      'the recipients as they were when the state was read',
    );
  });
});
